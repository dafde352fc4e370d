"""The pieces every training stage shares: the mixin that measures tokens and FLOPs and writes
atomic checkpoints (`VituneTrainerMixin`, on transformers' Trainer as `VituneTrainer`, or on a
TRL trainer), and the callbacks that write metrics.jsonl and draw the progress bar."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from vitune.models.chunked_loss import causal_lm_loss
from vitune.models.permissions import umask_modes
from vitune.eval.plot import TASK_PREFIX  # eval/<file>/<figure>: evaluations while training (train/evaluation.py)
from vitune.train.checkpoint import STAGING, checkpoint_save_failed, disk_failure, write_marker
from vitune.train.shares import ExactSharesMixin
from vitune.train.sharding import enable_fsdp_on_cpu
from vitune.train.telemetry import FlopsModel, flops_model, peak_flops, peak_memory_gib


class VituneTrainerMixin:
    """What every vitune Trainer adds to the one it extends (transformers' `Trainer`, or TRL's
    GRPOTrainer / RLOOTrainer, which subclass it): counting real tokens, token slots and model
    FLOPs for tokens/s, padding fraction, TFLOP/s and MFU in the logs; a stage's own metrics
    (`record_metric`); atomic checkpoints; a resume at the last step that trains nothing; and
    train.fsdp on CPU processes. Put it first: `class X(VituneTrainerMixin, SomeTrainer)`.

    The token, slot and FLOP counts are the run's, over every process (added up at each log);
    a filler micro-batch (train/shares.py) counts in none of them, nor in a stage's metrics.
    """

    filling = False  # True while a filler micro-batch runs (train/shares.py)

    def __init__(self, *args, flops: FlopsModel | None = None, checkpoint_marker: tuple | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.checkpoint_marker = checkpoint_marker  # (fingerprint, resolved config YAML) for each checkpoint
        self._staging: str | None = None
        self.flops = flops or flops_model(self.model)
        self.peak_flops = peak_flops()
        self.real_tokens = 0  # the run's, over every process, as of the last log
        self.token_slots = 0
        self.model_flops = 0.0
        self._pending = [0, 0, 0.0]  # this process's real tokens, slots, FLOPs not yet added up
        self._window = [0, 0, 0.0]  # the run's real tokens, slots, FLOPs since the last training log
        self._window_start = time.perf_counter()
        self.seconds_not_training = 0.0  # spent on evaluations between steps (log_evaluation)
        # a stage's own metrics, per micro-batch since the last log: {"train"|"eval": {key: [(sum, count)]}}
        self._stage_metrics: dict[str, dict[str, list[tuple[float, int]]]] = {"train": {}, "eval": {}}

    def record_metric(self, key: str, total: float, count: int) -> None:
        """Add a stage metric of one micro-batch (a sum over `count` items); logged as the mean
        over every item since the last log, gathered over processes."""
        if self.filling:  # nothing, yet the key: every process reduces the same keys when logging
            total, count = 0.0, 0
        mode = "train" if self.model.training else "eval"
        self._stage_metrics[mode].setdefault(key, []).append((float(total), int(count)))

    def _stage_logs(self, mode: str) -> dict:
        out = {}
        for key, parts in self._stage_metrics[mode].items():
            total = torch.tensor([sum(t for t, _ in parts), sum(c for _, c in parts)], dtype=torch.float64,
                                 device=self.accelerator.device)
            total = self.accelerator.reduce(total, reduction="sum") if self.accelerator.num_processes > 1 else total
            if total[1] > 0:
                out[key if mode == "train" else f"eval_{key}"] = round(float(total[0] / total[1]), 6)
        self._stage_metrics[mode] = {}
        return out

    def log_evaluation(self, figures: dict, seconds: float) -> None:
        """Log the figures of an evaluation between steps (train/evaluation.py) to every logging
        callback, as transformers' Trainer logs: without the window's speed or a stage's (or TRL's)
        own metrics, which belong to the next training log. Its `seconds` are left out of tokens/s
        and of the run's seconds."""
        self._window_start += seconds
        self.seconds_not_training += seconds
        Trainer.log(self, figures)

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        # train.fsdp on CPU processes: accelerate would quietly train DDP (see train/sharding.py)
        if enable_fsdp_on_cpu(self.accelerator, self.args.fsdp_plugin_args):
            self.is_fsdp_enabled = True

    def train(self, resume_from_checkpoint=None, **kwargs):
        """Trainer's train; resumed from a checkpoint of the last step (its final save failed,
        e.g. on a full disk), it trains nothing instead of one step too many."""
        self.add_callback(_NothingLeftToTrain)
        try:
            return super().train(resume_from_checkpoint, **kwargs)
        except _AtLastStep:  # the checkpoint's weights and state are loaded: only the final save is left
            self.control = self.callback_handler.on_train_end(self.args, self.state, self.control)
            return None
        finally:
            self.remove_callback(_NothingLeftToTrain)

    # True where the loss is the causal LM's cross-entropy over the vocabulary (VituneTrainer: sft, pt);
    # TRL's trainers (rl) and the pair trainers (rm, dpo) compute their own losses
    vocab_loss = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self._count(inputs)
        if self.vocab_loss:
            # Trainer's compute_loss (num_items_in_batch, the scale for processes, fillers) around the model's loss
            # as vitune.models.chunked_loss computes it: in chunks of tokens, by Liger's kernel, or by the forward
            language_model, liger = model, self.args.use_liger_kernel
            model = lambda **batch: causal_lm_loss(language_model, batch, liger)  # noqa: E731
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def _row_lengths(self, inputs: dict) -> tuple[torch.Tensor, int]:
        """(real tokens of each sequence of the micro-batch, token slots it takes)."""
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        if "cu_seq_lens_q" in inputs:  # packed: one row, no padding
            lengths = inputs["cu_seq_lens_q"].diff()
        elif mask is not None:
            lengths = mask.sum(dim=1)
        else:
            lengths = torch.full((ids.shape[0],), ids.shape[1])
        return lengths, ids.numel()

    def _count(self, inputs: dict) -> None:
        if self.filling:
            return
        lengths, slots = self._row_lengths(inputs)
        real = int(lengths.sum())
        flops = self.flops.step(real, int((lengths.long() ** 2).sum()))
        for i, value in enumerate((real, slots, flops)):
            self._pending[i] += value

    def _add_up_counts(self) -> None:
        """This process's counts since the last log, summed over the processes, into the run's totals
        and the window (a collective: Trainer logs on every process at once)."""
        pending = self._pending
        if self.accelerator.num_processes > 1:
            total = torch.tensor(pending, dtype=torch.float64, device=self.accelerator.device)
            pending = self.accelerator.reduce(total, reduction="sum").tolist()
        self._pending = [0, 0, 0.0]
        added = (int(pending[0]), int(pending[1]), float(pending[2]))
        self.real_tokens += added[0]
        self.token_slots += added[1]
        self.model_flops += added[2]
        for i, value in enumerate(added):
            self._window[i] += value

    def throughput(self, tokens: int, slots: int, flops: float, seconds: float) -> dict:
        """tokens/s, padding fraction, TFLOP/s and MFU (when the device's peak is known) of the run's
        counts (every process: MFU against the peak of all their devices)."""
        seconds = max(seconds, 1e-9)
        out = {
            "tokens_per_s": round(tokens / seconds, 1),
            "padding_fraction": round(1 - tokens / max(slots, 1), 4),
            "tflops": round(flops / seconds / 1e12, 4),
        }
        if self.peak_flops:
            out["mfu"] = round(flops / seconds / (self.peak_flops * self.accelerator.num_processes), 4)
        return out

    # ------------------------------------------------------------ atomic checkpoints

    def _get_output_dir(self, trial):
        return self._staging or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """Trainer's checkpoint, written to a staging folder, marked complete, then renamed.

        Every rank writes its part (RNG state, sharded optimizer) into the staging folder;
        after a barrier the main process adds the marker and renames it to checkpoint-N, so
        a crash at any point leaves no checkpoint-N without its marker. Old checkpoints are
        rotated out only after that, so the last complete one is never lost to a failed save.
        A full or failing disk removes the half-written staging folder (giving back its space)
        and stops the run with one line naming the checkpoint to resume from.
        """
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = Path(run_dir) / STAGING
        if self.args.should_save and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)  # left by a save that a crash cut short
        self.accelerator.wait_for_everyone()
        try:
            self._staging = str(staging)
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self._staging = None
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                staged = staging / name
                if self.checkpoint_marker is not None:
                    write_marker(staged, *self.checkpoint_marker)
                umask_modes(staged)  # safetensors writes 0600: a checkpoint is read by whoever the umask allows
                final = Path(run_dir) / name
                if final.exists():
                    shutil.rmtree(final)
                os.replace(staged, final)
                shutil.rmtree(staging, ignore_errors=True)
                rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit, use_mtime=False)
        except Exception as exc:
            failure = disk_failure(exc, Path(run_dir))
            if failure is None:
                raise  # a bug: its half-written checkpoint stays in staging to look at
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            raise checkpoint_save_failed(failure, name, Path(run_dir)) from None
        self.accelerator.wait_for_everyone()

    def log(self, logs: dict, start_time: float | None = None) -> None:
        logs.update(self._stage_logs("eval" if "eval_loss" in logs else "train"))
        self._add_up_counts()
        if "loss" in logs:
            now = time.perf_counter()
            logs["real_tokens"] = self.real_tokens
            logs.update(self.throughput(*self._window, now - self._window_start))
            if torch.cuda.is_available():
                logs["peak_memory_gib"] = peak_memory_gib()
            self._window = [0, 0, 0.0]
            self._window_start = now
        super().log(logs, start_time)


class VituneTrainer(VituneTrainerMixin, ExactSharesMixin, Trainer):
    """`Trainer` that also measures what a step does: real (non-padding) tokens, token
    slots, model FLOPs, for tokens/s, padding fraction, TFLOP/s and MFU in the logs.

    The loss is the causal LM's cross-entropy as Trainer normalises it: with `num_items_in_batch`
    the mean over all trained tokens of the optimizer step (across micro-batches, gradient
    accumulation and processes), not a mean of per-micro-batch means. PEFT models keep it: Trainer
    looks through the adapter to the base model's forward, which takes the loss kwargs. The
    cross-entropy itself is computed a chunk of tokens at a time, never holding the logits of the
    whole micro-batch (vitune.models.chunked_loss, which decides: Liger's kernel where it is
    applied, the model's own forward where chunks cannot be exact). Several
    processes share out every global batch with no item repeated, the epoch's short last one
    included (train/shares.py), so they train exactly what one process trains.
    """

    vocab_loss = True


class _AtLastStep(Exception):
    pass


class _NothingLeftToTrain(TrainerCallback):
    # Trainer checks max_steps only after a step, so a run resumed at max_steps would train one more.
    def on_train_begin(self, args, state, control, **kwargs):
        if state.max_steps > 0 and state.global_step >= state.max_steps:
            raise _AtLastStep


def logging_every(max_steps: int) -> int:
    """The logging cadence of a run whose train.logging_steps is unset: about 20 logged steps, at most
    10 steps apart (6 steps: every step; 100: every 5th; 1,000: every 10th)."""
    return max(1, min(10, max_steps // 20))


class LoggingSchedule(TrainerCallback):
    """Which optimizer steps are logged (to metrics.jsonl, the progress bar, tensorboard): every
    train.logging_steps (unset: `logging_every` of the run's steps), and always the first
    (TrainingArguments.logging_first_step) and the last, so that even a 3-step run has a loss
    at both ends. A step is logged once, whichever rule asks for it."""

    def __init__(self, every: int | None):
        self.every = every

    def on_train_begin(self, args, state, control, **kwargs):
        if self.every is None:  # the run's steps are known only now (epochs x batches, or train.max_steps)
            state.logging_steps = logging_every(state.max_steps)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_log = True


class MetricsFile(TrainerCallback):
    """One JSON object per logged step in metrics.jsonl (rank 0 only): the fixed KEYS, a stage's own
    keys, and the figures of evaluations while training (eval/<file>/<figure>, in lines of their own)."""

    KEYS = ("loss", "learning_rate", "grad_norm", "real_tokens", "tokens_per_s", "padding_fraction", "tflops", "mfu",
            "peak_memory_gib", "eval_loss")

    def __init__(self, path: Path, resume_step: int | None = None, keys: tuple[str, ...] = ()):
        self.path = path
        # a stage's own metrics (rewards/accuracy, ...), in training and held out (eval_ prefixed)
        self.keys = self.KEYS + tuple(keys) + tuple(f"eval_{k}" for k in keys)
        self.losses: list[tuple[int, float]] = []
        self.train_records: list[dict] = []  # every training log of this process's run (not the resumed part)
        self.evals: list[tuple[int, float]] = []  # (step, held-out loss)
        self.eval_records: list[dict] = []  # every held-out record, for the stage's metrics
        self.eval_seconds = 0.0  # time spent evaluating, which is not training speed
        self.task_records: list[dict] = []  # every evaluation while training: {"step": n, "eval/<file>/<figure>": x}
        if resume_step is not None and path.is_file():
            # a resumed run logs the steps after its checkpoint again: drop the old ones
            kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            for line in kept:
                record = json.loads(line)
                if "eval_loss" in record:
                    self.evals.append((record["step"], record["eval_loss"]))
                    self.eval_records.append(record)
                if any(key.startswith(TASK_PREFIX) for key in record):
                    self.task_records.append(record)

    def eval_value(self, key: str, first: bool = False):
        """A held-out metric at the first evaluation (before training: step 0) or the last one."""
        if first:
            record = self.eval_records[0] if self.eval_records and self.eval_records[0]["step"] == 0 else {}
        else:
            record = self.eval_records[-1] if self.eval_records else {}
        return record.get(key)

    def task_summary(self) -> dict:
        """{eval/<file>/<figure>: {first, first_step, last, last_step}} of the evaluations while training."""
        out: dict = {}
        for record in self.task_records:
            for key, value in record.items():
                if key.startswith(TASK_PREFIX):
                    entry = out.setdefault(key, {"first": value, "first_step": record["step"]})
                    entry.update(last=value, last_step=record["step"])
        return out

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        self.eval_seconds += logs.get("eval_runtime", 0.0)
        record = {"step": state.global_step}
        record.update({k: logs[k] for k in self.keys if k in logs})
        record.update({k: v for k, v in logs.items() if k.startswith(TASK_PREFIX)})
        if len(record) == 1:
            return
        if any(key.startswith(TASK_PREFIX) for key in record):
            self.task_records.append(record)
        if "loss" in record:
            self.losses.append((state.global_step, record["loss"]))
            self.train_records.append(record)
        if "eval_loss" in record:
            self.evals.append((state.global_step, record["eval_loss"]))
            self.eval_records.append(record)
        # every process keeps the records (the runner's last evaluation, a collective, is decided from
        # them on each); one writes them
        if not state.is_world_process_zero:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")


class RichProgress(TrainerCallback):
    """A rich progress bar: step, loss, learning rate, tokens/s, padding, MFU and time left."""

    def __init__(self, console, fields: tuple[tuple[str, str], ...] = ()):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.fields = fields  # a stage's own (label, log key) pairs, e.g. ("acc", "rewards/accuracy")
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss [cyan]{task.fields[loss]}"),
            *(TextColumn(f"{label} {{task.fields[f{n}]}}") for n, (label, _) in enumerate(fields)),
            TextColumn("lr {task.fields[lr]}"),
            TextColumn("{task.fields[tps]} tok/s"),
            TextColumn("pad {task.fields[pad]}"),
            TextColumn("{task.fields[mfu]}"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.task = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.progress.start()
            own = {f"f{n}": "-" for n in range(len(self.fields))}
            self.task = self.progress.add_task("train", total=state.max_steps, loss="-", lr="-", tps="-", pad="-", mfu="",
                                               **own)

    def on_step_end(self, args, state, control, **kwargs):
        if self.task is not None:
            self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.task is not None and logs and any(key.startswith(TASK_PREFIX) for key in logs):
            self.progress.console.print(f"eval step {state.global_step}: {task_line(logs)}", highlight=False)
        if self.task is None or not logs or "loss" not in logs:
            return
        self.progress.update(
            self.task,
            loss=f"{logs['loss']:.4f}",
            lr=f"{logs.get('learning_rate', 0):.2e}",
            tps=f"{logs.get('tokens_per_s', 0):,.0f}",
            pad=f"{logs.get('padding_fraction', 0):.0%}",
            mfu=f"MFU {logs['mfu']:.0%}" if "mfu" in logs else f"{logs.get('tflops', 0):.2f} TFLOP/s",
            **{f"f{n}": f"{logs[key]:.3f}" for n, (_, key) in enumerate(self.fields) if key in logs},
        )

    def on_train_end(self, args, state, control, **kwargs):
        if self.task is not None:
            self.progress.stop()
            self.task = None


def task_line(figures: dict) -> str:
    """{eval/vmlu_vi/acc: 0.25, eval/vmlu_vi/acc_norm: 0.3, eval/qa/loss: 2.1} -> "vmlu_vi acc 0.2500
    acc_norm 0.3000 | qa loss 2.1000"; values may be (first, last) pairs, shown as "first -> last"."""
    by_file: dict[str, list[str]] = {}
    for key, value in figures.items():
        if not key.startswith(TASK_PREFIX):
            continue
        name, _, figure = key[len(TASK_PREFIX):].rpartition("/")
        shown = f"{value[0]:.4f} -> {value[1]:.4f}" if isinstance(value, tuple) else f"{value:.4f}"
        by_file.setdefault(name, []).append(f"{figure} {shown}")
    return " | ".join(f"{name} {' '.join(parts)}" for name, parts in by_file.items())
