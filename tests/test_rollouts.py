"""RL rollouts (vitune.train.rollouts.sample_completions): each row's completion is the one a plain
sampler computes alone -- the model's forward over the growing sequence, no cache, then
torch.multinomial with the row's own generator -- whatever else shares the batch; for a plain model,
a LoRA model (merged for the rollout, its base weights put back bit-identical) and sliding-window
models (Mistral, Gemma 3) past their window; stopping at an eos (kept) or at max_new_tokens; the
model's train mode and gradient checkpointing left as they were."""

from __future__ import annotations

import pytest
import torch

from vitune.train.rollouts import row_seeds, sample_completions

from test_engine_windows import WINDOW, gemma3, mistral

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # models of 64 hidden units gain nothing from a second thread and lose much when the host is busy
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18], [19], [20, 21, 22, 23, 24]]
SEEDS = [11, 12, 13, 14]


def llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256, bos_token_id=None, eos_token_id=None,
                         pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def with_lora(model):
    """A LoRA on every linear layer with random (nonzero) A and B: the adapter changes every answer."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))


MODELS = {"llama": llama, "llama+lora": lambda: with_lora(llama()), "mistral": mistral, "gemma3": gemma3}


def reference(model, prompt: list[int], seed: int, n: int, eos=(), temperature=1.0, top_k=0, top_p=1.0) -> list[int]:
    """The sampler written out: the whole sequence through the model at every step (no cache, no
    padding), temperature, top-k, then top-p (the smallest set of most likely tokens whose mass
    reaches top_p), and one torch.multinomial draw with a generator seeded with `seed`."""
    generator = torch.Generator().manual_seed(seed)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float() / temperature
            if top_k:
                logits[logits < torch.topk(logits, top_k).values[-1]] = -float("inf")
            probs = torch.softmax(logits, -1)
            ordered, order = torch.sort(probs, descending=True)
            logits[order[torch.cumsum(ordered, 0) - ordered >= top_p]] = -float("inf")
            token = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))
            ids.append(token)
            if token in eos:
                break
    return ids[len(prompt):]


def sample(model, prompts=PROMPTS, seeds=SEEDS, n=12, eos=(), **sampling) -> list[list[int]]:
    return sample_completions(model, prompts, seeds, max_new_tokens=n, eos_ids=list(eos), pad_id=0, **sampling)


@pytest.mark.parametrize("name", MODELS)
def test_each_row_is_what_a_cacheless_sampler_draws_with_its_seed(name):
    model = MODELS[name]()
    prompts = PROMPTS[1:] + [list(range(30, 30 + 2 * WINDOW + 3))]  # one prompt past the sliding window
    seeds = SEEDS[1:] + [15]
    got = sample(model, prompts, seeds, n=WINDOW + 2, temperature=0.8)  # the short prompts pass it too
    assert got == [reference(model, p, s, WINDOW + 2, temperature=0.8) for p, s in zip(prompts, seeds)]


@pytest.mark.parametrize("name", ["llama", "llama+lora"])
def test_a_row_sampled_in_a_batch_equals_it_sampled_alone(name):
    model = MODELS[name]()
    together = sample(model)
    assert together == [sample(model, [p], [s])[0] for p, s in zip(PROMPTS, SEEDS)]
    assert len(set(map(tuple, together))) == len(PROMPTS)  # different seeds, different draws


def test_top_k_then_top_p_as_transformers_applies_them():
    model = llama()
    got = sample(model, temperature=0.7, top_k=40, top_p=0.8)
    assert got == [reference(model, p, s, 12, temperature=0.7, top_k=40, top_p=0.8) for p, s in zip(PROMPTS, SEEDS)]
    assert got != sample(model, temperature=0.7)  # the filters changed some draw


def test_a_near_zero_temperature_is_greedy_generate():
    model = with_lora(llama())
    greedy = []
    for prompt in PROMPTS:
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 max_new_tokens=12, do_sample=False, pad_token_id=0)
        greedy.append(out[0, len(prompt):].tolist())
    assert sample(model, temperature=1e-6) == greedy


def test_a_row_stops_at_its_first_eos_kept_and_the_others_go_on_unchanged():
    model = llama()
    free = sample(model, n=12)
    eos = free[1][4]  # the fifth token of row 1 becomes an end of turn
    stopped = sample(model, n=12, eos=[eos])
    cut = [row[: row.index(eos) + 1] if eos in row else row for row in free]
    assert stopped == cut
    assert stopped[1][-1] == eos and len(stopped[1]) <= 5


def test_max_new_tokens_bounds_every_row():
    model = llama()
    assert [len(row) for row in sample(model, n=7)] == [7, 7, 7, 7]
    assert sample(model, n=0) == [[], [], [], []]


def test_lora_base_weights_bit_identical_and_train_state_restored():
    model = with_lora(llama())
    model.gradient_checkpointing_enable()
    model.train()
    model.base_model.model.model.layers[0].eval()  # a module in eval mode inside a training model stays so
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    modes = {name: m.training for name, m in model.named_modules()}
    got = sample(model)
    assert all(torch.equal(before[name], p) for name, p in model.named_parameters())
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert model.base_model.model.is_gradient_checkpointing
    with model.disable_adapter():  # the adapter is really in the rollout: the base alone draws otherwise
        assert sample(model) != got
    model.eval()
    assert got == [reference(model, p, s, 12) for p, s in zip(PROMPTS, SEEDS)]


def test_a_completion_depends_on_its_seed_only():
    model = llama()
    first = sample(model, PROMPTS[:2], [7, 8])
    assert sample(model, PROMPTS[:2][::-1], [8, 7]) == first[::-1]  # order in the batch does not matter
    assert sample(model, PROMPTS[:2], [7, 9])[0] == first[0]


def test_row_seeds_are_reproducible_and_distinct():
    assert row_seeds(42, 3, 0, 1, rows=4) == row_seeds(42, 3, 0, 1, rows=4)
    seeds = row_seeds(42, 3, 0, 1, rows=4) + row_seeds(42, 4, 0, 1, rows=4) + row_seeds(42, 3, 1, 1, rows=4)
    assert len(set(seeds)) == 12 and all(0 <= s < 2**63 for s in seeds)
