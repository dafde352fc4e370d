"""Checkpoints that survive a crash and exact resume: real runs killed with SIGKILL and
SIGTERM, a crash inside a save, refusal when the run changed, seed reproducibility."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from vitune.cli import main
from vitune.train.checkpoint import MARKER, STAGING, complete_checkpoints

from conftest import ROOT, write_config

STEPS = 12


def run_config(tmp_path: Path, model: Path, out: Path, **train) -> Path:
    return write_config(
        tmp_path / f"{out.name}.yaml",
        model={"name_or_path": str(model)},
        method={"type": "full"},
        data={"train": [{"path": str(ROOT / "data" / "alpaca_vi.jsonl"), "max_samples": 96}], "max_length": 256},
        train={"max_steps": STEPS, "micro_batch_size": 2, "learning_rate": 1e-3, "output_dir": str(out),
               "logging_steps": 1, "save_steps": 4, "report_to": ["none"], **train},
    )


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r}


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return x.keys() == y.keys() and all(bool((x[k] == y[k]).all()) for k in x)


@pytest.fixture(scope="module")
def reference(tiny_llama, tmp_path_factory) -> Path:
    """An uninterrupted run."""
    tmp = tmp_path_factory.mktemp("reference")
    out = tmp / "uninterrupted"
    assert main(["train", str(run_config(tmp, tiny_llama, out))]) == 0
    return out


def start(config: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "vitune", "train", str(config)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_kill_9_then_resume_is_bit_identical(reference, tiny_llama, tmp_path):
    out = tmp_path / "killed"
    config = run_config(tmp_path, tiny_llama, out)
    proc = start(config)
    wait_for(out / "checkpoint-4" / MARKER, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "summary.json").exists()
    resume_point = complete_checkpoints(out)[-1]
    assert main(["train", str(config), "--set", "train.resume=auto"]) == 0
    assert same_weights(out, reference)
    after = int(resume_point.name.split("-")[1])
    assert {s: l for s, l in losses(out).items() if s > after} == {s: l for s, l in losses(reference).items() if s > after}
    assert sorted(losses(out)) == list(range(1, STEPS + 1))  # each step logged once


def test_a_crash_inside_a_save_leaves_no_complete_checkpoint(reference, tiny_llama, tmp_path, monkeypatch):
    import vitune.train.trainer as checkpoint  # the trainer's save calls write_marker (train/checkpoint.py)

    out = tmp_path / "crashed"
    config = run_config(tmp_path, tiny_llama, out)
    real_write = checkpoint.write_marker

    def crash_at_step_8(folder, *args):
        if folder.name == "checkpoint-8":
            raise OSError("disk full (simulated)")
        real_write(folder, *args)

    monkeypatch.setattr(checkpoint, "write_marker", crash_at_step_8)
    with pytest.raises(OSError, match="simulated"):
        main(["train", str(config)])
    monkeypatch.undo()
    assert not (out / "checkpoint-8").exists()
    assert (out / STAGING / "checkpoint-8").is_dir()  # the half-written one stays in staging
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-4"]
    assert main(["train", str(config), "--set", "train.resume=auto"]) == 0
    assert same_weights(out, reference)


def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(reference, tiny_llama, tmp_path):
    out = tmp_path / "terminated"
    config = run_config(tmp_path, tiny_llama, out, save_steps=None)
    proc = start(config)
    wait_for(out / "metrics.jsonl", proc)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 143, output
    (saved,) = complete_checkpoints(out)
    assert f"checkpoint saved in {out}/{saved.name}. Resume with: vitune train CONFIG --set train.resume=auto" in " ".join(output.split())
    assert not (out / "summary.json").exists()
    assert main(["train", str(config), "--set", "train.resume=auto"]) == 0
    assert same_weights(out, reference)


def test_resume_refuses_changed_data(reference, tiny_llama, tmp_path, capsys):
    out = tmp_path / "changed"
    config = run_config(tmp_path, tiny_llama, out, max_steps=4)
    assert main(["train", str(config)]) == 0
    capsys.readouterr()
    assert main(["train", str(config), "--set", "train.resume=auto", "--set", "train.max_steps=8",
                 "--set", "data.train.0.max_samples=90"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: cannot resume from {out}/checkpoint-4: the data (files, tokenizer, template or data settings) "
        "changed since it was written. Start fresh with --set train.resume=false --set train.overwrite=true, "
        "or resume anyway with --set train.resume_strict=false"
    )
    assert main(["train", str(config), "--set", "train.resume=auto", "--set", "data.max_length=128"]) == 2
    assert "data.max_length (256 -> 128)" in capsys.readouterr().err


def test_resume_auto_without_checkpoints_in_a_used_folder_refuses(tiny_llama, tmp_path, capsys):
    out = tmp_path / "used"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    config = run_config(tmp_path, tiny_llama, out, max_steps=2)
    assert main(["train", str(config), "--set", "train.resume=auto"]) == 2
    assert "already exists and is not empty and holds no complete checkpoint to resume from" in capsys.readouterr().err


def test_same_seed_same_losses_with_lora_dropout(tiny_llama, tmp_path):
    runs = []
    for name in ("one", "two"):
        out = tmp_path / name
        config = run_config(tmp_path, tiny_llama, out, max_steps=6, save_steps=None)
        assert main(["train", str(config), "--set", "method.type=lora", "--set", "method.lora.dropout=0.1"]) == 0
        runs.append(losses(out))
    assert runs[0] == runs[1]
    out = tmp_path / "other-seed"
    config = run_config(tmp_path, tiny_llama, out, max_steps=6, save_steps=None, seed=7)
    assert main(["train", str(config), "--set", "method.type=lora", "--set", "method.lora.dropout=0.1"]) == 0
    assert losses(out) != runs[0]


@pytest.mark.slow  # CI's 20-minute budget (fresh-clone durations, 2026-12-08); make test-all runs it
def test_two_processes_give_the_losses_of_one_and_only_rank_0_writes(tiny_llama, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", str(run_config(tmp_path, tiny_llama, one, max_steps=3, save_steps=None, micro_batch_size=2))]) == 0
    config = run_config(tmp_path, tiny_llama, two, max_steps=3, save_steps=None, micro_batch_size=1)
    assert main(["train", str(config), "--nproc", "2"]) == 0
    # the same global batch (2 processes x 1 bin = 1 process x 2 bins): the same token-exact losses
    assert losses(two).keys() == losses(one).keys() == {1, 2, 3}
    assert all(abs(losses(two)[s] - losses(one)[s]) < 1e-4 for s in (1, 2, 3))
    assert [r["step"] for r in map(json.loads, (two / "metrics.jsonl").read_text().splitlines())] == [1, 2, 3]
    assert json.loads((two / "summary.json").read_text())["steps"] == 3
    assert sorted(p.name for p in two.iterdir() if p.suffix in (".json", ".yaml", ".jsonl")) == [
        "config.json", "config.yaml", "data_report.json", "generation_config.json", "metrics.jsonl",
        "progress.json", "summary.json", "tokenizer.json", "tokenizer_config.json"]


@pytest.mark.slow  # CI's 20-minute budget (fresh-clone durations, 2026-12-08); make test-all runs it
def test_resume_from_a_renamed_checkpoint_folder_reads_its_step(reference, tiny_llama, tmp_path):
    # the step comes from Trainer's state in the folder, not from its name
    import shutil

    out = tmp_path / "renamed"
    config = run_config(tmp_path, tiny_llama, out)
    assert main(["train", str(config)]) == 0
    kept = tmp_path / "my-good-checkpoint"
    shutil.copytree(out / "checkpoint-4", kept)
    shutil.rmtree(out)
    config = run_config(tmp_path, tiny_llama, out, resume=str(kept))
    assert main(["train", str(config)]) == 0
    assert same_weights(out, reference)


def test_a_damaged_checkpoint_marker_is_one_line(tiny_llama, tmp_path, capsys):
    out = tmp_path / "damaged"
    config = run_config(tmp_path, tiny_llama, out, max_steps=4)
    assert main(["train", str(config)]) == 0
    (out / "checkpoint-4" / MARKER).write_text("{not json", encoding="utf-8")
    assert main(["train", str(config), "--set", f"train.resume={out / 'checkpoint-4'}"]) == 2
    err = capsys.readouterr().err
    assert f"{out / 'checkpoint-4' / MARKER} is damaged (JSONDecodeError" in " ".join(err.split())
