"""The loss over the vocabulary computed a chunk of tokens at a time (vitune.models.chunked_loss)
equals transformers' own, loss and gradients, on tiny random models of real architectures: Llama
(its own lm_head), Qwen2 (head tied to the embeddings), Gemma 3 (tied, with and without
final_logit_softcapping); full fine-tuning and LoRA (the head frozen, or LoRA on the head itself);
padded rows and packed rows (position ids restarting, the head cut to the trained positions), with
-100 labels. Chunks of 5 tokens, so every batch takes several."""

from __future__ import annotations

import contextlib
import types

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config, TrainingArguments

from vitune.data.tokenize import IGNORE
from vitune.models import chunked_loss
from vitune.models.chunked_loss import causal_lm_loss, loss_path, next_tokens, token_logps
from vitune.eval.tasks import Scorer, token_losses
from vitune.models.attention import packed_attention
from vitune.train.collate import PackedCollator, PadCollator
from vitune.train.pairs import PreferenceCollator, sequence_logps
from vitune.train.trainer import VituneTrainer

VOCAB = 300
CHUNK = 5  # tokens per chunk in these tests
TOLERANCE = 1e-5
SHAPE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)
CONFIGS = {
    "llama": lambda: LlamaConfig(**SHAPE, tie_word_embeddings=False),
    "qwen2": lambda: Qwen2Config(**SHAPE, tie_word_embeddings=True),
    "gemma3": lambda: Gemma3TextConfig(**SHAPE, head_dim=8, sliding_window=6, final_logit_softcapping=None),
    "gemma3-softcapped": lambda: Gemma3TextConfig(**SHAPE, head_dim=8, sliding_window=6, final_logit_softcapping=3.0),
}
# several rows of different lengths, some tokens unscored (the prompt of a conversation)
ROWS = [(13, 4), (7, 2), (18, 9), (3, 1)]  # (length, unscored tokens at the start)


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(chunked_loss, "CHUNK_BYTES", 4 * VOCAB * CHUNK)


def tiny_model(arch: str, method: str = "full"):
    """A random model; LoRA on every linear layer ("lora": the head frozen) or on the head too ("lora-head")."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[arch](), dtype=torch.float32, attn_implementation="sdpa")
    if method == "full":
        return model
    targets = "all-linear" if method == "lora" else ["q_proj", "v_proj", "lm_head"]
    # init_lora_weights=False: B is random too, so that every LoRA weight gets a gradient
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets,
                                            init_lora_weights=False))


def rows() -> list[dict]:
    g = torch.Generator().manual_seed(1)
    out = []
    for length, unscored in ROWS:
        ids = torch.randint(1, VOCAB, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE] * unscored + ids[unscored:]})
    return out


def batch_of(layout: str) -> dict:
    if layout == "packed":
        data = rows()
        bins = [{"input_ids": sum((r["input_ids"] for r in data), []), "labels": sum((r["labels"] for r in data), []),
                 "seq_lengths": [len(r["input_ids"]) for r in data]}]
        return PackedCollator()(bins)
    return PadCollator(pad_token_id=0)(rows())


def gradients(model) -> dict[str, torch.Tensor]:
    out = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def assert_same_gradients(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys() and got
    worst = max((got[k] - expected[k]).abs().max().item() for k in got)
    assert worst < TOLERANCE, worst


def attention_for(model, layout: str):
    """Packed rows attend row by row (vitune's packed SDPA, as in training)."""
    return packed_attention(model) if layout == "packed" else contextlib.nullcontext()


# ---------------------------------------------------------------- the loss of sft and pt


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("method", ["full", "lora", "lora-head"])
@pytest.mark.parametrize("arch", list(CONFIGS))
def test_the_chunked_loss_and_its_gradients_equal_transformers(arch, method, layout):
    model = tiny_model(arch, method)
    batch = batch_of(layout)
    items = torch.tensor(50)  # num_items_in_batch: the step's trained tokens, more than this micro-batch's
    with attention_for(model, layout):
        plain = model(**batch, num_items_in_batch=items).loss
        plain.backward()
        expected = gradients(model)
        chunked = causal_lm_loss(model, {**batch, "num_items_in_batch": items}).loss
        chunked.backward()
    assert loss_path(model) == "chunked"
    assert abs(chunked.item() - plain.item()) < TOLERANCE
    assert_same_gradients(gradients(model), expected)
    if method == "full":  # the head's weight (or the embeddings it is tied to) trains and is compared
        assert any("lm_head" in k or "embed_tokens" in k for k in expected)


def test_without_num_items_in_batch_the_loss_is_the_mean_over_the_scored_tokens():
    model = tiny_model("llama")
    batch = batch_of("padded")
    plain = model(**batch).loss
    assert abs(causal_lm_loss(model, batch).loss.item() - plain.item()) < TOLERANCE


@pytest.mark.parametrize("method", ["full", "lora"])
def test_no_logits_wider_than_a_chunk_are_kept_for_the_backward(method):
    """Plain, the logits of the whole batch stay in memory until the backward; chunked, no logits are
    kept (a chunk's exist only while it runs, and again in the backward where the head trains)."""
    model = tiny_model("gemma3-softcapped", method)
    batch = batch_of("padded")
    weights = {p.data_ptr() for p in model.parameters()}  # the head's weight is saved too, but held anyway

    def logits_kept(compute) -> int:
        sizes = [0]

        def pack(t):
            if t.dim() > 1 and t.shape[-1] == VOCAB and t.data_ptr() not in weights:
                sizes.append(t.numel() // VOCAB)  # tokens
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            compute()
        return max(sizes)

    assert logits_kept(lambda: model(**batch).loss) == batch["input_ids"].numel()
    assert logits_kept(lambda: causal_lm_loss(model, batch).loss) == 0


def test_vitunes_trainer_computes_the_loss_in_chunks(tmp_path):
    """VituneTrainer (sft, pt) takes its loss from chunked_loss: the head never runs on more than a
    chunk of tokens, and the loss is Trainer's with the model's own forward."""
    model = tiny_model("llama", "lora")
    trainer = VituneTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True,
                                                                report_to="none", remove_unused_columns=False))
    batch = batch_of("padded")
    widest = []
    head = model.get_base_model().lm_head
    hook = head.register_forward_hook(lambda module, args, out: widest.append(out.shape[-2]))
    try:
        loss = trainer.compute_loss(model, batch, num_items_in_batch=torch.tensor(40))
    finally:
        hook.remove()
    assert widest == [0]  # the forward's own head call gets an empty slice; the chunks take the weight directly
    plain = model(**batch, num_items_in_batch=torch.tensor(40)).loss
    assert abs(loss.item() - plain.item()) < TOLERANCE


# ---------------------------------------------------------------- which loss runs


def test_liger_decides_first_then_the_chunks_then_the_models_own_forward(monkeypatch):
    model = tiny_model("llama", "lora")
    assert loss_path(model, liger=True) == "liger"
    assert loss_path(model) == "chunked"
    monkeypatch.delitem(chunked_loss.CHUNKED_ARCHITECTURES, "llama")  # an architecture not read here
    assert loss_path(model) == "plain"
    batch = batch_of("padded")
    assert abs(causal_lm_loss(model, batch).loss.item() - model(**batch).loss.item()) == 0


def test_weights_sharded_across_processes_take_the_models_own_forward():
    model = tiny_model("qwen2")
    model.lm_head.weight.ds_id = 7  # as DeepSpeed ZeRO-3 marks the weights it partitions
    assert loss_path(model) == "plain"


# ---------------------------------------------------------------- per-token log-probs: dpo, vitune eval


def reference_logps(model, sequences) -> torch.Tensor:
    """Each sequence alone through the model, the full logits' log-softmax at its trained tokens, summed."""
    out = []
    for ids, labels in sequences:
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
        target = torch.tensor(labels[1:])
        logps = torch.log_softmax(logits, -1).gather(1, target.clamp(min=0)[:, None])[:, 0]
        out.append(logps[target != IGNORE].sum())
    return torch.stack(out)


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("arch", ["llama", "gemma3-softcapped"])
def test_dpos_sequence_log_probs_and_their_gradients_equal_the_full_logits(arch, method, layout):
    model = tiny_model(arch, method)
    data = rows()
    sequences = [(r["input_ids"], r["labels"]) for r in data]
    items = [{"sequences": sequences[i:i + 2], "margin": 0.0, "desirable": [True, False]} for i in (0, 2)]
    batch = PreferenceCollator(packed=layout == "packed", pad_token_id=0)(items)
    weights = torch.tensor([0.3, -1.2, 2.0, 0.7])  # a loss that weighs each sequence differently, as dpo's does
    expected_logps = reference_logps(model, sequences)
    (expected_logps * weights).sum().backward()
    expected = gradients(model)
    with attention_for(model, layout):
        logps, counts = sequence_logps(model, batch)
        (logps * weights).sum().backward()
    assert (logps - expected_logps).abs().max().item() < TOLERANCE
    assert counts.tolist() == [length - unscored for length, unscored in ROWS]
    assert_same_gradients(gradients(model), expected)


@pytest.mark.parametrize("arch, frozen", [("qwen2", False), ("gemma3-softcapped", True)])
def test_vitune_evals_token_losses_equal_the_full_logits(arch, frozen):
    model = tiny_model(arch).eval().requires_grad_(not frozen)  # a frozen head takes the fused path
    data = [(r["input_ids"], r["labels"]) for r in rows()]
    scorer = Scorer(model, types.SimpleNamespace(pad_token_id=0, eos_token_id=1), None, [], context=128, batch_size=3)
    with torch.no_grad():
        expected = (-reference_logps(model, data)).tolist()
    got = token_losses(scorer, data)
    assert [count for _, count in got] == [length - unscored for length, unscored in ROWS]
    assert max(abs(nll - e) for (nll, _), e in zip(got, expected)) < TOLERANCE


def test_token_logps_name_the_row_of_each_token():
    model = tiny_model("llama")
    batch = batch_of("padded")
    with torch.no_grad():
        logps, in_row = token_logps(model, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
                                    next_tokens(batch))
        full = torch.log_softmax(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, -1)
    target = next_tokens(batch)
    scored = target != IGNORE
    assert in_row.tolist() == scored.nonzero()[:, 0].tolist()
    assert torch.allclose(logps, full[scored].gather(1, target[scored][:, None])[:, 0], atol=TOLERANCE)
    assert F.cross_entropy(full[scored], target[scored]).item() == pytest.approx(-logps.mean().item(), abs=TOLERANCE)
