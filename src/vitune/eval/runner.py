"""`vitune eval`: a model and data files in, one result dict (what eval.json holds) out.

    evaluate(target, paths, task="auto", base="auto", ...) -> dict

TARGET is loaded as `vitune chat` loads it (run folder, model folder, Hub id, .gguf). Each file's
task comes from its rows (multiple choice, conversations / Alpaca, plain text, preference pairs)
unless `task` says; rows that cannot be scored are counted with their file and line
(read = scored + rejected). An adapter run is also scored with its adapter switched off, which is
its base model ("did fine-tuning help?") without loading anything twice.

The steps from files to figures are shared with evaluation during training (vitune.train.evaluation):
`read_files` (rows, limit), `make_scorer` (a model in memory), `score_rows` (one file's figures) and
`headline` (the numbers a curve is drawn of).
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from vitune import __version__
from vitune.config import NormalizeSettings, file_sha256, makes_reward_model
from vitune.data.formats import OTHER_PARSERS, PARSERS, RowProblem, detect_format
from vitune.data.pipeline import _normalize
from vitune.data.records import Rejection
from vitune.data.sources import read_rows
from vitune.data.templates import stop_token_ids
from vitune.errors import DataError, UserError
from vitune.eval import multiple_choice as mc
from vitune.eval import tasks
from vitune.infer.chat import load_chat_model
from vitune.models.gguf import model_source
from vitune.models.reward_model import RewardScorer

TASKS = ("auto", "multiple_choice", "conversations", "text", "preference")


@dataclass
class FileRows:
    path: str
    task: str
    rows_read: int = 0
    items: list = field(default_factory=list)  # Questions, Conversations, (source, text) or pairs
    rejections: list[Rejection] = field(default_factory=list)


def row_task(row: dict) -> Optional[str]:
    if mc.is_multiple_choice(row):
        return "multiple_choice"
    fmt = detect_format(row, {})
    if fmt in PARSERS:
        return "conversations"
    return {"text": "text", "preference": "preference"}.get(fmt)


def read_file(path: str, task: str) -> FileRows:
    """The rows of one file for `task` ("auto": the first readable row's kind decides)."""
    if task == "auto":
        for raw in read_rows(path):
            if raw.row is not None and row_task(raw.row):
                task = row_task(raw.row)
                break
        else:
            raise DataError(f"{path}: no row of a kind vitune eval scores (multiple choice, alpaca / sharegpt / "
                            "messages, text, chosen/rejected pairs); check the file or pass --task")
    if task == "multiple_choice":
        found = mc.read_questions([path])
        return FileRows(path, task, found.rows_read, found.questions, found.rejections)
    out = FileRows(path, task)
    for raw in read_rows(path):
        out.rows_read += 1
        if raw.row is None:
            out.rejections.append(Rejection(raw.source, raw.problem[0], raw.problem[1]))
            continue
        kind = row_task(raw.row)
        if kind != task:
            out.rejections.append(Rejection(raw.source, "wrong format",
                                            f"a {kind or 'unrecognised'} row, but this file is scored as {task} "
                                            "(--task); give one kind of rows per file"))
            continue
        fmt = detect_format(raw.row, {})
        try:
            if task == "conversations":
                conv = PARSERS[fmt](raw.row, {})
                conv.source = raw.source
                _normalize(conv, NormalizeSettings())  # NFC, as training reads rows by default
                out.items.append(conv)
            elif task == "text":
                out.items.append((raw.source, OTHER_PARSERS["text"](raw.row, {}).text))
            else:
                pair = OTHER_PARSERS["preference"](raw.row, {})
                pair.source = raw.source
                out.items.append((raw.source, pair.conversation(pair.chosen), pair.conversation(pair.rejected)))
        except RowProblem as problem:
            out.rejections.append(Rejection(raw.source, problem.reason, f"{fmt} row: {problem.detail}"))
    return out


def _sha256_if_file(path: str) -> Optional[str]:
    return file_sha256(Path(path)) if Path(path).is_file() else None


def model_identity(target: str, model) -> dict:
    """Enough to tell two evaluated models apart: path, base, adapter hash, parameter count."""
    source = Path(model_source(target))
    identity = {"target": target, "parameters": sum(p.numel() for p in model.parameters())}
    adapter = source / "adapter_config.json"
    if adapter.is_file():
        identity["base"] = json.loads(adapter.read_text(encoding="utf-8")).get("base_model_name_or_path")
        weights = source / "adapter_model.safetensors"
        identity["adapter_sha256"] = _sha256_if_file(str(weights))
    summary = source / "summary.json"
    if summary.is_file():
        identity["stage"] = json.loads(summary.read_text(encoding="utf-8")).get("stage")
    return identity


def evaluate(target: str, paths: list[str], task: str = "auto", base: str = "auto", generate: bool = False,
             shots: int = 0, batch_size: int = 16, max_new_tokens: int = 256, limit: Optional[int] = None,
             template: str = "auto", on_progress=None) -> dict:
    """Every figure of every file for the target (and its base), as eval.json holds them."""
    files = read_files(paths, task, limit)  # bad data fails before the model loads
    if not any(f.items for f in files):
        reasons = "; ".join(f"{f.path}: {f.rows_read} read, {len(f.rejections)} rejected" for f in files)
        first = next((r.line() for f in files for r in f.rejections), None)
        raise DataError(f"nothing to score ({reasons})" + (f"; first: {first}" if first else ""))
    reward_model = None
    if makes_reward_model(_stage(target)):  # a reward model scores pairs with its head; it is not a language model
        wrong = [f.path for f in files if f.task != "preference"]
        if wrong:
            raise UserError(f"{target} is a reward model: it scores preference pairs only, not {', '.join(wrong)}")
        reward_model = RewardScorer.load(target)
        bot = None
    else:
        bot = load_chat_model(target, template=template)
    scorer = make_scorer(bot.model, bot.tokenizer, bot.template, batch_size, bot.stop_ids) if bot else None
    compare = _base_switch(bot.model, base) if bot else None  # (name, switch) for an adapter run's own base
    other = None
    if base not in ("auto", "none") and bot:  # another model: loaded once, scored with its own template
        other_bot = load_chat_model(base)
        other = make_scorer(other_bot.model, other_bot.tokenizer, other_bot.template, batch_size, other_bot.stop_ids)
        compare = (base, contextlib.nullcontext)
    result = {"vitune": __version__, "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "model": model_identity(target, bot.model if bot else reward_model.model), "base": compare[0] if compare else None,
              "settings": {"shots": shots, "generate": generate, "max_new_tokens": max_new_tokens,
                           "batch_size": batch_size, "limit": limit}, "files": []}
    for f in files:
        entry = {"path": f.path, "sha256": _sha256_if_file(f.path), "task": f.task, "rows_read": f.rows_read}
        if on_progress:
            on_progress(f"{f.path}: {len(f.items)} {f.task} rows")
        runs = [("model", scorer, contextlib.nullcontext)]
        if compare:
            runs.append(("base", other or scorer, compare[1]))
        rejected = list(f.rejections)
        if f.task == "preference" and reward_model is None:
            runs = runs[:1]  # an implicit reward is the model against its base: the base has none of its own
        for name, who, switch in runs:
            if not f.items:
                break
            with switch():
                figures, dropped = score_rows(who, f, shots, generate, max_new_tokens, reward_model,
                                              _reference(scorer, other, compare))
            entry[name] = figures
            if name == "model":
                rejected += dropped
        entry["rows_scored"] = entry.get("model", {}).get("scored", 0)
        entry["rows_rejected"] = len(rejected)
        entry["rejected_by_reason"] = _count(rejected)
        entry["rejections"] = [{"source": r.source, "reason": r.reason, "detail": r.detail} for r in rejected[:20]]
        result["files"].append(entry)
    return result


def read_files(paths: list[str], task: str = "auto", limit: Optional[int] = None) -> list[FileRows]:
    """The rows of each file for `task`, the first `limit` scorable ones of each (None: all)."""
    if task not in TASKS:
        raise UserError(f"--task {task!r}: choose one of {', '.join(TASKS)}")
    files = [read_file(p, task) for p in paths]
    if limit is not None:
        for f in files:
            f.items = f.items[:limit]
    return files


def make_scorer(model, tokenizer, template, batch_size: int, stop_ids: Optional[list[int]] = None) -> tasks.Scorer:
    """A Scorer of a model in memory; answers stop where `vitune chat` stops them (stop_ids by default)."""
    config = getattr(model, "config", None)
    context = int(min(getattr(config, "max_position_embeddings", None) or 2048, 10**7))
    stops = stop_ids if stop_ids is not None else stop_token_ids(tokenizer, template)
    return tasks.Scorer(model, tokenizer, template, stops, context, batch_size)


def adapter_reference(scorer: tasks.Scorer):
    """An adapter model's implicit-reward reference: the same model with its adapter off (None without one)."""
    return _reference(scorer, None, _base_switch(scorer.model, "auto"))


# the counts beside the figures, not figures to follow over training
_COUNTS = ("scored", "tokens", "characters", "unanswered", "samples")


def headline(figures: dict) -> dict[str, float]:
    """The numbers of a file's figures a curve can follow: {"acc": 0.25, "acc_norm": 0.3, ...}
    (an accuracy table by its average; counts and samples left out)."""
    out = {}
    for key, value in figures.items():
        if key in _COUNTS:
            continue
        if isinstance(value, dict):
            value = value.get("average")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
    return out


def _reference(scorer, other, compare):
    """The reference's answer log-probabilities for implicit rewards, or None when there is none."""
    if other is not None:
        return lambda convs: tasks.answer_logprob(other, convs)
    if compare:
        def with_adapter_off(convs):
            with compare[1]():
                return tasks.answer_logprob(scorer, convs)
        return with_adapter_off
    return None


def score_rows(scorer: tasks.Scorer, f: FileRows, shots: int = 0, generate: bool = False, max_new_tokens: int = 256,
               reward_model=None, reference=None) -> tuple[dict, list[Rejection]]:
    """One file's figures, by its task, and the rows that could not be scored. Preference pairs need
    `reward_model` (a RewardScorer) or `reference` (answer log-probabilities of the reference model)."""
    if f.task == "multiple_choice":
        return tasks.multiple_choice(scorer, f.items, shots=shots)
    if f.task == "conversations":
        return tasks.conversations(scorer, f.items, generate=generate, max_new_tokens=max_new_tokens)
    if f.task == "text":
        return tasks.plain_text(scorer, f.items)
    if reward_model is not None:
        return tasks.preference(scorer, f.items, reward_model=reward_model)
    if reference is None:
        raise UserError(f"{f.path}: preference pairs are scored by a reward model (a train.stage: rm run), or by "
                        "a LoRA run against its base, or a model against --base MODEL (the implicit reward)")
    return tasks.preference(scorer, f.items, reference_logprob=reference)


def _stage(target: str) -> Optional[str]:
    summary = Path(target) / "summary.json"
    try:
        return json.loads(summary.read_text(encoding="utf-8")).get("stage") if summary.is_file() else None
    except (OSError, ValueError):
        return None


def _base_switch(model, base: str):
    """(the base's name, a context manager that makes `model` its base) or None: for an adapter run
    the base is the same weights with the adapter off."""
    if base != "auto" or not hasattr(model, "disable_adapter"):
        return None
    name = getattr(getattr(model, "peft_config", {}).get("default"), "base_model_name_or_path", None)
    return name, model.disable_adapter


def _count(rejected: list[Rejection]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rejected:
        out[r.reason] = out.get(r.reason, 0) + 1
    return out
