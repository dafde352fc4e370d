"""Several processes train exactly what one process trains at the same global batch (processes x
micro_batch_size x gradient_accumulation), at every step, the epochs' short last batches included:
no item is repeated to even out the last batch (accelerate's even_batches did), a process with an
empty share runs a filler that weighs nothing, and every loss is normalised by the items of the
whole optimizer step (tokens for sft and pt, pairs for rm and dpo). Real `vitune train --nproc 2`
runs on CPU processes (gloo) against one process.

The data: 46 Alpaca rows packed into 21 bins of 256 tokens; global batch 4 over 2 epochs is 6 steps
an epoch, whose last holds 1 bin: one process trains it, the other runs a filler.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vitune.cli import main
from vitune.train.shares import RankShares, split_batch

from conftest import ROOT, write_config
from test_fsdp import deepspeed_config
from test_resume import losses

STEPS = 12  # 2 epochs x ceil(21 bins / 4)


# ---------------------------------------------------------------- the split itself


def test_a_full_batch_is_dealt_as_accelerate_deals_it_and_a_short_one_unevenly():
    assert split_batch([0, 1, 2, 3], 2) == [[0, 1], [2, 3]]
    assert split_batch([0, 1, 2], 2) == [[0, 1], [2]]
    assert split_batch([7], 2) == [[7], []]
    assert split_batch([4, 5, 6, 7, 8], 4) == [[4, 5], [6], [7], [8]]
    assert split_batch([9], 3) == [[9], [], []]


@pytest.mark.parametrize("processes", [2, 3, 4])
@pytest.mark.parametrize("micro_batch", [1, 2, 3])
def test_every_item_once_per_epoch_and_every_process_the_same_number_of_micro_batches(processes, micro_batch):
    for items in range(1, 30):
        shares = [list(RankShares(range(items), micro_batch, processes, rank)) for rank in range(processes)]
        steps = -(-items // (micro_batch * processes))
        assert [len(s) for s in shares] == [steps] * processes
        assert all(len(RankShares(range(items), micro_batch, processes, rank)) == steps for rank in range(processes))
        # step by step, the processes' shares laid side by side are the global batch, in order
        for step in range(steps):
            together = [i for rank in range(processes) for i in shares[rank][step]]
            assert together == list(range(step * micro_batch * processes, min(items, (step + 1) * micro_batch * processes)))
            assert all(len(shares[rank][step]) <= micro_batch for rank in range(processes))
        seen = sorted(i for share in shares for batch in share for i in batch)
        assert seen == list(range(items))  # each exactly once: nothing repeated, nothing dropped


def test_drop_last_drops_the_short_global_batch_on_every_process():
    shares = [list(RankShares(range(21), 2, 2, rank, drop_last=True)) for rank in (0, 1)]
    assert shares == [[[0, 1], [4, 5], [8, 9], [12, 13], [16, 17]], [[2, 3], [6, 7], [10, 11], [14, 15], [18, 19]]]
    assert len(RankShares(range(21), 2, 2, 0, drop_last=True)) == 5


# ---------------------------------------------------------------- real runs


def run_config(tmp_path: Path, model: Path, name: str, stage: str = "sft", **train) -> Path:
    if stage in ("rm", "dpo"):
        data = {"train": [{"path": str(ROOT / "data" / "preference_vi.jsonl"), "max_samples": 21}],
                "eval": [{"path": str(ROOT / "data" / "preference_vi_eval.jsonl"), "max_samples": 9}],
                "max_length": 512}
    else:
        data = {"train": [{"path": str(ROOT / "data" / "alpaca_vi.jsonl"), "max_samples": 46}],
                "eval": [{"path": str(ROOT / "data" / "qa_vi_eval.jsonl"), "max_samples": 29}], "max_length": 256}
    return write_config(
        tmp_path / f"{name}.yaml",
        model={"name_or_path": str(model)},
        method={"type": "lora", "lora": {"dropout": 0.0}},
        data=data,
        train={"stage": stage, "epochs": 2, "learning_rate": 1e-3, "optimizer": "adamw_torch",
               "output_dir": str(tmp_path / name), "logging_steps": 1, "eval_steps": 6, "report_to": ["none"], **train},
    )


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def held_out(run: Path, key: str = "eval_loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in records(run) if key in r}


def logged(run: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in records(run) if "loss" in r}


def assert_same_run(two: Path, one: Path, metrics: tuple[str, ...] = ()) -> None:
    """Every step's loss, every held-out figure (before training, at steps 6 and 12) within 1e-5."""
    assert losses(two).keys() == losses(one).keys() == set(range(1, STEPS + 1))
    assert max(abs(losses(two)[s] - losses(one)[s]) for s in losses(one)) < 1e-5
    for key in ("eval_loss", *(f"eval_{m}" for m in metrics)):
        assert held_out(two, key).keys() == held_out(one, key).keys() == {0, 6, 12}
        assert max(abs(held_out(two, key)[s] - held_out(one, key)[s]) for s in (0, 6, 12)) < 1e-5
    for key in metrics:
        assert max(abs(logged(two, key)[s] - logged(one, key)[s]) for s in range(1, STEPS + 1)) < 1e-5


@pytest.fixture(scope="module")
def sft_one(tiny_llama, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("sft-one")
    assert main(["train", str(run_config(tmp, tiny_llama, "one", micro_batch_size=4))]) == 0
    return tmp / "one"


def test_two_processes_train_exactly_what_one_does_across_both_epoch_ends(sft_one, tiny_llama, tmp_path, capfd):
    assert main(["train", str(run_config(tmp_path, tiny_llama, "two", micro_batch_size=2)), "--nproc", "2"]) == 0
    assert "packing: 46 rows -> 21 bins of 256 tokens" in capfd.readouterr().out  # the last batch of an epoch: 1 bin
    two = tmp_path / "two"
    assert_same_run(two, sft_one)
    # the run's tokens (both processes), step by step: the filler counts nowhere, no bin twice
    assert logged(two, "real_tokens") == logged(sft_one, "real_tokens")
    assert json.loads((two / "summary.json").read_text())["real_tokens"] == \
        json.loads((sft_one / "summary.json").read_text())["real_tokens"]


@pytest.mark.slow  # CI's 20-minute budget (fresh-clone durations, 2026-12-08); make test-all runs it
def test_padded_rows_too(tiny_llama, tmp_path):
    """21 rows padded (packing off): the same epoch ends, rows instead of bins; 29 held-out rows (the
    last held-out batch: 1 row)."""
    padded = ["--set", "data.packing=false", "--set", "data.train.0.max_samples=21"]
    assert main(["train", str(run_config(tmp_path, tiny_llama, "one", micro_batch_size=4)), *padded]) == 0
    assert main(["train", str(run_config(tmp_path, tiny_llama, "two", micro_batch_size=2)), "--nproc", "2", *padded]) == 0
    assert_same_run(tmp_path / "two", tmp_path / "one")
    assert logged(tmp_path / "two", "real_tokens") == logged(tmp_path / "one", "real_tokens")


@pytest.mark.slow  # CI's 20-minute budget (fresh-clone durations, 2026-12-08); make test-all runs it
def test_gradient_accumulation_with_the_epoch_end_in_the_middle_of_a_step(tiny_llama, tmp_path):
    """1 bin x 2 accumulation x 2 processes (against 2 bins x 2 accumulation): 11 micro-batches an epoch,
    so the epoch's last step has only one, holding one bin (the other process runs a filler)."""
    assert main(["train", str(run_config(tmp_path, tiny_llama, "one", micro_batch_size=2, gradient_accumulation=2))]) == 0
    two = run_config(tmp_path, tiny_llama, "two", micro_batch_size=1, gradient_accumulation=2)
    assert main(["train", str(two), "--nproc", "2"]) == 0
    assert_same_run(tmp_path / "two", tmp_path / "one")
    assert logged(tmp_path / "two", "real_tokens") == logged(tmp_path / "one", "real_tokens")


@pytest.mark.slow  # CI's 20-minute budget (fresh-clone durations, 2026-12-08); make test-all runs it
@pytest.mark.parametrize("stage", ["dpo", "rm"])
def test_pair_stages_normalise_by_the_pairs_of_the_step(stage, tiny_llama, tmp_path):
    """21 training pairs (the epoch's last batch: 1 pair) and 9 held-out pairs (the last: 1 pair): the
    loss and the stage's metrics, in training and held out, as one process computes them."""
    assert main(["train", str(run_config(tmp_path, tiny_llama, "one", stage, micro_batch_size=4))]) == 0
    assert main(["train", str(run_config(tmp_path, tiny_llama, "two", stage, micro_batch_size=2)), "--nproc", "2"]) == 0
    assert_same_run(tmp_path / "two", tmp_path / "one", ("rewards/accuracy", "rewards/margin"))


@pytest.mark.slow  # 29 s; CI keeps test_fsdp's sharding and the other even-split runs
def test_fsdp2_shards_and_still_trains_exactly_what_one_process_does(sft_one, tiny_llama, tmp_path):
    """The filler micro-batch joins FSDP's parameter gathers (forward) and gradient reduce-scatters
    (backward) in training and in evaluation: no process waits forever, and the losses are one process's."""
    fsdp = ROOT / "examples" / "fsdp" / "fsdp2.yaml"
    two = run_config(tmp_path, tiny_llama, "two", micro_batch_size=2, fsdp=str(fsdp))
    assert main(["train", str(two), "--nproc", "2"]) == 0
    assert json.loads((tmp_path / "two" / "sharding.json").read_text())["world_size"] == 2
    assert_same_run(tmp_path / "two", sft_one)


@pytest.mark.slow  # DeepSpeed's first run compiles an op (~3 min on 2 cores); then ~40 s each
@pytest.mark.parametrize("zero", [2, 3])
def test_deepspeed_zero_trains_exactly_what_one_process_does(zero, sft_one, tiny_llama, tmp_path):
    """ZeRO-3 gathers the parameters in every forward: the filler takes part, in training and held out."""
    pytest.importorskip("deepspeed")
    two = run_config(tmp_path, tiny_llama, "two", micro_batch_size=2, deepspeed=str(deepspeed_config(zero, tmp_path)))
    assert main(["train", str(two), "--nproc", "2"]) == 0
    assert_same_run(tmp_path / "two", sft_one)
