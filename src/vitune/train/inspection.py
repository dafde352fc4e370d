"""`vitune data inspect` and the web UI's data tab: a run's data prepared exactly as its stage
would prepare it for training (cache included), and counted."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice

from vitune.config import RunConfig
from vitune.data.inspect import statistics
from vitune.data.templates import resolve_template
from vitune.data.tokenize import TokenizedRow
from vitune.models.loading import load_tokenizer
from vitune.train.stages import stage_for


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
