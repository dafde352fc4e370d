"""progress.json (train/progress.py): where a run is from the moment its start-up checks pass --
its phases, the end it came to, and a start that fails leaving the disk as it found it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vitune.cli import main
from vitune.errors import UserError
from vitune.train.progress import PROGRESS, ProgressFile, holds_no_run

from conftest import ROOT, write_config, write_jsonl

KEYS = {"phase", "status", "step", "max_steps", "epoch", "started", "elapsed_s", "eta_s", "updated"}


def read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def tiny_config(tmp_path: Path, model: Path, out: Path, data: Path | None = None, **train) -> Path:
    return write_config(
        tmp_path / "run.yaml", model={"name_or_path": str(model)},
        data={"train": [{"path": str(data or ROOT / "data" / "alpaca_vi.jsonl"), "max_samples": 16}], "max_length": 128,
              "val_size": 4},
        train={"max_steps": 2, "micro_batch_size": 4, "output_dir": str(out), "report_to": ["none"], **train})


def test_a_run_goes_through_its_phases_from_preparing_data_to_finished(tiny_llama, tmp_path, monkeypatch):
    written = []
    replace = ProgressFile._replace

    def record(self, data):
        written.append(json.loads(data))
        replace(self, data)

    monkeypatch.setattr(ProgressFile, "_replace", record)
    out = tmp_path / "run"
    assert main(["train", str(tiny_config(tmp_path, tiny_llama, out))]) == 0
    phases = [w["phase"] for n, w in enumerate(written) if n == 0 or written[n - 1]["phase"] != w["phase"]]
    # the held-out loss before the first step (the one at the end falls on an epoch's end: in "training")
    assert phases == ["preparing data", "loading model", "measuring held-out loss", "training", "saving", "finished"]
    assert [w["status"] for w in written[:-1]] == ["running"] * (len(written) - 1)
    assert {w["started"] for w in written} == {written[0]["started"]}  # one run, one start time
    assert (written[0]["step"], written[0]["max_steps"], written[0]["eta_s"]) == (None, None, None)
    final = read(out / PROGRESS)
    assert set(final) == KEYS
    assert {k: final[k] for k in ("phase", "status", "step", "max_steps", "eta_s")} == {
        "phase": "finished", "status": "finished", "step": 2, "max_steps": 2, "eta_s": 0.0}
    assert final["started"] < final["updated"] and final["elapsed_s"] > 0
    assert not (out / (PROGRESS + ".tmp")).exists()


def test_a_start_that_fails_on_its_data_leaves_no_folder(tiny_llama, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "Hỏi gì?", "input": ""}])
    out = tmp_path / "run"
    assert main(["train", str(tiny_config(tmp_path, tiny_llama, out, bad))]) == 2
    assert capsys.readouterr().err.startswith(f"error: 1 bad row(s): {bad}:1: alpaca row: missing field 'output'")
    assert not out.exists()


def test_a_start_that_fails_puts_back_the_progress_json_it_replaced(tiny_llama, tmp_path, capsys):
    # train.overwrite replaces an older run only once the new one's model is loaded; a failed start keeps it whole
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "Hỏi gì?", "input": ""}])
    out = tmp_path / "run"
    out.mkdir()
    old = b'{"phase": "finished", "status": "finished", "step": 40}'
    (out / PROGRESS).write_bytes(old)
    (out / "summary.json").write_text("{}")
    assert main(["train", str(tiny_config(tmp_path, tiny_llama, out, bad, overwrite=True))]) == 2
    assert sorted(p.name for p in out.iterdir()) == [PROGRESS, "summary.json"]
    assert (out / PROGRESS).read_bytes() == old


def test_a_start_undone_removes_only_what_it_wrote(tmp_path):
    made = ProgressFile(tmp_path / "new" / PROGRESS)
    made.start("preparing data")
    assert read(tmp_path / "new" / PROGRESS)["phase"] == "preparing data"
    made.failed(UserError("dataset file not found: none.jsonl"))
    assert not (tmp_path / "new").exists()  # the start made the folder: it goes too

    (tmp_path / "empty").mkdir()
    existing = ProgressFile(tmp_path / "empty" / PROGRESS)
    existing.start("preparing data")
    existing.phase("loading model")
    existing.failed(KeyboardInterrupt())
    assert (tmp_path / "empty").is_dir() and not any((tmp_path / "empty").iterdir())


def test_a_folder_left_by_a_killed_start_holds_no_run(tmp_path):
    killed = ProgressFile(tmp_path / "run" / PROGRESS)
    killed.start("preparing data")
    killed.phase("loading model")  # then kill -9: nothing more is written
    assert holds_no_run(tmp_path / "run")
    (tmp_path / "run" / "config.yaml").write_text("model: {}")
    assert not holds_no_run(tmp_path / "run")


@pytest.mark.parametrize("exc, phase, error", [
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nsee the documentation"), "failed",
     "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"),
    (UserError("no space left on the disk of runs/x while saving checkpoint-8"), "failed",
     "no space left on the disk of runs/x while saving checkpoint-8"),
    (KeyboardInterrupt(), "stopped", None),
])
def test_a_run_that_ends_badly_after_its_folder_is_made_says_so(tmp_path, exc, phase, error):
    progress = ProgressFile(tmp_path / PROGRESS)
    progress.start("preparing data")
    progress.run_folder_made()
    progress.failed(exc)
    record = read(tmp_path / PROGRESS)
    assert (record["phase"], record["status"], record.get("error")) == (phase, phase, error)


def test_an_end_already_written_is_kept(tmp_path):
    progress = ProgressFile(tmp_path / PROGRESS)
    progress.start("preparing data")
    progress.run_folder_made()
    progress.end("stopped")  # SIGINT: checkpoint saved, then the runner raises RunInterrupted
    progress.failed(RuntimeError("stopped by SIGINT at step 3"))
    assert read(tmp_path / PROGRESS)["phase"] == "stopped"


def test_only_the_main_process_writes(tmp_path):
    other_rank = ProgressFile(tmp_path / "run" / PROGRESS, enabled=False)
    other_rank.start("preparing data")
    other_rank.run_folder_made()
    other_rank.end("finished")
    assert not (tmp_path / "run").exists()


def test_a_full_disk_does_not_hide_the_failure_being_raised(tmp_path, monkeypatch):
    progress = ProgressFile(tmp_path / PROGRESS)
    progress.start("preparing data")
    progress.run_folder_made()

    def full(self, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ProgressFile, "_replace", full)
    progress.failed(UserError("no space left on the disk of runs/x while saving checkpoint-8"))  # returns quietly
    assert read(tmp_path / PROGRESS)["phase"] == "preparing data"  # the last one the disk took
