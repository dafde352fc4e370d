"""Checkpoints that survive a crash, and exact resume.

A checkpoint is written by Trainer (trainable weights, optimizer, scheduler, RNG states of
Python, NumPy and torch, trainer state with the step, which fixes the data-order position)
into a staging folder, completed with `vitune_checkpoint.json` (the run's fingerprint and
resolved config), and only then renamed to `checkpoint-N`. A crash mid-save leaves the
staging folder, never a `checkpoint-N` that looks complete.

Resuming checks the fingerprint: a run whose data, model, tokenizer, template, max_length
or packing changed cannot continue from the old optimizer state and data position.

A full or failing disk (`disk_failure`) is not a bug: the half-written checkpoint is
removed, the last complete one stays (rotation runs only after the new one is complete),
and the user gets one line saying which checkpoint to resume from (`DiskError`, exit 74).

What resuming loads: the model or adapter weights as safetensors (a checkpoint with only
pickle weights is refused unless model.allow_pickle), and Trainer's own optimizer.pt,
scheduler.pt and rng_state.pth, which transformers reads with torch.load(weights_only=True)
-- tensors and plain containers only, no code. Only folders with vitune's marker are resumed.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from transformers import TrainerCallback

from vitune.errors import DiskError, UserError
from vitune.models.loading import check_safe_weights

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


def find_resume_checkpoint(run_dir: Path, resume, allow_pickle: bool = False) -> Optional[Path]:
    """`train.resume`: False -> None; "auto" -> newest complete checkpoint (or None); a path -> it.

    A checkpoint whose weights are pickle files only is refused unless `allow_pickle`."""
    if resume is False or resume is None:
        return None
    if resume == "auto":
        found = complete_checkpoints(run_dir)
        path = found[-1] if found else None
    else:
        path = Path(str(resume))
        if not (path / MARKER).is_file():
            if path.is_dir():
                raise UserError(f"train.resume = {resume}: not a complete vitune checkpoint (no {MARKER}); "
                                f"complete ones in {path.parent}: {', '.join(p.name for p in complete_checkpoints(path.parent)) or 'none'}")
            raise UserError(f"train.resume = {resume}: checkpoint folder not found")
    if path is not None:
        check_safe_weights(path, allow_pickle)
    return path


def _read_json(path: Path, key: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))[key]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path} is damaged ({type(exc).__name__}: {exc}); resume from another checkpoint, "
                        "or start fresh with --set train.resume=false --set train.overwrite=true") from None


def checkpoint_step(checkpoint: Path) -> int:
    """The optimizer step a checkpoint was saved at (from Trainer's state, not the folder's name)."""
    step = _read_json(checkpoint / "trainer_state.json", "global_step")
    if not isinstance(step, int):
        raise UserError(f"{checkpoint / 'trainer_state.json'}: global_step = {step!r} is not a step number")
    return step


def check_fingerprint(checkpoint: Path, current: dict, strict: bool) -> None:
    saved = _read_json(checkpoint / MARKER, "fingerprint")
    if not isinstance(saved, dict):
        raise UserError(f"{checkpoint / MARKER}: fingerprint is not a mapping; the checkpoint is damaged")
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


# ------------------------------------------------------------ a full or failing disk


@dataclass(frozen=True)
class DiskFailure:
    what: str  # "disk full", "I/O error", ...
    reason: str  # the system's words, e.g. "No space left on device"
    advice: str  # "free space", "check the disk"


_DISK_ERRNOS = {
    errno.ENOSPC: ("disk full", "free space"),
    errno.EDQUOT: ("disk quota exceeded", "free space"),
    errno.EIO: ("I/O error", "check the disk"),
    errno.EROFS: ("read-only file system", "make it writable"),
}
_OS_ERROR = re.compile(r"os error (\d+)")  # how safetensors (Rust) reports an I/O error
_LOW_SPACE = 64 * 2**20  # bytes free below which a failed write means the disk is full


def disk_failure(exc: BaseException, folder: Path) -> Optional[DiskFailure]:
    """`exc` (or its cause) as the disk failing under a write, or None when it is something else.

    The three writers report it three ways: Python's own writes as OSError with an errno;
    safetensors as SafetensorError("... No space left on device (os error 28)"); torch.save
    as a RuntimeError from its zip writer (inline_container.cc) with no errno, which means
    the disk is full when `folder`'s disk has (almost) no space left, a write error otherwise.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc)
        code = exc.errno if isinstance(exc, OSError) else None
        if code is None and (match := _OS_ERROR.search(text)):
            code = int(match.group(1))
        if code in _DISK_ERRNOS:
            what, advice = _DISK_ERRNOS[code]
            return DiskFailure(what, os.strerror(code), advice)
        if "inline_container.cc" in text or "PytorchStreamWriter" in text:
            if _free_bytes(folder) < _LOW_SPACE:
                return DiskFailure("disk full", os.strerror(errno.ENOSPC), "free space")
            return DiskFailure("write error", text.strip().splitlines()[0], "check the disk")
        exc = exc.__cause__ or exc.__context__
    return None


def _free_bytes(folder: Path) -> int:
    for path in (folder, *folder.parents):
        if path.exists():
            try:
                return shutil.disk_usage(path).free
            except OSError:
                break
    return _LOW_SPACE


def _what_to_do(failure: DiskFailure, run_dir: Path, last: str, none: str) -> str:
    found = complete_checkpoints(run_dir)
    if not found:
        return f"{none}; {failure.advice} and train again with --set train.overwrite=true"
    return f"{last} {found[-1]}; {failure.advice} and resume with --set train.resume=auto"


def checkpoint_save_failed(failure: DiskFailure, name: str, run_dir: Path) -> DiskError:
    """The one line for a checkpoint that could not be written (its staging folder is gone)."""
    return DiskError(f"{failure.what} while saving {name} to {run_dir} ({failure.reason}); " + _what_to_do(
        failure, run_dir, "the last complete checkpoint is", "no checkpoint is complete yet"))


@contextmanager
def final_save(out: Path, summary: str) -> Iterator[None]:
    """The end-of-run save (model or adapter, tokenizer, then `summary`): a full or failing disk
    becomes one DiskError line. A half-written summary is removed, so the folder never looks
    complete; the checkpoints are kept to resume from."""
    try:
        yield
    except Exception as exc:
        failure = disk_failure(exc, out)
        if failure is None:
            raise
        (out / summary).unlink(missing_ok=True)
        raise DiskError(f"{failure.what} while saving the final model to {out} ({failure.reason}); " + _what_to_do(
            failure, out, "the checkpoints are kept, the last complete is", "no checkpoint was saved")) from None


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
