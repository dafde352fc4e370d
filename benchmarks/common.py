"""What the benchmarks share: one clock for every stack, and the versions and device line."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path


class StepClock:
    """Real tokens and wall time of optimizer steps 2..N of a Trainer run (the first step pays
    one-time costs). A forward pre-hook counts tokens: the attention mask's ones when there is
    one, else every input id (packed and padding-free batches hold no padding)."""

    def __init__(self, model):
        from transformers import TrainerCallback

        self.tokens_by_step, self.pending, self.marks = [], 0, []
        model.register_forward_pre_hook(self._count, with_kwargs=True)
        clock = self

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                clock.tokens_by_step.append(clock.pending)
                clock.pending = 0
                clock.marks.append(time.perf_counter())

        self.callback = Callback()

    def _count(self, module, args, kwargs):
        if module.training:
            mask = kwargs.get("attention_mask")
            self.pending += int(mask.sum()) if mask is not None else kwargs["input_ids"].numel()

    def rate(self) -> dict:
        tokens = sum(self.tokens_by_step[1:])
        seconds = self.marks[-1] - self.marks[0]
        return {"tokens_per_s": tokens / seconds, "tokens": tokens, "seconds": seconds}


def rate_from_metrics(metrics_file: Path) -> dict:
    """The same clock from a vitune run's own metrics.jsonl, logged at every step: real tokens
    of steps 2..N over the time between the end of step 1 and the end of step N."""
    steps = [m for m in map(json.loads, metrics_file.read_text().splitlines()) if "loss" in m]
    tokens = steps[-1]["real_tokens"] - steps[0]["real_tokens"]
    seconds, previous = 0.0, steps[0]["real_tokens"]
    for m in steps[1:]:
        seconds += (m["real_tokens"] - previous) / m["tokens_per_s"]
        previous = m["real_tokens"]
    return {"tokens_per_s": tokens / seconds, "tokens": tokens, "seconds": seconds}


def environment() -> dict:
    """Device and library versions, for the printout and the result file."""
    import importlib.metadata as md

    import torch

    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
        cpu = next((line.split(":", 1)[1].strip() for line in lscpu if line.startswith("Model name")), platform.processor())
        device = f"{cpu}, {torch.get_num_threads()} threads"
    info = {"device": device, "date": datetime.date.today().isoformat(), "python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "accelerate", "trl", "liger-kernel", "flash-attn", "triton"):
        try:
            info[name] = md.version(name)
        except md.PackageNotFoundError:
            info[name] = None
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
    return info


def environment_line(info: dict) -> str:
    libs = ", ".join(f"{k} {v}" for k, v in info.items() if k not in ("device", "date") and v)
    return f"device: {info['device']}\nversions: {libs} ({info['date']})"


GIB = 2**30


def maxrss_gib(kib: int) -> float:
    return kib * 1024 / GIB  # Linux reports ru_maxrss in KiB


def run_child(script: Path, argv: list[str], log: Path, timeout: float, cwd: Path) -> tuple[int, float]:
    """Run `script` as one child process to the end -> (exit code, its peak RSS in GiB from its own
    rusage), killed after `timeout` seconds; the CPU only (CUDA hidden), output to `log`."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}  # a CPU benchmark, also on a GPU host
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, str(Path(script).resolve()), *argv], stdout=fh,
                                stderr=subprocess.STDOUT, env=env, cwd=cwd)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)  # this child's rusage alone
        finally:
            timer.cancel()
    return os.waitstatus_to_exitcode(status), maxrss_gib(usage.ru_maxrss)
