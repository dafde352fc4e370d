"""One run per output folder: a second run is refused while the first holds the folder, and
the lock goes with its holder however it ends (normal exit, exception, kill -9)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from vitune.cli import main
from vitune.errors import UserError
from vitune.train.run_lock import lock_file, output_dir_lock

from conftest import ROOT, write_config

HOLD = """
import sys, time
from pathlib import Path
from vitune.train.run_lock import output_dir_lock
with output_dir_lock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(120)
"""


def hold(out: Path) -> subprocess.Popen:
    """Another process holding `out`, as a training run does."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def refusal(out: Path, pid: int) -> str:
    return (f"train.output_dir {out} is in use by another vitune run (PID {pid}); "
            "wait for it to finish or choose another train.output_dir")


@pytest.fixture
def holder(tmp_path):
    proc = hold(tmp_path / "run")
    yield proc
    proc.kill()
    proc.wait()


def test_a_second_run_is_refused_while_the_first_holds_the_folder_and_not_after_a_kill_9(tmp_path, holder):
    out = tmp_path / "run"
    with pytest.raises(UserError) as caught:
        with output_dir_lock(out):
            pass
    assert str(caught.value) == refusal(out, holder.pid)

    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert lock_file(out).exists()  # a stale file, with no lock on it: the kernel dropped that with the process
    with output_dir_lock(out):
        assert lock_file(out).read_text().strip() == str(os.getpid())
    assert not lock_file(out).exists()


def test_vitune_train_into_a_held_folder_exits_2_before_writing_anything(tmp_path, holder, capsys):
    out = tmp_path / "run"
    config = write_config(
        tmp_path / "run.yaml",
        model={"name_or_path": str(tmp_path / "model")},  # the lock comes first: nothing is loaded
        data={"train": [{"path": str(ROOT / "data" / "alpaca_vi.jsonl")}]},
        train={"output_dir": str(out), "max_steps": 1},
    )
    assert main(["train", str(config)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {refusal(out, holder.pid)}"
    assert main(["train", str(config), "--nproc", "2"]) == 2  # refused before accelerate starts the ranks
    assert capsys.readouterr().err.strip() == f"error: {refusal(out, holder.pid)}"
    assert not out.exists()


def test_the_lock_is_released_when_the_run_raises(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError):
        with output_dir_lock(out):
            raise RuntimeError("a bug")
    assert not lock_file(out).exists()
    with output_dir_lock(out):
        pass


def test_only_the_main_process_takes_the_lock(tmp_path, holder):
    with output_dir_lock(tmp_path / "run", main_process=False):  # another rank of the holder's own run
        pass


def test_the_lock_lies_beside_the_folder_whatever_its_spelling(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert lock_file(Path("runs/x/")) == lock_file(tmp_path / "runs" / "x") == tmp_path / "runs" / ".x.vitune-lock"
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path / "runs")
    assert lock_file(Path(".")) == tmp_path / ".runs.vitune-lock"


def test_a_folder_in_a_parent_it_cannot_write_is_locked_itself(tmp_path, monkeypatch):
    """A volume mounted at /output: no lock file beside it, so the folder itself is locked (no PID)."""
    import errno

    out = tmp_path / "volume"
    out.mkdir()
    real_open = os.open

    def open_(path, flags, *args):
        if Path(path) == lock_file(out):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", open_)
    with output_dir_lock(out):
        with pytest.raises(UserError) as caught:  # flock: a second open of the folder conflicts, even here
            with output_dir_lock(out):
                pass
        assert str(caught.value) == refusal(out, 0).replace("PID 0", "PID unknown")
    with output_dir_lock(out):
        pass
    assert list(out.iterdir()) == []
