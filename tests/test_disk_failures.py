"""A full or failing disk while saving: the half-written checkpoint goes, the last complete
one stays and a later `train.resume=auto` run finishes from it; one line, exit 74.

The failures are injected in-process into the three writers a save goes through, each
failing the way it does on a real full disk: safetensors (SafetensorError "... os error 28"),
torch.save and Python's own file writes (OSError with an errno), after part of the file is
written.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
import transformers.modeling_utils
from safetensors import SafetensorError
from safetensors.torch import load_file

from vitune.cli import main
from vitune.errors import DiskError
from vitune.train.checkpoint import STAGING, complete_checkpoints, disk_failure, final_save
from vitune.train.run_lock import lock_file

from conftest import ROOT, write_config

ENOSPC_FROM_SAFETENSORS = "Error while serializing: I/O error: No space left on device (os error 28)"


def run_config(tmp_path: Path, model: Path, out: Path, max_steps: int, **train) -> Path:
    return write_config(
        tmp_path / f"{out.name}.yaml",
        model={"name_or_path": str(model)},
        method={"type": "full"},
        data={"train": [{"path": str(ROOT / "data" / "alpaca_vi.jsonl"), "max_samples": 32}], "max_length": 128},
        train={"micro_batch_size": 2, "learning_rate": 1e-3, "output_dir": str(out),
               "max_steps": max_steps, "logging_steps": 1, "save_steps": 2, "report_to": ["none"], **train},
    )


def fail_safetensors_write(monkeypatch, target: Path) -> None:
    """Writing `target` with safetensors writes 100 bytes, then the disk is full."""
    real = transformers.modeling_utils.safe_save_file

    def save_file(tensors, filename, metadata=None):
        if Path(filename) == target:
            Path(filename).write_bytes(b"\0" * 100)
            raise SafetensorError(ENOSPC_FROM_SAFETENSORS)
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", save_file)


def one_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_a_full_disk_in_a_checkpoint_keeps_the_last_complete_one_and_resume_finishes(tiny_llama, tmp_path, capsys,
                                                                                   monkeypatch):
    out = tmp_path / "full"
    config = run_config(tmp_path, tiny_llama, out, max_steps=4, save_total_limit=1)  # rotation must keep checkpoint-2
    fail_safetensors_write(monkeypatch, out / STAGING / "checkpoint-4" / "model.safetensors")
    assert main(["train", str(config)]) == 74
    assert one_line(capsys) == (
        f"error: disk full while saving checkpoint-4 to {out} (No space left on device); the last complete "
        f"checkpoint is {out}/checkpoint-2; free space and resume with --set train.resume=auto"
    )
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-2"]
    assert not (out / STAGING).exists() and not (out / "checkpoint-4").exists()  # the half-written one is gone
    assert not (out / "summary.json").exists()
    assert not lock_file(out).exists()
    monkeypatch.undo()

    # The resume also shows what it reads back: Trainer's state through torch.load(weights_only=True).
    loads = []
    real_load = torch.load

    def recording_load(f, *args, **kwargs):
        loads.append((Path(f).name, kwargs.get("weights_only")))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    assert main(["train", str(config), "--set", "train.resume=auto"]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 4
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-4"]
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth"} <= {name for name, _ in loads}
    assert all(weights_only is True for _, weights_only in loads)


def test_an_io_error_in_the_first_checkpoint_says_to_train_again(tiny_llama, tmp_path, capsys, monkeypatch):
    out = tmp_path / "eio"
    config = run_config(tmp_path, tiny_llama, out, max_steps=2)
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if Path(f).name == "optimizer.pt":
            Path(f).write_bytes(b"PK\3\4")
            raise OSError(errno.EIO, "Input/output error")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    assert main(["train", str(config)]) == 74
    assert one_line(capsys) == (
        f"error: I/O error while saving checkpoint-2 to {out} (Input/output error); no checkpoint is complete yet; "
        "check the disk and train again with --set train.overwrite=true"
    )
    assert complete_checkpoints(out) == [] and not (out / STAGING).exists()


def test_a_full_disk_in_the_final_save_keeps_the_checkpoints_and_resume_saves_it(tiny_llama, tmp_path, capsys,
                                                                                monkeypatch):
    out = tmp_path / "final"
    config = run_config(tmp_path, tiny_llama, out, max_steps=4)
    fail_safetensors_write(monkeypatch, out / "model.safetensors")  # the final save, after checkpoint-4
    assert main(["train", str(config)]) == 74
    assert one_line(capsys) == (
        f"error: disk full while saving the final model to {out} (No space left on device); the checkpoints are "
        f"kept, the last complete is {out}/checkpoint-4; free space and resume with --set train.resume=auto"
    )
    assert not (out / "summary.json").exists()  # the folder does not look complete
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    monkeypatch.undo()

    # checkpoint-4 is the last step: the resumed run trains nothing (not a 5th step) and saves
    assert main(["train", str(config), "--set", "train.resume=auto"]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 4
    saved, checkpoint = load_file(out / "model.safetensors"), load_file(out / "checkpoint-4" / "model.safetensors")
    assert saved.keys() == checkpoint.keys() and all(bool((saved[k] == checkpoint[k]).all()) for k in saved)
    assert "done: 4 steps in" in capsys.readouterr().out


def test_a_half_written_summary_is_removed(tmp_path):
    with pytest.raises(DiskError) as caught:
        with final_save(tmp_path, "summary.json"):
            (tmp_path / "summary.json").write_text('{"steps": ')
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
    assert str(caught.value) == (
        f"disk quota exceeded while saving the final model to {tmp_path} (Disk quota exceeded); no checkpoint was "
        "saved; free space and train again with --set train.overwrite=true"
    )
    assert not (tmp_path / "summary.json").exists()


def test_other_errors_in_the_final_save_are_not_disk_errors(tmp_path):
    with pytest.raises(OSError, match="Permission denied"):
        with final_save(tmp_path, "summary.json"):
            raise PermissionError(errno.EACCES, "Permission denied")


def test_disk_failure_reads_each_writers_error(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    assert disk_failure(OSError(errno.ENOSPC, "No space left on device"), tmp_path).what == "disk full"
    assert disk_failure(SafetensorError(ENOSPC_FROM_SAFETENSORS), tmp_path).reason == "No space left on device"
    wrapped = RuntimeError("save failed")
    wrapped.__cause__ = OSError(errno.EIO, "Input/output error")
    assert disk_failure(wrapped, tmp_path).what == "I/O error"
    assert disk_failure(OSError(errno.ENOENT, "No such file or directory"), tmp_path) is None
    assert disk_failure(ValueError("os error in the model"), tmp_path) is None

    # torch.save's zip writer keeps no errno: a disk with no space left means full
    torch_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9, 4096))
    assert disk_failure(torch_error, tmp_path).what == "disk full"
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 10**9, 10**11))
    failure = disk_failure(torch_error, tmp_path)
    assert (failure.what, failure.reason) == ("write error", str(torch_error))


@pytest.fixture
def small_disk(tmp_path):
    """A real 50 MB file system (tmpfs): room for one checkpoint of the tiny Llama (37 MB), not two."""
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=50M", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.slow
def test_a_really_full_disk_keeps_the_last_checkpoint_and_resume_finishes(tiny_llama, tmp_path, small_disk, capsys):
    """No injection: the writers fail as they do on a full disk (safetensors: SafetensorError,
    torch.save: a RuntimeError without errno), checked here on a tmpfs that fills up."""
    import subprocess

    out = small_disk / "run"
    config = run_config(tmp_path, tiny_llama, out, max_steps=4)
    assert main(["train", str(config)]) == 74
    assert one_line(capsys) == (
        f"error: disk full while saving checkpoint-4 to {out} (No space left on device); the last complete "
        f"checkpoint is {out}/checkpoint-2; free space and resume with --set train.resume=auto"
    )
    assert not (out / STAGING).exists()
    subprocess.run(["mount", "-o", "remount,size=200M", str(small_disk)], check=True)  # space freed
    assert main(["train", str(config), "--set", "train.resume=auto"]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 4


def test_a_full_disk_under_any_other_write_is_one_line_and_exit_74(tmp_path, monkeypatch, capsys):
    import vitune.train.runner as runner
    from conftest import write_config

    def metrics_write_fails(config, console=None):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "metrics.jsonl"))

    monkeypatch.setattr(runner, "run_training", metrics_write_fails)
    config = write_config(tmp_path / "run.yaml", model={"name_or_path": "m"}, data={"train": [{"path": "x"}]})
    assert main(["train", str(config)]) == 74
    err = " ".join(capsys.readouterr().err.split())
    assert err == (f"error: No space left on device while writing {tmp_path / 'run' / 'metrics.jsonl'}; free space or "
                   "check the disk, then run again (a training run resumes from its last complete checkpoint with "
                   "--set train.resume=auto)")
