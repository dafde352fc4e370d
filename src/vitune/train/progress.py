"""progress.json in the run folder: where a running training is, for watchers such as `vitune ui`.

metrics.jsonl says what each logged step measured; it does not say how many steps the run has
or how long it has left. This file does, rewritten (atomically) after every step at most once
a second and at the end, by the main process only.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from transformers import TrainerCallback

PROGRESS = "progress.json"


def holds_no_run(folder: Path) -> bool:
    """True for a folder that is empty or holds only progress.json (and its temporary file): a start
    that failed before it wrote anything else, which the next start may use as an empty folder."""
    return all(p.name in (PROGRESS, PROGRESS + ".tmp") for p in folder.iterdir())


class ProgressFile(TrainerCallback):
    def __init__(self, path: Path, every_s: float = 1.0):
        self.path = path
        self.every_s = every_s
        self._last = 0.0
        self._started = None
        self._first_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._started = time.time()
        self._first_step = state.global_step  # a resumed run starts at its checkpoint's step
        self._write(state, "training")

    def on_step_end(self, args, state, control, **kwargs):
        if time.time() - self._last >= self.every_s:
            self._write(state, "training")

    def on_train_end(self, args, state, control, **kwargs):
        self._write(state, "finished" if state.global_step >= state.max_steps else "stopped")

    def _write(self, state, status: str) -> None:
        if not state.is_world_process_zero:
            return
        now = time.time()
        self._last = now
        elapsed = now - (self._started or now)
        done = state.global_step - self._first_step
        left = max(state.max_steps - state.global_step, 0)
        record = {
            "status": status,
            "step": state.global_step,
            "max_steps": state.max_steps,
            "epoch": state.epoch,
            "elapsed_s": round(elapsed, 1),
            # the mean time of this process's steps so far, times the steps left (evaluations included)
            "eta_s": round(elapsed / done * left, 1) if done else None,
            "updated": now,
        }
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(record), encoding="utf-8")
        os.replace(tmp, self.path)
