"""The data step of the rm and dpo stages: preference rows -> tokenised chosen/rejected sequences.

Each answer is rendered as SFT renders one: the prompt turns, then the answer as the last
assistant turn, with the run's chat template. The trained tokens are the answer and its one
end-of-turn marker, found in the rendering (vitune.data.tokenize), so there is no doubled EOS
and no stray BOS before an answer: the sequence is exactly what SFT would train on.

`prepare_preference_data(config, tokenizer, template, kto=False)` returns the training pairs,
the evaluation pairs and a `DataReport` (read = kept + rejected, always). Rows that cannot be
used -- chosen identical to rejected, an empty answer, a prompt that alone fills max_length --
are collected with their file and row; `data.on_error: raise` stops with the first five.
Unpaired rows (prompt, completion, label) are kept only for the kto loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from vitune.config import DataConfig, DatasetSpec
from vitune.data.formats import OTHER_PARSERS, RowProblem
from vitune.data.pipeline import (
    DataReport, _normalize, _place_system_prompt, formatted_rows, load_records, raise_for_bad_rows,
)
from vitune.data.records import Conversation, Message, Preference, Rejection
from vitune.data.templates import Template, TemplateRefused
from vitune.data.tokenize import IGNORE, TokenizedRow, tokenize_conversations
from vitune.errors import DataError


@dataclass
class TokenizedPair:
    """One preference row, tokenised: the chosen and the rejected sequence (prompt + answer, labels
    on the answer). An unpaired row (KTO) has one of them None."""

    chosen: Optional[TokenizedRow]
    rejected: Optional[TokenizedRow]
    margin: float = 0.0
    source: str = ""

    @property
    def sequences(self) -> list[TokenizedRow]:
        return [s for s in (self.chosen, self.rejected) if s is not None]

    @property
    def truncated(self) -> bool:
        return any(s.truncated for s in self.sequences)


def prompt_length(row: TokenizedRow) -> int:
    """Tokens before the first trained one: the prompt."""
    return next((i for i, label in enumerate(row.labels) if label != IGNORE), len(row.labels))


def read_preferences(spec: DatasetSpec, data: DataConfig, report: DataReport, stage: str) -> list[Preference]:
    """One dataset entry -> preference records; unusable rows go to the report."""
    out: list[Preference] = []
    for raw, row_format in formatted_rows(spec, report, "preference | unpaired", lambda: len(out)):
        if row_format not in ("preference", "unpaired"):
            what = "raw text" if row_format == "text" else f"{row_format} (instruction/conversation)"
            raise DataError(
                f"{raw.source}: {what} rows cannot train stage {stage}, which learns from preference rows "
                "(a prompt with chosen and rejected answers); train them with train.stage: sft, or set format: "
                "preference if detection chose wrong"
            )
        try:
            record = OTHER_PARSERS[row_format](raw.row, spec.columns)
        except RowProblem as problem:
            report.rejections.append(Rejection(raw.source, problem.reason, f"{row_format} row: {problem.detail}", raw.row))
            continue
        record.source = raw.source
        if record.chosen is not None and record.rejected is not None \
                and record.chosen.content.strip() == record.rejected.content.strip():
            report.rejections.append(Rejection(raw.source, "identical answers",
                                               "chosen and rejected are the same text: the row teaches nothing; fix "
                                               "or remove it", raw.row))
            continue
        out.append(_normalized(record, data, report))
    return out


def _normalized(record: Preference, data: DataConfig, report: DataReport) -> Preference:
    """Vietnamese normalisation and data.system_prompt, as for SFT (counted once per row)."""
    answers = [a for a in (record.chosen, record.rejected) if a is not None]
    holder = Conversation([*record.prompt_messages, *answers], system=record.system, source=record.source)
    report.rows_normalized += _normalize(holder, data.normalize)
    placed = _place_system_prompt(holder, data.system_prompt, report)
    n = len(record.prompt_messages)
    chosen = placed.messages[n] if record.chosen is not None else None
    rejected = placed.messages[-1] if record.rejected is not None else None
    return Preference([Message(m.role, m.content, m.input, m.train) for m in placed.messages[:n]], chosen, rejected,
                      system=placed.system, source=record.source, margin=record.margin)


def tokenize_preferences(records: list[Preference], tokenizer, template: Template, data: DataConfig,
                         report: Optional[DataReport], count_tokens: bool = True) -> list[TokenizedPair]:
    """Render and tokenise both answers of every record; refusals and overlong rows go to `report`."""
    convs, owners = [], []
    for k, record in enumerate(records):
        for answer in (record.chosen, record.rejected):
            if answer is not None:
                convs.append(record.conversation(answer))
                owners.append(k)
    # mask_history: only the answer (the last assistant turn) is trained, never an earlier one
    rows = tokenize_conversations(convs, tokenizer, template, mask_history=True, keep_refusals=True)
    per_record: dict[int, list] = {}
    for k, row in zip(owners, rows):
        per_record.setdefault(k, []).append(row)
    kept: list[TokenizedPair] = []
    for k, record in enumerate(records):
        sequences = per_record[k]
        problem = _problem(sequences, data)
        if problem is not None:
            if report is not None:
                report.rejections.append(Rejection(record.source, *problem))
            continue
        fitted = [_fit(row, data.max_length) for row in sequences]
        it = iter(fitted)
        pair = TokenizedPair(next(it) if record.chosen is not None else None,
                             next(it) if record.rejected is not None else None,
                             record.margin or 0.0, record.source)
        kept.append(pair)
        if report is not None and count_tokens:
            report.rows_truncated += pair.truncated
            for row in pair.sequences:
                report.total_tokens += len(row.input_ids)
                report.trained_tokens += len(row.labels) - row.labels.count(IGNORE)
    return kept


def _problem(sequences: list, data: DataConfig) -> Optional[tuple[str, str]]:
    for row in sequences:
        if isinstance(row, TemplateRefused):
            return row.reason, row.detail
    for row in sequences:
        prompt = prompt_length(row)
        if prompt == len(row.labels):
            return "nothing to train", "the template left no trained token of the answer"
        if prompt >= data.max_length:
            return ("prompt too long", f"the prompt alone is {prompt} tokens, data.max_length is {data.max_length}: no "
                    "answer token would fit; raise data.max_length or shorten the prompt")
    longest = max(len(row.input_ids) for row in sequences)
    if longest > data.max_length and data.overflow == "drop":
        return ("too long", f"{longest} tokens > data.max_length {data.max_length} (raise max_length or set "
                "data.overflow: truncate, which cuts the end of the answer)")
    return None


def _fit(row: TokenizedRow, max_length: int) -> TokenizedRow:
    if len(row.input_ids) <= max_length:
        return row
    return TokenizedRow(row.input_ids[:max_length], row.labels[:max_length], truncated=True)


def load_preferences(data: DataConfig, seed: int, report: DataReport, stage: str):
    """All training records (mixed, weighted, shuffled by seed) and the evaluation ones; bad rows
    are reported after tokenisation, with those it finds (a prompt too long, ...), all at once."""
    return load_records(data, seed, report, lambda spec: read_preferences(spec, data, report, stage),
                        what="preference", report_bad_rows_first=False)


def prepare_preference_data(data: DataConfig, tokenizer, template: Template, seed: int, stage: str,
                            unpaired: bool = False):
    """-> (train pairs, eval pairs, report). Raises DataError for data that cannot be used.

    `unpaired`: the loss takes rows with one answer (KTO); otherwise such rows are refused."""
    report = DataReport()
    train_records, eval_records = load_preferences(data, seed, report, stage)
    if not unpaired:
        for record in [*train_records, *eval_records]:
            if record.chosen is None or record.rejected is None:
                raise DataError(f"{record.source}: an unpaired row (prompt, completion, label) has no answer to compare "
                                f"with; stage {stage} needs chosen and rejected (only dpo.loss: kto takes unpaired rows)")
    train = tokenize_preferences(train_records, tokenizer, template, data, report)
    evaluation = tokenize_preferences(eval_records, tokenizer, template, data, report, count_tokens=False)
    raise_for_bad_rows(report, data.on_error)
    if not train:
        raise DataError(f"every training row was rejected ({report.rejected_by_reason}); see the reasons above")
    report.rows_kept = report.rows_read - report.rows_rejected
    return train, evaluation, report
