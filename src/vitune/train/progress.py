"""progress.json in the run folder: where a run is, for watchers such as `vitune ui`.

metrics.jsonl says what each logged step measured; it does not say what the run is doing
before its first step, how many steps it has or how long it has left. This file does, from the
moment the start-up checks (train/preflight.py) have passed to the end, rewritten atomically
(a temporary file, then a rename) by the main process only:

    {"phase": "training", "status": "running", "step": 12, "max_steps": 40, "epoch": 0.3,
     "started": 1765141200.5, "elapsed_s": 95.2, "eta_s": 210.4, "updated": 1765141295.7}

`phase` goes, in this order:

    preparing data            the tokenizer, the data (or its cache) and the eval section's files
    loading model             the model is loaded and adapted (LoRA, quantisation, speed plan)
    measuring held-out loss   the held-out loss before the first step (a run with held-out rows),
                              and again after the last one where no evaluation fell on it
    training                  optimizer steps (evaluations and checkpoints between them included)
    saving                    the final model, the tokenizer and summary.json
    finished | stopped | failed   the end: stopped by SIGINT/SIGTERM after a checkpoint, or failed

and `status` is "running" until the end, then the same word as `phase`. `started` is when the
run began (epoch seconds), so a watcher tells a new run from a file an older one left; `step`,
`max_steps` and `epoch` are null until the Trainer knows them; `elapsed_s` counts from `started`
and `eta_s` is the mean time of this run's steps so far times the steps left. A run that fails
once its folder is made writes `error`, the failure in one line.

A start that fails on the user's input (bad data, a model that is not there) leaves the disk as
it found it: progress.json is taken away again (with the folder, where the start made it; an
older run's progress.json, in a folder train.overwrite was to replace or a run resumes, is
put back). A start killed outright (kill -9, out of memory) before its run folder was made
leaves progress.json alone in the folder; the next start counts such a folder as empty
(`holds_no_run`), so it never blocks a run.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from transformers import TrainerCallback

from vitune.errors import UserError

PROGRESS = "progress.json"


def holds_no_run(folder: Path) -> bool:
    """True for a folder that is empty or holds only progress.json (and its temporary file): a start
    that failed before it wrote anything else, which the next start may use as an empty folder."""
    return all(p.name in (PROGRESS, PROGRESS + ".tmp") for p in folder.iterdir())


class ProgressFile(TrainerCallback):
    """progress.json of one run: the runner sets the phases around the Trainer (`start`, `phase`,
    `run_folder_made`, `end`, `failed`); as a Trainer callback it follows the steps. `enabled`:
    False on every process but the main one, which alone writes."""

    def __init__(self, path: Path, enabled: bool = True, every_s: float = 1.0):
        self.path = path
        self.enabled = enabled
        self.every_s = every_s
        self.started = time.time()
        self.current = None  # the phase
        self.error = None
        self.step = self.max_steps = self.epoch = None
        self._last = 0.0
        self._training_since = None  # when the Trainer began: the clock of the time left
        self._first_step = 0
        self._kept = False  # the run folder is made: a failure is written, no longer undone
        self._made_folder = False
        self._before: bytes | None = None  # an older run's progress.json, put back if this start fails

    # ------------------------------------------------------------ the runner's side

    def start(self, phase: str) -> None:
        """The first write, once the start-up checks have passed; remembers what it replaces."""
        if self.enabled:
            folder = self.path.parent
            self._made_folder = not folder.exists()
            self._before = self.path.read_bytes() if self.path.is_file() else None
        self.phase(phase)

    def phase(self, phase: str) -> None:
        self.current = phase
        self._write()

    def run_folder_made(self) -> None:
        """The run folder exists (train.overwrite may just have replaced it): write the file again."""
        self._kept = True
        self._write()

    def end(self, status: str, error: str | None = None) -> None:
        """finished, stopped or failed."""
        self.error = error
        self.phase(status)

    def failed(self, exc: BaseException) -> None:
        """The run ended with `exc`: before the run folder, undo the start; after it, record the end."""
        if not self.enabled or self.current in (None, "finished", "stopped", "failed"):
            return  # nothing written yet, or the end already is
        try:
            if not self._kept:
                self._undo()
            elif isinstance(exc, KeyboardInterrupt):
                self.end("stopped")
            else:
                line = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
                self.end("failed", line.splitlines()[0] if line.strip() else type(exc).__name__)
        except OSError:  # a full or failing disk: the failure being raised says more than this file could
            pass

    def _undo(self) -> None:
        folder = self.path.parent
        if self._made_folder and folder.is_dir() and holds_no_run(folder):
            shutil.rmtree(folder)
        elif self._before is not None:
            self._replace(self._before)
        else:
            self.path.unlink(missing_ok=True)

    # ------------------------------------------------------------ the Trainer's side

    def on_train_begin(self, args, state, control, **kwargs):
        self._training_since = time.time()
        self._first_step = state.global_step  # a resumed run starts at its checkpoint's step
        self._follow(state)
        self.phase("measuring held-out loss" if args.eval_on_start else "training")

    def on_step_begin(self, args, state, control, **kwargs):
        if self.current != "training":  # the held-out loss before the first step is measured
            self.phase("training")

    def on_step_end(self, args, state, control, **kwargs):
        self._follow(state)
        if time.time() - self._last >= self.every_s:
            self._write()

    def on_train_end(self, args, state, control, **kwargs):
        self._follow(state)
        self._write()

    def _follow(self, state) -> None:
        self.step, self.max_steps, self.epoch = state.global_step, state.max_steps, state.epoch

    # ------------------------------------------------------------ the file

    def _write(self) -> None:
        if not self.enabled:
            return
        now = time.time()
        self._last = now
        done = (self.step or 0) - self._first_step
        left = max((self.max_steps or 0) - (self.step or 0), 0)
        trained = now - self._training_since if self._training_since else 0.0
        ended = self.current in ("finished", "stopped", "failed")
        record = {
            "phase": self.current,
            "status": self.current if ended else "running",
            "step": self.step,
            "max_steps": self.max_steps,
            "epoch": self.epoch,
            "started": self.started,
            "elapsed_s": round(now - self.started, 1),
            # the mean time of this run's steps so far, times the steps left (evaluations included)
            "eta_s": round(trained / done * left, 1) if done else None,
            "updated": now,
        }
        if self.error:
            record["error"] = self.error
        self._replace(json.dumps(record).encode("utf-8"))

    def _replace(self, data: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, self.path)
