"""What a training stage is: the few things that differ between sft, rm, dpo and rl.

The runner (vitune.train.runner) calls these hooks in order; a stage overrides only its own.
The defaults are those of supervised fine-tuning on a causal LM.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vitune.config import RunConfig


@dataclass
class Batches:
    """What the Trainer gets from a stage: datasets (lists of dicts), the collator, and how full
    the packed bins are (None when training padded: the runner reports the padding instead)."""

    train: list
    eval: list
    collator: object
    fill: float | None = None


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
    # False where the loss says nothing about held-out rows (rl: GRPO's loss is ~0 on-policy); the
    # summary then has no eval_loss_start / _end and the stage's held-out metrics speak instead
    held_out_loss = True
    # False for stages that render no conversations (pt): no chat template is resolved or written
    uses_template = True

    def check(self, config: RunConfig) -> None:
        """Rules across the config that only this stage has (raise ConfigError)."""
        if config.model.adapter:
            from vitune.models.loading import check_adapter_base

            check_adapter_base(config.model.adapter, config.model.name_or_path, config.model.allow_pickle)

    def prepare_data(self, config: RunConfig, tokenizer, template):
        """-> (train rows, eval rows, report) with exact counts (read = kept + rejected)."""
        raise NotImplementedError

    def describe_rows(self, train_rows, eval_rows) -> str:
        """What the data line says about the rows beyond the counts (e.g. '170 pairs, ')."""
        return ""

    def data_line(self, report, train_rows, eval_rows, template) -> str:
        """The line printed after the data is prepared: exact counts, then the stage's words."""
        return (
            f"data: {report.rows_read} rows read, {report.rows_kept} kept, {report.rows_rejected} rejected"
            + (f" {report.rejected_by_reason}" if report.rows_rejected else "")
            + f", {report.rows_truncated} truncated; {self.describe_rows(train_rows, eval_rows)}"
            + f"{report.total_tokens:,} tokens, {report.trained_token_fraction:.0%} trained"
            + (f"; template {template.name}" if template else "")
        )

    def load_model(self, config: RunConfig, tokenizer):
        from vitune.models.loading import load_model

        return load_model(config.model, config.method)

    def adapt_model(self, model, config: RunConfig, gradient_checkpointing: bool):
        from vitune.models.loading import adapt_model

        return adapt_model(model, config.method, gradient_checkpointing, adapter=config.model.adapter,
                           allow_pickle=config.model.allow_pickle)

    def batches(self, config: RunConfig, plan, train_rows, eval_rows, pad_token_id: int, console) -> Batches:
        raise NotImplementedError

    def training_arguments(self, config: RunConfig, output_dir: Path, has_eval: bool, plan, resuming: bool = False):
        """The run's TrainingArguments (a stage on a TRL trainer returns TRL's config class, with its fields)."""
        from vitune.train.runner import training_arguments

        return training_arguments(config, output_dir, has_eval, plan, resuming=resuming)

    def make_trainer(self, config: RunConfig, **kwargs):
        raise NotImplementedError

    def save_extras(self, trainer, out: Path, config: RunConfig) -> None:
        """Files the stage adds to the run folder beside the weights and tokenizer."""


def stage_for(config: RunConfig) -> Stage:
    """The Stage object of config.train.stage."""
    name = config.train.stage
    if name == "sft":
        from vitune.train.sft import SftStage

        return SftStage()
    if name == "pt":
        from vitune.train.pretrain import PretrainStage

        return PretrainStage()
    if name == "dpo":
        from vitune.train.preference import PreferenceStage

        return PreferenceStage()
    if name == "rm":
        from vitune.train.reward import RewardStage

        return RewardStage()
    if name == "rl":
        from vitune.train.rl import RlStage

        return RlStage()
    raise ValueError(f"unknown stage {name!r}")


@dataclass
class Inspection:
    """The data of a run as its stage reads it: what `vitune data inspect` and the web UI show."""

    stats: dict  # the JSON of `vitune data inspect --json`
    rows: list  # training rows (a stream's first bins)
    tokenizer: object
    template: object  # None for stages that render no conversations (pt)
    report: object  # the DataReport


STREAM_PREVIEW = 200  # bins of a stream that inspection reads


def inspect_data(config: RunConfig) -> Inspection:
    """Prepare the run's data exactly as training would (cache included) and count it."""
    from itertools import islice

    from vitune.data.inspect import statistics
    from vitune.data.templates import resolve_template
    from vitune.data.tokenize import TokenizedRow
    from vitune.models.loading import load_tokenizer

    tokenizer = load_tokenizer(config.model.name_or_path, config.model.trust_remote_code)
    stage = stage_for(config)  # the data as the run's stage reads it: conversations, preference pairs, ...
    template = resolve_template(config.model.template, tokenizer) if stage.uses_template else None
    rows, eval_rows, report = stage.prepare_data(config, tokenizer, template)
    if config.data.streaming:  # a stream has no end to count to: measure its first bins
        rows = [TokenizedRow(b["input_ids"], b["labels"]) for b in islice(iter(rows), STREAM_PREVIEW)]
    stats = statistics(report, rows, eval_rows,
                       packed_length=config.data.max_length if config.data.packing and not config.data.streaming else None)
    stats["template"] = template.name if template else None
    stats["template_notices"] = list(template.notices) if template else []
    if config.data.streaming:
        stats["streaming_preview_bins"] = len(rows)
    return Inspection(stats, rows, tokenizer, template, report)
