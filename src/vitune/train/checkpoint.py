"""Checkpoints that survive a crash, and exact resume.

A checkpoint is written by Trainer (trainable weights, optimizer, scheduler, RNG states of
Python, NumPy and torch, trainer state with the step, which fixes the data-order position)
into a staging folder, completed with `vitune_checkpoint.json` (the run's fingerprint and
resolved config), and only then renamed to `checkpoint-N`. A crash mid-save leaves the
staging folder, never a `checkpoint-N` that looks complete.

Resuming checks the fingerprint: a run whose data, model, tokenizer, template, max_length
or packing changed cannot continue from the old optimizer state and data position.
"""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path
from typing import Optional

from transformers import TrainerCallback

from vitune.errors import UserError

MARKER = "vitune_checkpoint.json"
STAGING = ".checkpoint-staging"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def fingerprint(config, data_key: str) -> dict:
    """What a checkpoint must share with the run that resumes from it."""
    return {
        "data": data_key,  # hashes data files, tokenizer, template and every data setting
        "model": config.model.name_or_path,
        "method": config.method.type,
        "max_length": config.data.max_length,
        "packing": config.data.packing,
    }


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run folder, oldest first."""
    if not run_dir.is_dir():
        return []
    found = []
    for path in run_dir.iterdir():
        match = _NAME.match(path.name)
        if match and (path / MARKER).is_file():
            found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


def find_resume_checkpoint(run_dir: Path, resume) -> Optional[Path]:
    """`train.resume`: False -> None; "auto" -> newest complete checkpoint (or None); a path -> it."""
    if resume is False or resume is None:
        return None
    if resume == "auto":
        found = complete_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(str(resume))
    if not (path / MARKER).is_file():
        if path.is_dir():
            raise UserError(f"train.resume = {resume}: not a complete vitune checkpoint (no {MARKER}); "
                            f"complete ones in {path.parent}: {', '.join(p.name for p in complete_checkpoints(path.parent)) or 'none'}")
        raise UserError(f"train.resume = {resume}: checkpoint folder not found")
    return path


def check_fingerprint(checkpoint: Path, current: dict, strict: bool) -> None:
    saved = json.loads((checkpoint / MARKER).read_text(encoding="utf-8"))["fingerprint"]
    changed = [key for key in current if saved.get(key) != current[key]]
    if changed and strict:
        what = {
            "data": "the data (files, tokenizer, template or data settings)",
            "model": f"model.name_or_path ({saved.get('model')} -> {current['model']})",
            "method": f"method.type ({saved.get('method')} -> {current['method']})",
            "max_length": f"data.max_length ({saved.get('max_length')} -> {current['max_length']})",
            "packing": f"data.packing ({saved.get('packing')} -> {current['packing']})",
        }
        raise UserError(
            f"cannot resume from {checkpoint}: {'; '.join(what[k] for k in changed)} changed since it was written. "
            "Start fresh with --set train.resume=false --set train.overwrite=true, or resume anyway with "
            "--set train.resume_strict=false"
        )


def write_marker(folder: Path, fingerprint_: dict, config_yaml: str) -> None:
    (folder / MARKER).write_text(
        json.dumps({"fingerprint": fingerprint_, "config": config_yaml}, ensure_ascii=False, indent=1), encoding="utf-8"
    )


class StopOnSignal(TrainerCallback):
    """SIGINT / SIGTERM: save a checkpoint at the end of the current step, then stop cleanly."""

    def __init__(self):
        self.received: Optional[str] = None
        self._previous = {}

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside a test runner's worker): no handler
                pass

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.received:  # a second signal: stop now
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def on_step_end(self, args, state, control, **kwargs):
        if self.received:
            control.should_save = True
            control.should_training_stop = True
        return control
