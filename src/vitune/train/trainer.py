"""The pieces every training stage shares: the batch collator, the Trainer subclass that
counts real tokens, and the callbacks that write metrics.jsonl and draw the progress bar."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from vitune.data.tokenize import IGNORE


class PadCollator:
    """Pads a list of {input_ids, labels} rows to the longest row of the batch.

    Right padding with the tokenizer's pad id, labels padded with -100, and an attention
    mask, so padded positions neither attend nor count in the loss.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.multiple = pad_to_multiple_of

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(r["input_ids"]) for r in rows)
        if self.multiple:
            longest = -(-longest // self.multiple) * self.multiple
        ids = torch.full((len(rows), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), longest), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[i, :n] = torch.as_tensor(row["input_ids"])
            labels[i, :n] = torch.as_tensor(row["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class VituneTrainer(Trainer):
    """`Trainer` that also counts real (non-padding) tokens and token slots for telemetry.

    The loss itself is Trainer's: with `num_items_in_batch` it is the mean over all trained
    tokens of the optimizer step, not a mean of per-micro-batch means.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.real_tokens = 0
        self.token_slots = 0
        self._window_tokens = 0
        self._window_slots = 0
        self._window_start = time.perf_counter()
        self.train_start = time.perf_counter()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            mask = inputs.get("attention_mask")
            real = int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
            self.real_tokens += real
            self._window_tokens += real
            self.token_slots += inputs["input_ids"].numel()
            self._window_slots += inputs["input_ids"].numel()
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs:
            now = time.perf_counter()
            elapsed = max(now - self._window_start, 1e-9)
            logs["real_tokens"] = self.real_tokens
            logs["tokens_per_s"] = round(self._window_tokens / elapsed, 1)
            logs["padding_fraction"] = round(1 - self._window_tokens / max(self._window_slots, 1), 4)
            if torch.cuda.is_available():
                logs["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
            self._window_tokens = self._window_slots = 0
            self._window_start = now
        super().log(logs, start_time)


class MetricsFile(TrainerCallback):
    """One JSON object per logged step in metrics.jsonl (rank 0 only)."""

    KEYS = ("loss", "learning_rate", "grad_norm", "real_tokens", "tokens_per_s", "padding_fraction", "peak_memory_gib", "eval_loss")

    def __init__(self, path: Path):
        self.path = path
        self.losses: list[tuple[int, float]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step}
        record.update({k: logs[k] for k in self.KEYS if k in logs})
        if len(record) == 1:
            return
        if "loss" in record:
            self.losses.append((state.global_step, record["loss"]))
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")


class RichProgress(TrainerCallback):
    """A rich progress bar: step, loss, learning rate, tokens/s and time left."""

    def __init__(self, console):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss [cyan]{task.fields[loss]}"),
            TextColumn("lr {task.fields[lr]}"),
            TextColumn("{task.fields[tps]} tok/s"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.task = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.progress.start()
            self.task = self.progress.add_task("train", total=state.max_steps, loss="-", lr="-", tps="-")

    def on_step_end(self, args, state, control, **kwargs):
        if self.task is not None:
            self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.task is None or not logs or "loss" not in logs:
            return
        self.progress.update(
            self.task,
            loss=f"{logs['loss']:.4f}",
            lr=f"{logs.get('learning_rate', 0):.2e}",
            tps=f"{logs.get('tokens_per_s', 0):,.0f}",
        )

    def on_train_end(self, args, state, control, **kwargs):
        if self.task is not None:
            self.progress.stop()
            self.task = None
