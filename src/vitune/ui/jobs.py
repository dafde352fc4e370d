"""Training runs started from the page, and the run folders the page lists.

A run is `vitune train CONFIG` in its own process, exactly as from a terminal: the page only
starts it, reads the files it writes (metrics.jsonl, progress.json, summary.json) and its
output, and stops it with SIGINT, as Ctrl-C does (the run saves a checkpoint and ends). The
server never trains in its own process, so a run that dies cannot take the page with it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from vitune.errors import UserError

LOG_LINES = 40  # last lines of the process's output the page shows
STATE_DIR_ENV = "VITUNE_UI_STATE_DIR"


def default_state_dir(environ=os.environ) -> Path:
    """Where the page keeps what it generates (the YAML of each run it starts): $VITUNE_UI_STATE_DIR,
    else $XDG_STATE_HOME/vitune/ui, else ~/.local/state/vitune/ui; never the runs folder, which
    holds the user's runs only."""
    if environ.get(STATE_DIR_ENV):
        return Path(os.path.expanduser(environ[STATE_DIR_ENV]))
    state = environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state) / "vitune" / "ui"


@dataclass
class TrainingJob:
    config_path: Path
    output_dir: Path
    process: subprocess.Popen
    started: float  # epoch seconds, just before the process started
    resuming: bool = False  # a resumed run goes on with the folder's earlier metrics
    lines: deque = field(default_factory=lambda: deque(maxlen=LOG_LINES))
    reader: Optional[threading.Thread] = None

    @classmethod
    def start(cls, config_path: Path, output_dir: Path, overrides: list[str] = (), resuming: bool = False) -> "TrainingJob":
        started = time.time()
        cmd = [sys.executable, "-m", "vitune", "train", str(config_path)]
        for item in overrides:
            cmd += ["--set", item]
        env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="120", NO_COLOR="1")
        process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, text=True, encoding="utf-8", errors="replace")
        job = cls(Path(config_path), Path(output_dir), process, started, resuming)
        job.reader = threading.Thread(target=job._read, daemon=True)
        job.reader.start()
        return job

    def _read(self) -> None:
        for line in self.process.stdout:
            # rich redraws its progress bar with carriage returns: keep the last state of a line
            text = line.rstrip("\n").split("\r")[-1].rstrip()
            if text:
                self.lines.append(text)

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    @property
    def exit_code(self) -> Optional[int]:
        return self.process.poll()

    def stop(self) -> bool:
        """Ctrl-C for the run: it checkpoints and exits. False when it had already ended."""
        if not self.running:
            return False
        self.process.send_signal(signal.SIGINT)
        return True

    def wait(self, timeout: float | None = None) -> Optional[int]:
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        if self.reader:
            self.reader.join(timeout=5)
        return code

    def log(self) -> str:
        return "\n".join(self.lines)

    def progress(self) -> Optional[dict]:
        """This run's progress.json: None while the folder still holds the one of an earlier run."""
        p = progress(self.output_dir)
        if p and p.get("started", p.get("updated", 0)) < self.started and not self.resuming:
            return None
        return p

    def curves(self) -> dict[str, list[tuple[int, float]]]:
        """This run's curves: none while metrics.jsonl is an earlier run's (older than this start)."""
        path = self.output_dir / "metrics.jsonl"
        if not self.resuming and path.is_file() and path.stat().st_mtime < self.started:
            return {}
        return curves(self.output_dir)


def progress(run_dir: Path) -> Optional[dict]:
    """The run's progress.json (train/progress.py), or None before the first step."""
    try:
        return json.loads((Path(run_dir) / "progress.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{key: [(step, value)]} from metrics.jsonl; empty while there is none. A line half
    written while the run appends it is left for the next look, not an error."""
    from vitune.eval.plot import read_curves

    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return {}
    try:
        return read_curves(path)
    except UserError:
        return {}


def is_run(folder: Path) -> bool:
    return (folder / "config.yaml").is_file() and ((folder / "metrics.jsonl").is_file() or (folder / "summary.json").is_file())


def list_runs(root: Path) -> list[Path]:
    """Run folders directly under `root` (and root itself if it is one), newest first."""
    root = Path(os.path.expanduser(str(root)))
    if not root.is_dir():
        return []
    found = [root] if is_run(root) else []
    found += [p for p in root.iterdir() if p.is_dir() and is_run(p)]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def list_models(root: Path) -> list[Path]:
    """Finished runs and plain model folders (config.json) under `root`: what chat can load."""
    root = Path(os.path.expanduser(str(root)))
    if not root.is_dir():
        return []
    out = []
    for p in sorted(root.iterdir()):
        if not p.is_dir():
            continue
        if (p / "summary.json").is_file() or ((p / "config.json").is_file() and not (p / "config.yaml").is_file()):
            out.append(p)
    return out


def run_summary(run: Path) -> dict:
    """One row of the runs table: what the run is and what it reached."""
    from vitune.config import load_run_config

    row = {"run": run.name, "stage": "", "method": "", "model": "", "steps": None, "final loss": None,
           "held-out loss": None, "tokens/s": None, "status": "finished" if (run / "summary.json").is_file() else "unfinished"}
    try:
        cfg = load_run_config(run)
        row.update(stage=cfg.train.stage, method=cfg.method.type, model=cfg.model.name_or_path)
    except Exception:  # a damaged config.yaml: the row still shows the folder
        pass
    try:
        s = json.loads((run / "summary.json").read_text(encoding="utf-8"))
        row.update({"steps": s.get("steps"), "final loss": _round(s.get("final_loss")),
                    "held-out loss": _round(s.get("eval_loss_end")), "tokens/s": _round(s.get("tokens_per_s"), 1)})
    except (OSError, ValueError, AttributeError):
        p = progress(run)
        if p:
            row["steps"] = p.get("step")
            row["status"] = p.get("status", row["status"])
    return row


def eval_results(run: Path) -> list[dict]:
    """The figures of every evaluation the run keeps (vitune eval's evals/, newest first), one row
    each; "evaluation" names it: its UTC time and files (evals/<time>-<files>.json), or eval.json."""
    from vitune.eval import report

    rows = []
    for path in report.history(run):
        try:
            result = report.load(str(path))
        except UserError:
            continue
        name = path.stem if path.parent.name == report.HISTORY else path.name
        model, base = report.rows_of(result, "model"), report.rows_of(result, "base")
        rows += [{"run": run.name, "evaluation": name, "file": f, "metric": m, "model": round(v, 4),
                  "base": round(base[(f, m)], 4) if (f, m) in base else None} for (f, m), v in model.items()]
    return rows


def _round(value, digits: int = 4):
    return round(value, digits) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
