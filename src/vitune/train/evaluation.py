"""Evaluation while training: `vitune eval`'s tasks on the model being trained (the `eval:` section).

    prepare_evaluation(config, tokenizer, template, zero_stage) -> EvalPlan
                                              at start-up, before the model loads: bad files fail here
    TrainingEvaluation(config.eval, plan, tokenizer, eval_steps)
                                              a TrainerCallback: before the first step, every
                                              train.eval_steps steps and after the last one

Each figure is logged as eval/<file stem>/<figure> (eval/vmlu_vi/acc, eval/qa_vi_eval/chrf, ...)
through the trainer's log, so metrics.jsonl, tensorboard and the progress display all get it. The
figures are those `vitune eval RUN --data FILE --limit N` reports for the model at that step: the
same code (vitune.eval.runner) scores the same rows; a LoRA run is scored with its adapter on, as
trained. Without train.eval_steps the model is evaluated before training and at the end only.

The time spent evaluating is left out of tokens/s and of the run's seconds. Evaluating changes no
training: the model runs in eval mode without gradients and goes back to train mode after.

Limitation: in a run of several processes, rank 0 evaluates alone while the others wait for it at
their next gradient exchange; so weights sharded across ranks (train.fsdp, DeepSpeed ZeRO-3) are refused.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape
from transformers import TrainerCallback

from vitune.config import EvalConfig, RunConfig
from vitune.data.sources import looks_local, resolve_files
from vitune.data.templates import resolve_template
from vitune.errors import ConfigError, DataError
from vitune.models.attention import unpacked_attention
from vitune.eval.plot import TASK_PREFIX
from vitune.eval.runner import FileRows, adapter_reference, headline, make_scorer, read_files, score_rows


@dataclass
class EvalFile:
    name: str  # the file's stem: its figures are logged as eval/<name>/<figure>
    rows: FileRows


@dataclass
class EvalPlan:
    files: list[EvalFile]
    template: object  # what prompts are rendered with: the run's template (pt: the tokenizer's own)


def prepare_evaluation(config: RunConfig, tokenizer, template, zero_stage: int | None = None) -> EvalPlan:
    """The eval section's files, read and checked, and the template their prompts take. A missing
    file, a bad row (unless data.on_error: skip), a file with nothing to score or a task the run
    cannot score is one line naming it. `zero_stage`: DeepSpeed's ZeRO stage of the run (train/arguments.py)."""
    files = read_eval_files(config, zero_stage)
    if template is None and any(f.rows.task != "text" for f in files):
        # pt renders no conversations; `vitune eval` of its run folder uses the tokenizer's own template
        template = resolve_template("auto", tokenizer)
    return EvalPlan(files, template)


def read_eval_files(config: RunConfig, zero_stage: int | None = None) -> list[EvalFile]:
    """The eval section's files, read and checked (see prepare_evaluation)."""
    settings = config.eval
    names: dict[str, str] = {}
    for i, path in enumerate(settings.data):
        if looks_local(path) and not resolve_files(path):
            raise ConfigError(f"eval.data[{i}] = {path!r}: file not found (paths are relative to where you run vitune)")
        name = Path(path).stem
        if name in names:
            raise ConfigError(f"eval.data[{i}] = {path!r}: its figures would be logged as eval/{name}/... like those "
                              f"of {names[name]!r}; give the files different names")
        names[name] = path
    if zero_stage == 3:
        raise ConfigError(f"the eval section cannot run with ZeRO-3 ({config.train.deepspeed}: the weights are "
                          "sharded across processes); use ZeRO-2, or evaluate the finished run with vitune eval")
    out = []
    for i, path in enumerate(settings.data):
        try:
            f = read_files([path], settings.task, settings.limit)[0]
        except DataError as exc:
            raise DataError(f"eval.data[{i}]: {exc}") from None
        if f.rejections and config.data.on_error == "raise":
            first = f.rejections[0]
            more = f" (and {len(f.rejections) - 1} more)" if len(f.rejections) > 1 else ""
            raise DataError(f"eval.data[{i}]: {first.line()}{more}; fix the row, or set data.on_error: skip to "
                            "leave such rows out")
        if not f.items:
            raise DataError(f"eval.data[{i}] = {f.path!r}: no row to score ({f.rows_read} read, "
                            f"{len(f.rejections)} rejected as {f.task})")
        if f.task == "preference" and config.method.type == "full":
            raise ConfigError(f"eval.data[{i}] = {f.path!r} holds preference pairs, scored by the implicit reward "
                              "against the run's base: that needs method.type lora or qlora (the adapter switched off)")
        out.append(EvalFile(Path(f.path).stem, f))
    return out


class TrainingEvaluation(TrainerCallback):
    """Scores the live model on the eval files before the first step, every `eval_steps` steps and
    after the last one, and logs the headline figures through the trainer (`attach` it to one
    with VituneTrainerMixin)."""

    def __init__(self, settings: EvalConfig, plan: EvalPlan, tokenizer, eval_steps: int | None):
        self.settings = settings
        self.files = plan.files
        self.tokenizer = tokenizer
        self.template = plan.template
        self.eval_steps = eval_steps
        self.trainer = None
        self.seconds = 0.0  # time spent evaluating: not training
        self.noted: set[str] = set()  # files whose unscorable rows were already reported

    def attach(self, trainer) -> "TrainingEvaluation":
        self.trainer = trainer
        trainer.add_callback(self)
        return self

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:  # a resumed run keeps the figures logged before its checkpoint
            self._evaluate(state, control, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        last = state.max_steps > 0 and state.global_step >= state.max_steps
        if last or (self.eval_steps and state.global_step % self.eval_steps == 0):
            self._evaluate(state, control, model)

    def _evaluate(self, state, control, model) -> None:
        if not state.is_world_process_zero:
            return
        started = time.perf_counter()
        logs = self.figures(model)
        seconds = time.perf_counter() - started
        self.seconds += seconds
        should_log = control.should_log
        self.trainer.log_evaluation(logs, seconds)
        control.should_log = should_log  # logging resets it: the step's own training log still comes

    def figures(self, model) -> dict[str, float]:
        """{eval/<file>/<figure>: value} of `model` as it is now."""
        s = self.settings
        scorer = make_scorer(model, self.tokenizer, self.template, s.batch_size)
        reference = adapter_reference(scorer)
        was_training = model.training
        model.eval()
        out = {}
        try:
            with torch.no_grad(), unpacked_attention(model):
                for f in self.files:
                    figures, dropped = score_rows(scorer, f.rows, s.shots, s.generate, s.max_new_tokens,
                                                  reference=reference)
                    if dropped and f.name not in self.noted:
                        self.noted.add(f.name)
                        self._note(f, dropped)
                    out.update({f"{TASK_PREFIX}{f.name}/{key}": value for key, value in headline(figures).items()})
        finally:
            model.train(was_training)
        return out

    def _note(self, f: EvalFile, dropped) -> None:
        Console(stderr=True, highlight=False).print(
            f"[yellow]notice[/] eval: {len(dropped)} of {len(f.rows.items)} rows of {escape(f.rows.path)} cannot be "
            f"scored by this model and are left out; first: {escape(dropped[0].line())}")

