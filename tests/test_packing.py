"""Packing: bins, packed batches, attention that stays inside each row, token-exact loss
(packed = padded = one row at a time, with and without gradient accumulation, full and
LoRA), and the throughput telemetry of a run."""

from __future__ import annotations

import json
from contextlib import nullcontext

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, TrainingArguments

from vitune.config import validate_config
from vitune.data.packing import best_fit_decreasing, pack_rows, packing_efficiency
from vitune.data.pipeline import prepare_sft_data
from vitune.data.templates import resolve_template
from vitune.data.tokenize import IGNORE, TokenizedRow
from vitune.errors import UserError
from vitune.models.attention import PACKED_SDPA, packed_attention
from vitune.models.loading import load_model
from vitune.train.collate import PackedCollator, PadCollator
from vitune.train.arguments import plan_speed
from vitune.train.runner import run_training
from vitune.train.trainer import VituneTrainer

from conftest import ROOT

ALPACA = ROOT / "data" / "alpaca_vi.jsonl"
SHAREGPT = ROOT / "data" / "sharegpt_vi.jsonl"


def row(ids: list[int], trained_from: int) -> TokenizedRow:
    return TokenizedRow(ids, [IGNORE] * trained_from + ids[trained_from:])


# ---------------------------------------------------------------- bins


def test_best_fit_decreasing_puts_each_row_in_the_fullest_bin_it_fits():
    # 8 opens bin 0 (2 left), 6 bin 1 (4 left), 5 bin 2 (5 left); 3 fits best in bin 1,
    # 2 exactly fills bin 0.
    assert best_fit_decreasing([5, 3, 8, 2, 6], capacity=10) == [[2, 3], [4, 1], [0]]


def test_bins_respect_max_length_and_keep_every_row_whole_exactly_once():
    lengths = [(i * 37) % 97 + 1 for i in range(300)]
    rows = [row(list(range(1000 * i, 1000 * i + n)), n // 2) for i, n in enumerate(lengths)]
    bins = pack_rows(rows, max_length=128)
    assert all(len(b.input_ids) <= 128 and sum(b.seq_lengths) == len(b.input_ids) == len(b.labels) for b in bins)
    unpacked = []
    for b in bins:
        start = 0
        for n in b.seq_lengths:
            unpacked.append((tuple(b.input_ids[start:start + n]), tuple(b.labels[start:start + n])))
            start += n
    assert sorted(unpacked) == sorted((tuple(r.input_ids), tuple(r.labels)) for r in rows)
    assert packing_efficiency(bins, 128) > 0.97


def test_a_row_longer_than_a_bin_is_refused():
    with pytest.raises(ValueError, match="a row of 11 tokens does not fit in a bin of 10"):
        best_fit_decreasing([3, 11], capacity=10)


# ---------------------------------------------------------------- batches


def packed_items(rows, max_length):
    return [vars(b) for b in pack_rows(rows, max_length)]


def test_packed_batch_restarts_positions_and_never_trains_a_first_token():
    bins = [{"input_ids": [11, 12, 13, 21, 22], "labels": [11, 12, 13, 21, 22], "seq_lengths": [3, 2]},
            {"input_ids": [31, 32, 33, 34], "labels": [IGNORE, IGNORE, 33, 34], "seq_lengths": [4]}]
    batch = PackedCollator(trim_lm_head=False)(bins)
    assert batch["input_ids"].tolist() == [[11, 12, 13, 21, 22, 31, 32, 33, 34]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert batch["labels"].tolist() == [[IGNORE, 12, 13, IGNORE, 22, IGNORE, IGNORE, 33, 34]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 9] and batch["max_length_q"] == 4
    assert "attention_mask" not in batch and batch["use_cache"] is False  # nothing is padded, no KV cache


def test_lm_head_runs_only_where_the_next_token_is_trained():
    bins = [{"input_ids": [11, 12, 13, 21, 22], "labels": [11, 12, 13, 21, 22], "seq_lengths": [3, 2]},
            {"input_ids": [31, 32, 33, 34], "labels": [IGNORE, IGNORE, 33, 34], "seq_lengths": [4]}]
    batch = PackedCollator()(bins)
    # position t predicts label t+1: 11->12, 12->13, 21->22, 32->33, 33->34; never 13->21
    assert batch["logits_to_keep"].tolist() == [0, 1, 3, 6, 7]
    assert batch["shift_labels"].tolist() == [[12, 13, 22, 33, 34]]


def test_attention_never_crosses_rows(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa").eval()
    rows = [row([5, 17, 42, 99, 7, 8], 0), row([300, 301, 302], 0), row([64, 65, 66, 67, 68], 0)]
    batch = PackedCollator(trim_lm_head=False)([vars(b) for b in pack_rows(rows, 16)])
    with torch.no_grad():
        dense = model(**batch).logits  # transformers' SDPA with its packed-sequence mask
        with packed_attention(model):
            assert model.config._attn_implementation == PACKED_SDPA
            row_wise = model(**batch).logits
        alone = torch.cat([model(input_ids=torch.tensor([r.input_ids])).logits for r in rows], dim=1)
    assert model.config._attn_implementation == "sdpa"  # given back as it was
    order = [len(r.input_ids) for r in rows]
    alone = torch.cat(sorted(alone.split(order, dim=1), key=lambda t: -t.shape[1]), dim=1)  # bins hold rows longest first
    assert torch.allclose(row_wise, alone, atol=1e-5)
    assert torch.allclose(dense, alone, atol=1e-5)


# ---------------------------------------------------------------- token-exact loss


class GradCatcher(TrainerCallback):
    """The gradients of the first optimizer step, just before the optimizer uses them."""

    def __init__(self, model):
        self.model, self.grads = model, None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.grad is not None}


def first_step(model_dir, items, collator, micro_batch, accumulation, tmp_path, lora=False):
    """(loss, gradients) of one optimizer step over all `items`."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.float32)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                                  init_lora_weights=False, task_type="CAUSAL_LM"))
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=micro_batch, gradient_accumulation_steps=accumulation,
        max_steps=1, learning_rate=1e-3, max_grad_norm=0.0, logging_steps=1, report_to="none", use_cpu=True,
        remove_unused_columns=False, disable_tqdm=True, save_strategy="no",
    )
    catcher = GradCatcher(model)
    trainer = VituneTrainer(model=model, args=args, train_dataset=items, data_collator=collator, callbacks=[catcher])
    assert trainer.model_accepts_loss_kwargs  # num_items_in_batch reaches the loss, PEFT or not
    with packed_attention(model) if isinstance(collator, PackedCollator) else nullcontext():
        trainer.train()
    return trainer.state.log_history[0]["loss"], catcher.grads


@pytest.fixture(scope="module")
def sft_rows(tiny_models):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    config = validate_config({"model": {"name_or_path": str(tiny_models["llama"])},
                              "data": {"train": [{"path": str(SHAREGPT), "max_samples": 3}, {"path": str(ALPACA), "max_samples": 4}],
                                       "max_length": 384}})
    rows, _, _ = prepare_sft_data(config.data, tokenizer, resolve_template("auto", tokenizer), seed=0)
    return rows


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_packed_step_equals_rows_one_at_a_time(tiny_models, sft_rows, tmp_path, lora):
    model_dir = tiny_models["llama"]
    one_by_one = [{"input_ids": r.input_ids, "labels": r.labels} for r in sft_rows]
    bins = packed_items(sft_rows, 384)
    assert 1 < len(bins) < len(sft_rows)
    single = first_step(model_dir, one_by_one, PadCollator(0), 1, len(sft_rows), tmp_path, lora)
    packed = first_step(model_dir, bins, PackedCollator(), len(bins), 1, tmp_path, lora)
    packed_accumulated = first_step(model_dir, bins, PackedCollator(), -(-len(bins) // 2), 2, tmp_path, lora)
    untrimmed = first_step(model_dir, bins, PackedCollator(trim_lm_head=False), len(bins), 1, tmp_path, lora)
    for loss, grads in (packed, packed_accumulated, untrimmed):
        assert loss == pytest.approx(single[0], abs=1e-5)
        assert grads.keys() == single[1].keys() and len(grads) > 0
        for name, grad in grads.items():
            assert torch.allclose(grad, single[1][name], atol=1e-5), name


# ---------------------------------------------------------------- runs


def run_config(model, out, packing, **train):
    return validate_config({
        "model": {"name_or_path": str(model)},
        "method": {"type": "full"},
        "data": {"train": [{"path": str(ALPACA), "max_samples": 16}], "max_length": 256, "packing": packing},
        "train": {"max_steps": 8, "micro_batch_size": 16, "learning_rate": 3e-3, "warmup_ratio": 0.0, "output_dir": str(out),
                  "logging_steps": 1, "report_to": ["none"], **train},
    })


@pytest.mark.slow  # CI's 20-minute budget (fresh-clone durations, 2026-12-08); make test-all runs it
def test_packed_run_reaches_the_loss_of_a_padded_run(tiny_llama, tmp_path):
    # One micro-batch holds every row, so each optimizer step sees the same tokens packed or
    # padded: with a token-exact loss both runs follow the same path.
    padded = run_training(run_config(tiny_llama, tmp_path / "padded", packing=False), None).summary
    packed = run_training(run_config(tiny_llama, tmp_path / "packed", packing=True), None).summary
    assert packed["real_tokens"] == padded["real_tokens"]
    assert packed["final_loss"] < padded["first_loss"] - 2.0  # it learnt something
    assert packed["final_loss"] == pytest.approx(padded["final_loss"], abs=2e-3)
    assert padded["padding_fraction"] > 0.2 and packed["padding_fraction"] == 0.0
    assert 0.6 < packed["packing_efficiency"] <= 1.0


def test_telemetry_in_metrics_progress_and_summary(tiny_llama, tmp_path):
    out = tmp_path / "run"
    summary = run_training(run_config(tiny_llama, out, packing=True, max_steps=2, micro_batch_size=2), None).summary
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all({"real_tokens", "tokens_per_s", "padding_fraction", "tflops"} <= set(m) for m in metrics if "loss" in m)
    assert {"tokens_per_s", "padding_fraction", "packing_efficiency", "tflops", "mfu", "peak_memory_gib"} <= set(summary)
    assert summary["mfu"] is None and summary["peak_memory_gib"] is None  # CPU: no known peak, no CUDA memory
    assert summary["tflops"] > 0
    assert summary["speed"] == "packing on, attention sdpa (row by row), liger off, activation checkpointing off"
    assert json.loads((out / "summary.json").read_text()) == summary


def test_bloom_trains_padded_unless_packing_was_asked_for(tiny_models):
    def plan(**data):
        config = validate_config({"model": {"name_or_path": str(tiny_models["bloom"])},
                                  "data": {"train": [{"path": str(ALPACA)}], **data}})
        return plan_speed(config, load_model(config.model, config.method))

    assert plan().packing is False  # the default yields to an architecture that cannot pack
    with pytest.raises(UserError, match="data.packing: true, but bloom models cannot keep packed rows apart"):
        plan(packing=True)


# ---------------------------------------------------------------- GPU settings, decided on any machine


def test_checkpointing_auto_spends_spare_gpu_memory_on_speed(tiny_llama, monkeypatch):
    from types import SimpleNamespace

    from vitune.train import gpu

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)  # 4 layers, fp32
    assert gpu.checkpointing_plan("auto", model, 8192, liger=False, full_fine_tuning=True) == 0  # CPU: never
    assert gpu.checkpointing_plan(True, model, 8192, liger=False, full_fine_tuning=True) == 1

    def plan_with(gib):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _: SimpleNamespace(total_memory=gib * 2**30))
        return gpu.checkpointing_plan("auto", model, 8192, liger=True, full_fine_tuning=True)

    # per token and layer (16*256 + 6*688) * 4 bytes = 32.9 kB, so 8,192 tokens x 4 layers = 1.03 GiB
    # of activations above ~1.1 GiB of weights, Adam state and slack
    assert plan_with(80) == 0  # everything fits: no recomputation
    assert plan_with(2.2) == 4  # only layer 0 checkpointed
    assert plan_with(2.0) == 3  # layers 0 and 3
    assert plan_with(1.0) == 1  # every layer, the smallest it can be


def test_liger_is_applied_only_where_it_can_run(tiny_models):
    from vitune.train.gpu import use_liger

    llama = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    assert use_liger("auto", llama) is False  # no GPU here
    assert use_liger(False, llama) is False
    with pytest.raises(UserError, match="train.liger_kernel: true needs"):
        use_liger(True, llama)
