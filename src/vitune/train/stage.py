"""The contract between the shared runner (vitune.train.runner) and a training stage.

A stage (one file in vitune/train/stages/) is a `Stage` subclass that overrides only what is its
own; the defaults here are those of supervised fine-tuning on a causal LM. The runner calls the
hooks in this order:

    check(config)                                 rules only this stage has
    prepare_data(config, tokenizer, template, ...) -> (train rows, eval rows, report)
    data_line(report, rows, eval rows, template)  the line printed after the data is read
    load_model(config, tokenizer) -> adapt_model(model, config, checkpointing)
    batches(config, plan, rows, eval rows, pad id, console) -> Batches
    training_arguments(config, run, out, plan) -> make_trainer(config, run, **Trainer's arguments)
    save_extras(trainer, out, config), report_extras(trainer)
    result_lines(summary, out)                    what `vitune train` prints at the end

What differs between stages is an attribute or a hook here, never a comparison of stage names
elsewhere. A stage keeps no state between hooks: what one hook computed reaches the next through
the runner (the report, the `PreparedRun`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from vitune.config import STAGE_INFO, RunConfig
from vitune.models.loading import adapt_model, check_adapter_base, load_model
from vitune.train.arguments import ScaleOut, SpeedPlan, training_arguments
from vitune.train.trainer import task_line


@dataclass
class Batches:
    """What the Trainer gets from a stage: datasets (lists of dicts), the collator, and how full
    the packed bins are (None when training padded: the runner reports the padding instead)."""

    train: list
    eval: list
    collator: object
    fill: float | None = None


@dataclass
class PreparedRun:
    """Everything the runner decided and prepared before a model is loaded (what --dry-run shows),
    each computed once and handed whole to `fit` and to the stage's hooks."""

    stage: "Stage"
    tokenizer: object
    template: object  # None for stages that render no conversations (pt)
    train_rows: list
    eval_rows: list
    report: object  # the stage's data report (vitune.data.pipeline.DataReport)
    scale_out: ScaleOut = field(default_factory=lambda: ScaleOut({}))
    optimizer: str = "adamw_torch"  # train.optimizer resolved for this machine
    model_config: object = None
    data_key: str | None = None  # the prepared data's cache key: contents of the files, tokenizer, template
    fingerprint: dict | None = None  # what a checkpoint must match to be resumed (train/checkpoint.py)
    config_yaml: str = ""  # the resolved config, as config.yaml and every checkpoint hold it
    resume_from: Path | None = None
    evaluation: object = None  # the eval section's files, read and checked (train/evaluation.py EvalPlan)
    pad_token_id: int | None = None  # None: the tokenizer's

    @property
    def pad_id(self) -> int:
        return self.pad_token_id if self.pad_token_id is not None else self.tokenizer.pad_token_id


class Stage:
    name = "base"
    # extra keys the stage logs (and metrics.jsonl keeps), e.g. "rewards/accuracy"; their held-out
    # values at the start and end go into summary.json as eval_<key>_start / _end
    metric_keys: tuple[str, ...] = ()
    # training metrics whose first and last logged values go into summary.json (<key>_first, <key>_last)
    summary_keys: tuple[str, ...] = ()
    # (label, log key) pairs shown in the progress bar beside the loss
    progress_fields: tuple[tuple[str, str], ...] = ()
    # True: a packed batch runs the model on one padding-free row (vitune's row-wise attention wraps it)
    packed_forward = True
    # True: the loss is transformers' causal-LM loss, which Liger's fused kernels may replace (on a GPU)
    liger = False
    # False where the loss says nothing about held-out rows (rl: GRPO's loss is ~0 on-policy); the
    # summary then has no eval_loss_start / _end and the stage's held-out metrics speak instead
    held_out_loss = True
    # False for stages that render no conversations (pt): no chat template is resolved or written
    uses_template = True
    # what the run folder is used with afterwards, printed at the end ({out}: the run folder)
    next_step = "chat with it: vitune chat {out}"

    @property
    def info(self):
        """The stage's row in the config's stage table (name, summary, own section)."""
        return STAGE_INFO[self.name]

    def check(self, config: RunConfig) -> None:
        """Rules across the config that only this stage has (raise ConfigError)."""
        if config.model.adapter:
            check_adapter_base(config.model.adapter, config.model.name_or_path, config.model.allow_pickle)

    def metrics_of(self, config: RunConfig) -> tuple[str, ...]:
        """The metric keys this run logs (a stage whose metrics depend on its config overrides it)."""
        return self.metric_keys

    def prepare_data(self, config: RunConfig, tokenizer, template, data_key: str | None = None,
                     resume_from: Path | None = None):
        """-> (train rows, eval rows, report) with exact counts (read = kept + rejected). `data_key`:
        the cache key the runner computed (None: compute it); `resume_from`: the checkpoint a
        resumed run starts from."""
        raise NotImplementedError

    def describe_rows(self, report, train_rows, eval_rows) -> str:
        """What the data line says about the rows beyond the counts (e.g. '170 pairs, ')."""
        return ""

    def data_line(self, report, train_rows, eval_rows, template) -> str:
        """The line printed after the data is prepared: exact counts, then the stage's words."""
        return (
            f"data: {report.rows_read} rows read, {report.rows_kept} kept, {report.rows_rejected} rejected"
            + (f" {report.rejected_by_reason}" if report.rows_rejected else "")
            + f", {report.rows_truncated} truncated; {self.describe_rows(report, train_rows, eval_rows)}"
            + f"{report.total_tokens:,} tokens, {report.trained_token_fraction:.0%} trained"
            + (f"; template {template.name}" if template else "")
        )

    def load_model(self, config: RunConfig, tokenizer):
        return load_model(config.model, config.method)

    def adapt_model(self, model, config: RunConfig, gradient_checkpointing: bool):
        return adapt_model(model, config.method, gradient_checkpointing, adapter=config.model.adapter,
                           allow_pickle=config.model.allow_pickle)

    def batches(self, config: RunConfig, plan: SpeedPlan, train_rows, eval_rows, pad_token_id: int, console) -> Batches:
        raise NotImplementedError

    def training_arguments(self, config: RunConfig, run: PreparedRun, output_dir: Path, plan: SpeedPlan,
                           has_eval: bool):
        """The run's TrainingArguments (a stage on a TRL trainer returns TRL's config class, with its fields)."""
        return training_arguments(config, output_dir, has_eval, plan, run.scale_out, run.optimizer,
                                  resuming=run.resume_from is not None)

    def make_trainer(self, config: RunConfig, run: PreparedRun, **kwargs):
        """The stage's Trainer, given Trainer's own arguments (model, args, datasets, collator, ...)."""
        raise NotImplementedError

    def save_extras(self, trainer, out: Path, config: RunConfig) -> None:
        """Files the stage adds to the run folder beside the weights and tokenizer."""

    def report_after_training(self, config: RunConfig) -> bool:
        """True where the data report is complete only once training has read the data (a stream):
        data_report.json is then written at the end, with `report_extras`."""
        return False

    def report_extras(self, trainer) -> dict:
        """What training adds to data_report.json (with report_after_training)."""
        return {}

    def result_lines(self, summary: dict, out: Path) -> list[str]:
        """The lines `vitune train` prints after 'done: ...' (plain text)."""
        lines = []
        if summary.get("eval_loss_end") is not None:
            before = f"{summary['eval_loss_start']:.4f} -> " if summary.get("eval_loss_start") is not None else ""
            lines.append(f"held-out loss {before}{summary['eval_loss_end']:.4f}")
        if summary.get("evaluation"):  # the eval section's figures, before training (or the first kept) and at the end
            figures = {key: (v["first"], v["last"]) for key, v in summary["evaluation"].items()}
            lines.append(f"eval: {task_line(figures)}")
        lines += self.held_out_lines(summary)
        lines.append(self.next_step.format(out=out))
        return lines

    def held_out_lines(self, summary: dict) -> list[str]:
        """The stage's own figures at the end (held-out accuracy, bits per character, rewards)."""
        return []


def start_to_end(summary: dict, key: str, fmt: str = ".4f") -> str:
    """'<start> -> <end>' of a held-out figure in summary.json (the start may be missing on a resume)."""
    start = summary.get(f"{key}_start")
    return (f"{start:{fmt}} -> " if start is not None else "") + f"{summary[f'{key}_end']:{fmt}}"
