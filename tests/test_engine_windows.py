"""Sliding-window attention in every generation path: the serving engine (one request, requests
joining and leaving mid-batch, prompts prefilled together as `vitune eval` does) answers exactly as
`generate` does alone, past the window, for Mistral (every layer slides) and Gemma 3 (sliding layers
and a global one); `vitune chat` and the RL rollouts (TRL's left-padded `generate`) too; a cache that
cannot be padded is refused in one line. Windows of 8 tokens, so that prompts and answers pass them."""

from __future__ import annotations

import pytest
import torch
from transformers import BatchEncoding

from vitune.infer.batching import Engine, Sampling

from test_serve import Collected, run_all

WINDOW = 8
LAYERS = ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"]


class Characters:
    """A tokenizer stand-in: token i is the character chr(i) (vocabulary 300)."""

    pad_token_id = 0
    eos_token_id = None

    def __call__(self, text, add_special_tokens=False, return_tensors=None):
        ids = torch.tensor([[ord(c) for c in text]])
        return BatchEncoding({"input_ids": ids, "attention_mask": torch.ones_like(ids)})

    def decode(self, ids, skip_special_tokens=False):
        return "".join(map(chr, ids))


def mistral(window=WINDOW, seed=0):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    config = MistralConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=window,
                           max_position_embeddings=256, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    return MistralForCausalLM(config).eval()


def gemma3(layer_types=LAYERS, seed=0):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    config = Gemma3TextConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=WINDOW,
                              layer_types=list(layer_types), max_position_embeddings=256,
                              bos_token_id=None, eos_token_id=None, pad_token_id=0)
    return Gemma3ForCausalLM(config).eval()


MODELS = {"mistral": mistral, "gemma3": gemma3}


@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
    return MODELS[request.param]()


def prompt(length: int, seed: int) -> list[int]:
    return torch.randint(3, 300, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def alone(model, ids: list[int], n: int) -> tuple[list[int], list[float]]:
    """`generate` on one prompt: its greedy tokens and the log-probability of each."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, pad_token_id=0, output_logits=True,
                             return_dict_in_generate=True)
    tokens = out.sequences[0, len(ids):].tolist()
    return tokens, [float(torch.log_softmax(step[0].float(), -1)[t]) for step, t in zip(out.logits, tokens)]


def greedy(n: int) -> Sampling:
    return Sampling(max_new_tokens=n, temperature=0, logprobs=0)


def logprobs(item: Collected) -> list[float]:
    return [entry["logprob"] for d in item.deltas for entry in d.logprobs]


def served(model, items: list[Collected], stagger: float = 0.0, **engine) -> list[Collected]:
    engine = Engine(model, Characters(), **engine)
    engine.start()
    try:
        return run_all(engine, items, stagger)
    finally:
        engine.stop()


# ---------------------------------------------------------------- the serving engine


def test_one_request_longer_than_the_window_answers_as_generate_alone(model):
    ids = prompt(20, seed=1)
    item = served(model, [Collected(ids, greedy(30))])[0]
    tokens, expected = alone(model, ids, 30)
    assert item.token_ids == tokens
    assert logprobs(item) == pytest.approx(expected, abs=1e-5)


def test_the_window_changes_the_answer_so_the_tests_above_see_it():
    ids, windowless = prompt(20, seed=1), mistral(window=None)
    windowless.load_state_dict(mistral().state_dict())
    assert alone(mistral(), ids, 30)[0] != alone(windowless, ids, 30)[0]


def test_requests_joining_and_leaving_mid_batch_each_answer_as_alone(model):
    # 5 requests, 3 rows at most: each joins while others generate, and leaves after its own length
    shapes = [(3, 25), (20, 7), (11, 18), (30, 12), (5, 30)]
    items = [Collected(prompt(n, seed=10 + i), greedy(new)) for i, (n, new) in enumerate(shapes)]
    for item, (_, new) in zip(served(model, items, stagger=0.02, max_batch=3), shapes):
        tokens, expected = alone(model, item.request.prompt_ids, new)
        assert item.token_ids == tokens
        assert logprobs(item) == pytest.approx(expected, abs=1e-5)


def test_prompts_prefilled_together_answer_as_each_alone(model):
    shapes = [(3, 20), (20, 9), (13, 16), (30, 12)]
    items = [Collected(prompt(n, seed=20 + i), greedy(new)) for i, (n, new) in enumerate(shapes)]
    engine = Engine(model, Characters(), max_batch=3, prefill_together=True)  # what vitune eval uses
    for item in items:  # all queued before the worker starts: 3 prefilled in one left-padded forward, then the 4th
        engine.submit(item.request)
    engine.start()
    try:
        for item in items:
            item.wait()
    finally:
        engine.stop()
    for item, (_, new) in zip(items, shapes):
        tokens, expected = alone(model, item.request.prompt_ids, new)
        assert item.token_ids == tokens
        assert logprobs(item) == pytest.approx(expected, abs=1e-5)


def test_gemma3_windows_its_sliding_layers_and_not_its_global_one():
    ids = prompt(24, seed=2)
    answer = served(gemma3(), [Collected(ids, greedy(24))])[0].token_ids
    assert answer == alone(gemma3(), ids, 24)[0]
    # the same weights with every layer global, or every layer sliding, answer otherwise
    for pattern in (["full_attention"] * 4, ["sliding_attention"] * 4):
        other = gemma3(pattern)
        other.load_state_dict(gemma3().state_dict())
        assert alone(other, ids, 24)[0] != answer, pattern


# after each step: Mistral keeps the last 8 columns (as generate's cache does); Gemma 3's global layer
# needs every column (20 + 30 - 1), and its sliding layers keep them all too
@pytest.mark.parametrize("build, columns", [(mistral, WINDOW), (gemma3, 20 + 30 - 1)], ids=["mistral", "gemma3"])
def test_the_cache_holds_the_window_when_every_layer_slides_and_everything_otherwise(build, columns):
    model, ids, widths = build(), prompt(20, seed=3), []
    engine = Engine(model, Characters())
    item = Collected(ids, greedy(30))

    def emit(delta):  # called by the worker after each step: the cache's columns then
        if engine.cache is not None:
            widths.append(engine.cache.layers[0].keys.shape[-2])
        item.emit(delta)

    item.request.emit = emit
    engine.start()
    try:
        run_all(engine, [item])
    finally:
        engine.stop()
    assert item.token_ids == alone(model, ids, 30)[0]
    assert max(widths) == columns


def test_a_cache_that_cannot_be_padded_is_refused_before_any_token():
    from transformers import Lfm2Config, Lfm2ForCausalLM

    torch.manual_seed(0)
    config = Lfm2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, layer_types=["conv", "full_attention"])
    item = served(Lfm2ForCausalLM(config).eval(), [Collected(prompt(12, seed=4), greedy(5))])[0]
    assert [(d.token_ids, d.finish_reason) for d in item.deltas] == [([], "error")]
    assert item.deltas[0].error == ("generation failed: RuntimeError: this model's cache layers (LinearAttentionLayer) "
                                    "cannot be batched by vitune serve")


# ---------------------------------------------------------------- eval, chat and RL rollouts


def test_eval_generation_answers_as_generate_alone(model):
    from vitune.eval.tasks import Scorer

    prompts = [prompt(n, seed=30 + n) for n in (4, 19, 12)]
    scorer = Scorer(model, Characters(), template=None, stop_ids=[], context=256, batch_size=2)
    assert scorer.generate(prompts, 16) == [Characters().decode(alone(model, ids, 16)[0]) for ids in prompts]


def test_chat_answers_as_generate_alone(model):
    from vitune.data.records import Conversation, Message
    from vitune.data.templates import get_template
    from vitune.infer.chat import ChatModel

    chat = ChatModel(model, Characters(), get_template("chatml"), stop_ids=[299])
    messages = [Message("user", "Ha Noi la thu do cua nuoc nao?")]  # characters under 300
    ids = Characters()(chat.template.prompt(Conversation(messages)))  # 80 tokens: past the window
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=24, do_sample=False, eos_token_id=[299], pad_token_id=0)
    answer = Characters().decode(out[0, ids["input_ids"].shape[1]:].tolist()).strip()
    assert chat.answer(messages, max_new_tokens=24) == answer


def test_rl_rollouts_left_padded_together_answer_as_each_alone(model):
    # TRL's GRPO/RLOO rollouts (train/stages/rl.py) are one generate over the prompts left-padded
    # together (GRPOTrainer._generate_single_turn), the model's own sliding-window cache included;
    # sampled there, greedy here to compare
    prompts = [prompt(n, seed=40 + n) for n in (5, 21, 13)]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert [row[width:].tolist() for row in out] == [alone(model, p, 20)[0] for p in prompts]
