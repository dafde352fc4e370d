"""The data step of a run: files -> rows -> conversations -> token ids and labels.

`prepare_sft_data(config.data, tokenizer, template, seed)` returns the training rows, the
evaluation rows and a `DataReport` with exact counts (read = kept + rejected, always).
Bad rows are collected with their file and row; `on_error: raise` stops with the first
five, `skip` keeps going and the report lists them.
"""

from __future__ import annotations

import dataclasses
import random
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from vitune.config import DataConfig, DatasetSpec, NormalizeSettings
from vitune.data import byte_bpe, cache
from vitune.data.formats import PARSERS, RowProblem, detect_format
from vitune.data.normalize import normalize_with_change
from vitune.data.records import Conversation, Rejection, fold_system_prompt
from vitune.data.sources import read_rows
from vitune.data.templates import Template, TemplateRefused
from vitune.data.tokenize import IGNORE, TokenizedRow, fit_length, tokenize_conversations
from vitune.errors import DataError


@dataclass
class DataReport:
    rows_read: int = 0
    rows_kept: int = 0
    rows_truncated: int = 0
    rows_normalized: int = 0  # rows whose text normalisation (Unicode form or tone marks) changed
    system_prompts_folded: int = 0  # data.system_prompt: fold
    system_prompts_dropped: int = 0  # data.system_prompt: drop
    rows_split: int = 0  # pretraining documents longer than max_length, split into chunks (none dropped)
    eval_characters: int = 0  # characters of the held-out pretraining text (for bits per character)
    rejections: list[Rejection] = field(default_factory=list)
    formats: dict[str, dict[str, int]] = field(default_factory=dict)  # file -> {format (given or detected): rows}
    total_tokens: int = 0
    trained_tokens: int = 0
    cached_at: Optional[Path] = field(default=None, compare=False)  # the cache entry used or written
    from_cache: bool = field(default=False, compare=False)

    def fields(self) -> dict:
        """The counted fields, for the cache."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("cached_at", "from_cache")}

    @property
    def rows_rejected(self) -> int:
        return len(self.rejections)

    @property
    def rejected_by_reason(self) -> dict[str, int]:
        return dict(Counter(r.reason for r in self.rejections))

    @property
    def trained_token_fraction(self) -> float:
        return self.trained_tokens / self.total_tokens if self.total_tokens else 0.0

    def summary(self) -> dict:
        return {
            "rows_read": self.rows_read,
            "rows_kept": self.rows_kept,
            "rows_rejected": self.rows_rejected,
            "rejected_by_reason": self.rejected_by_reason,
            "rows_truncated": self.rows_truncated,
            "rows_normalized": self.rows_normalized,
            "system_prompts_folded": self.system_prompts_folded,
            "system_prompts_dropped": self.system_prompts_dropped,
            "rows_split": self.rows_split,
            "formats": self.formats,
            "total_tokens": self.total_tokens,
            "trained_tokens": self.trained_tokens,
            "trained_token_fraction": round(self.trained_token_fraction, 4),
        }


def _normalize(conv: Conversation, settings: NormalizeSettings) -> bool:
    """Normalise every text of `conv` in place; True if any of them changed."""
    if settings.unicode == "none" and settings.vi_tone == "keep":
        return False
    changed = False
    form_only = settings.vi_tone == "keep" and settings.unicode != "none"

    def norm(text: str) -> str:
        nonlocal changed
        if form_only and unicodedata.is_normalized(settings.unicode, text):
            return text  # most text is already NFC: one check in C, nothing else
        out, diff = normalize_with_change(text, settings.unicode, settings.vi_tone)
        changed |= diff
        return out

    for msg in conv.messages:
        msg.content = norm(msg.content)
        if msg.input:
            msg.input = norm(msg.input)
    if conv.system is not None:
        conv.system = norm(conv.system)
    return changed


def _place_system_prompt(conv: Conversation, mode: str, report: DataReport) -> Conversation:
    """data.system_prompt: fold it into the first user turn, or drop it (both counted)."""
    if conv.system is None or mode == "keep":
        return conv
    if mode == "fold":
        report.system_prompts_folded += 1
        return fold_system_prompt(conv)
    report.system_prompts_dropped += 1
    return Conversation(conv.messages, system=None, source=conv.source)


def formatted_rows(spec: DatasetSpec, report: DataReport, formats: str, kept=None):
    """Every readable row of one dataset entry with its format (spec.format, or detected), counted
    as read; unreadable rows and rows of no known format go to the report. `formats` names the
    formats the caller takes (for the message); `kept()` says how many rows the caller has kept,
    so reading stops at spec.max_samples before one row more is read."""
    fmt = None if spec.format == "auto" else spec.format
    for raw in read_rows(spec.path, spec.split):
        if spec.max_samples is not None and kept is not None and kept() >= spec.max_samples:
            break
        report.rows_read += 1
        if raw.row is None:
            reason, detail = raw.problem
            report.rejections.append(Rejection(raw.source, reason, detail))
            continue
        row_format = fmt or detect_format(raw.row, spec.columns)
        if row_format is None:
            keys = ", ".join(sorted(map(str, raw.row))) or "none"
            report.rejections.append(Rejection(
                raw.source, "unknown format",
                f"cannot tell the format from the fields ({keys}); set format: {formats}, "
                "or map your fields with columns", raw.row))
            continue
        counts = report.formats.setdefault(spec.path, {})
        counts[row_format] = counts.get(row_format, 0) + 1
        yield raw, row_format


def read_conversations(spec: DatasetSpec, data: DataConfig, report: DataReport) -> list[Conversation]:
    """One dataset entry -> conversations; unusable rows go to the report."""
    convs: list[Conversation] = []
    for raw, row_format in formatted_rows(spec, report, "alpaca | sharegpt | messages", lambda: len(convs)):
        if row_format in ("text", "preference", "unpaired"):
            kind = {"text": "raw text (pretraining)", "preference": "preference (chosen/rejected)",
                    "unpaired": "unpaired preference (prompt/completion/label)"}[row_format]
            raise DataError(
                f"{raw.source}: {kind} rows cannot train stage sft; give instruction or conversation data "
                f"(alpaca, sharegpt, messages), or set format: explicitly if detection chose {row_format}"
            )
        try:
            conv = PARSERS[row_format](raw.row, spec.columns)
        except RowProblem as problem:
            report.rejections.append(Rejection(raw.source, problem.reason, f"{row_format} row: {problem.detail}", raw.row))
            continue
        conv.source = raw.source
        report.rows_normalized += _normalize(conv, data.normalize)
        convs.append(_place_system_prompt(conv, data.system_prompt, report))
    return convs


def _apply_weight(convs: list[Conversation], weight: float, rng: random.Random) -> list[Conversation]:
    """weight 2 = every row twice; 0.5 = a random half; 1.5 = all once plus a random half."""
    whole, frac = divmod(weight, 1.0)
    out = convs * int(whole)
    if frac:
        out += rng.sample(convs, round(len(convs) * frac))
    return out


# Rows dropped because the user chose `overflow: drop` are counted, not errors.
CHOSEN_DROPS = {"too long"}


def raise_for_bad_rows(report: DataReport, on_error: str) -> None:
    bad = [r for r in report.rejections if r.reason not in CHOSEN_DROPS]
    if bad and on_error == "raise":
        first = bad[:5]
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise DataError(
            f"{len(bad)} bad row(s){more}: "
            + " | ".join(r.line() for r in first)
            + " -- fix them, or set data.on_error: skip to train on the rest"
        )


def load_records(data: DataConfig, seed: int, report: DataReport, read, what: str = "training",
                 report_bad_rows_first: bool = True) -> tuple[list, list]:
    """All training records (mixed, weighted, shuffled by seed) and the evaluation ones, for any
    record type: `read(spec)` reads one dataset entry. With `report_bad_rows_first` bad rows stop
    the run here; otherwise only when no training record is left (the caller reports them later,
    together with the ones its tokenisation finds)."""
    rng = random.Random(seed)
    train: list = []
    for spec in data.train:
        records = read(spec)
        weighted = _apply_weight(records, spec.weight, rng)
        if records and not weighted:
            raise DataError(f"{spec.path}: weight {spec.weight} keeps none of its {len(records)} usable row(s); "
                            "raise its weight in data.train")
        train += weighted
    evaluation: list = []
    for spec in data.eval or []:
        evaluation += read(spec)
    if report_bad_rows_first or not train:
        raise_for_bad_rows(report, data.on_error)
    if not train:
        paths = ", ".join(s.path for s in data.train)
        raise DataError(f"no usable {what} rows in {paths} ({report.rows_read} read, {report.rows_rejected} rejected)")
    rng.shuffle(train)
    if data.val_size:
        n_val = int(data.val_size) if data.val_size >= 1 else max(1, round(len(train) * data.val_size))
        if n_val >= len(train):
            raise DataError(f"data.val_size = {data.val_size} leaves no training rows out of {len(train)}")
        evaluation, train = train[:n_val], train[n_val:]
    return train, evaluation


def load_conversations(data: DataConfig, seed: int, report: DataReport) -> tuple[list[Conversation], list[Conversation]]:
    """All training conversations (mixed, weighted, shuffled by seed) and the evaluation ones."""
    return load_records(data, seed, report, lambda spec: read_conversations(spec, data, report))


def _tokenize_chunk(args) -> list[TokenizedRow]:
    convs, tokenizer, template, options = args
    return tokenize_conversations(convs, tokenizer, template, **options)


def _tokenize_in_processes(convs, tokenizer, template, options: dict, num_proc: int) -> list[TokenizedRow]:
    """data.num_proc: contiguous chunks rendered and tokenised in worker processes, results in order.

    Rendering is Python and runs on one core; the Rust encoder already uses every core within a
    process, so this pays off when templates are slow (Jinja) or there are many cores.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    size = -(-len(convs) // num_proc)
    chunks = [(convs[i : i + size], tokenizer, template, options) for i in range(0, len(convs), size)]
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with ProcessPoolExecutor(num_proc, mp_context=context) as pool:
        return [row for part in pool.map(_tokenize_chunk, chunks) for row in part]


def tokenize_split(
    convs: list[Conversation], tokenizer, template: Template, data: DataConfig, report: Optional[DataReport],
    count_tokens: bool = True,
) -> list[TokenizedRow]:
    """Tokenised rows of one split; rows that cannot be used go to `report` as rejections, and
    with `count_tokens` (the training split) the kept rows' tokens are counted there too."""
    options = dict(train_on_prompt=data.train_on_prompt, mask_history=data.mask_history, keep_refusals=True)
    if data.num_proc and data.num_proc > 1 and len(convs) >= 2 * data.num_proc:
        rows = _tokenize_in_processes(convs, tokenizer, template, options, data.num_proc)
    else:
        rows = tokenize_conversations(convs, tokenizer, template, **options)
    kept: list[TokenizedRow] = []
    for conv, row in zip(convs, rows):
        if isinstance(row, TemplateRefused):
            if report is not None:
                report.rejections.append(Rejection(conv.source, row.reason, row.detail))
            continue
        fitted = fit_length(row, data.max_length, data.overflow)
        problem = None
        if fitted is None:
            problem = ("too long", f"{len(row.input_ids)} tokens > data.max_length {data.max_length} "
                       "(raise max_length or set data.overflow: truncate)")
        # list.count runs in C: the hot loop over every token stays out of Python
        elif (trained := len(fitted.labels) - 1 - fitted.labels[1:].count(IGNORE)) == 0:
            problem = ("nothing to train", "no trained token left (all turns masked, or truncated away)")
        if problem:
            if report is not None:
                report.rejections.append(Rejection(conv.source, problem[0], problem[1]))
            continue
        kept.append(fitted)
        if report is not None and count_tokens:
            report.rows_truncated += fitted.truncated
            report.total_tokens += len(fitted.input_ids)
            report.trained_tokens += trained
    return kept


def prepare_sft_data(data: DataConfig, tokenizer, template: Template, seed: int, key: str | None = None):
    """-> (train rows, eval rows, report). Raises DataError for data that cannot be used.

    With data.cache (the default) prepared rows are reused when nothing they depend on changed.
    `key`: their cache key (cache.cache_key) where the caller has computed it already.
    """
    if data.cache and key is None:
        key = cache.cache_key(data, tokenizer, template, seed)
    entry = cache.entry_for(key, data.cache_dir) if data.cache else None
    if entry is not None:
        hit = cache.load(entry)
        if hit is not None:
            train, evaluation, fields = hit
            return train, evaluation, DataReport(**fields, cached_at=entry, from_cache=True)
    train, evaluation, report = _prepare(data, tokenizer, template, seed)
    if entry is not None:
        cache.save(entry, train, evaluation, report.fields())
        report.cached_at = entry
    return train, evaluation, report


def _prepare(data: DataConfig, tokenizer, template: Template, seed: int):
    byte_bpe.start_setup(tokenizer)  # its slow part runs on another core while the rows are read
    report = DataReport()
    train_convs, eval_convs = load_conversations(data, seed, report)
    train = tokenize_split(train_convs, tokenizer, template, data, report)
    # evaluation rows were read into the same report: their rejections count too (read = kept + rejected)
    evaluation = tokenize_split(eval_convs, tokenizer, template, data, report, count_tokens=False)
    raise_for_bad_rows(report, data.on_error)
    if not train:
        raise DataError(f"every training row was rejected ({report.rejected_by_reason}); see the reasons above")
    report.rows_kept = report.rows_read - report.rows_rejected
    return train, evaluation, report
