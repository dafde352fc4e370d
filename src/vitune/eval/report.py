"""What `vitune eval` shows and keeps: a rich table of one result (model beside its base, and the
difference), every result of a folder kept (evals/<UTC time>-<files>.json, eval.json a copy of the
latest), each file written whole or not at all, and `--compare A B` of two saved results."""

from __future__ import annotations

import itertools
import json
import os
import time
from pathlib import Path
from typing import Optional

from rich.markup import escape

from vitune.errors import DISK_ERRNOS, DiskError, UserError

LATEST = "eval.json"  # a folder's latest result, where readers of one result look
HISTORY = "evals"  # every result of a folder, one file each
STAMP = "%Y%m%d-%H%M%S"  # UTC, so that names sort by time

# the headline figures of each task, in table order; True = higher is better
HEADLINES = {
    "multiple_choice": [("acc", True), ("acc_norm", True), ("vmlu_acc", True)],
    "conversations": [("loss", False), ("perplexity", False), ("exact_match", True), ("chrf", True), ("rouge_l", True),
                      ("repetition", False)],
    "text": [("bits_per_char", False), ("perplexity", False)],
    "preference": [("implicit_reward_accuracy", True), ("implicit_reward_margin", True), ("reward_accuracy", True),
                   ("reward_margin", True)],
}


def headline(figures: dict, key: str) -> Optional[float]:
    value = figures.get(key) if isinstance(figures, dict) else None
    return value.get("average") if isinstance(value, dict) else value


def rows_of(result: dict, side: str) -> dict[tuple[str, str], float]:
    """{(file, metric): value} of one side ("model" or "base") of a result, categories included."""
    out = {}
    for entry in result["files"]:
        figures = entry.get(side)
        if not figures:
            continue
        name = Path(str(entry.get("path", "?"))).name
        for key, _ in HEADLINES.get(entry.get("task"), []):
            value = headline(figures, key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[(name, key)] = value
                groups = figures[key].get("by_category", {}) if isinstance(figures.get(key), dict) else {}
                for group, v in groups.items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        out[(name, f"{key} · {group}")] = v
    return out


def better(metric: str, task_metrics: dict[str, bool]) -> bool:
    return task_metrics.get(metric.split(" · ")[0], True)


def _table(title: str, columns: list[str], left: dict, right: Optional[dict]):
    from rich.table import Table

    directions = {k: up for task in HEADLINES.values() for k, up in task}
    table = Table(title=escape(title), title_justify="left")
    for name in ["file", "metric", *columns]:
        table.add_column(name, justify="left" if name in ("file", "metric") else "right")
    for (file, metric), value in left.items():
        cells = [escape(file), escape(metric), f"{value:.4f}"]
        if right is not None:
            other = right.get((file, metric))
            if other is None:
                cells += ["", ""]
            else:
                delta = other - value
                good = (delta > 0) == better(metric, directions)
                colour = "green" if good and delta else ("red" if delta else "")
                cells += [f"{other:.4f}", f"[{colour}]{delta:+.4f}[/]" if colour else f"{delta:+.4f}"]
        table.add_row(*cells)
    return table


def show(result: dict, console) -> None:
    """The result as one table: the model, and beside it its base and model minus base."""
    model, base = rows_of(result, "model"), rows_of(result, "base")
    for entry in result["files"]:
        console.print(escape(f"{entry['path']}: {entry['task']}, {entry['rows_read']} read, {entry['rows_scored']} "
                             f"scored, {entry['rows_rejected']} rejected"
                             + (f" {entry['rejected_by_reason']}" if entry["rejected_by_reason"] else "")))
        for r in entry["rejections"][:3]:
            console.print(f"  [yellow]{escape(r['source'])}: {escape(r['detail'])}[/]")
    if base:
        table = _table(result["model"]["target"], ["base", "model", "model − base"], base, model)
    else:
        table = _table(result["model"]["target"], ["model"], model, None)
    console.print(table)


def compare(a: dict, b: dict, console) -> None:
    """Two saved results side by side: A, B and B − A for every figure both have."""
    left, right = rows_of(a, "model"), rows_of(b, "model")
    console.print(_table(f"A = {a['model']['target']}   B = {b['model']['target']}", ["A", "B", "B − A"], left, right))


def default_out(target: str) -> Path:
    """The folder a result is kept in: TARGET's own folder when it is a local folder, else the working directory."""
    folder = Path(target)
    return folder if folder.is_dir() else Path(".")


def save(result: dict, out: Path, replace: bool = False) -> Path:
    """Keep `result` and return the file it is in.

    `out` a folder: the result joins the folder's history as evals/<UTC time>-<file stems>.json and
    eval.json becomes a copy of it (an eval.json that is in no history file is kept there first).
    `out` a file: written there; one that exists already is refused unless `replace`.
    Every file is written under a temporary name, then renamed: a half-written one never exists."""
    if out.is_dir():
        _keep_latest(out)
        kept = _write(_dump(result), out / HISTORY, _history_name(result))
        _write(_dump(result), out, LATEST, replace=True)
        return kept
    check_out(out, replace)
    return _write(_dump(result), out.parent, out.name, replace=replace)


def check_out(out: Path, replace: bool = False) -> None:
    """Refuse a result file that exists already: a result vitune did not just write is not replaced
    unless asked (a folder is fine: its results are all kept)."""
    if out.exists() and not out.is_dir() and not replace:
        raise UserError(f"--out {out} exists already (an earlier result?); give another file name, "
                        "or add --force to replace it")


def history(folder: Path) -> list[Path]:
    """Every result kept in `folder`, newest first: its evals/ files, and an eval.json that is a copy
    of none of them (one written before vitune kept a history, or by hand)."""
    kept = sorted(Path(folder, HISTORY).glob("*.json"), key=_stamp, reverse=True)
    latest = Path(folder, LATEST)
    if latest.is_file() and not any(_same(latest, k) for k in kept):
        kept = sorted([*kept, latest], key=_stamp, reverse=True)
    return kept


def _keep_latest(folder: Path) -> None:
    """Copy the folder's eval.json into its history when it is not there yet, before it is replaced."""
    latest = folder / LATEST
    if latest in history(folder):
        text = latest.read_text(encoding="utf-8")
        try:
            stems = _stems(json.loads(text))
        except ValueError:
            stems = "eval"
        _write(text, folder / HISTORY, f"{time.strftime(STAMP, time.gmtime(latest.stat().st_mtime))}-{stems}.json")


def _history_name(result: dict) -> str:
    return f"{time.strftime(STAMP, time.gmtime())}-{_stems(result)}.json"


def _stems(result) -> str:
    files = result.get("files") if isinstance(result, dict) else None
    stems = "+".join(Path(str(f.get("path", "?"))).stem for f in files or [] if isinstance(f, dict))
    return stems[:120] or "eval"  # a name stays well under the file systems' 255 bytes


def _stamp(path: Path) -> tuple[str, int]:
    """When a result was kept: the time its history name starts with, else its file's time."""
    mtime = path.stat().st_mtime_ns
    name = path.name[:len("YYYYmmdd-HHMMSS")]
    try:
        time.strptime(name, STAMP)
    except ValueError:
        name = time.strftime(STAMP, time.gmtime(mtime / 1e9))
    return name, mtime


def _same(a: Path, b: Path) -> bool:
    return a.stat().st_size == b.stat().st_size and a.read_bytes() == b.read_bytes()


def _dump(result: dict) -> str:
    return json.dumps(result, indent=2, ensure_ascii=False) + "\n"


def _write(text: str, folder: Path, name: str, replace: bool = False) -> Path:
    """`text` as folder/name, written under a temporary name, then renamed. replace=False: a name
    that is taken gets -2, -3, ... before .json (two results in the same second keep both)."""
    out = folder / name
    partial = folder / f".{name}.partial-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        partial.write_text(text, encoding="utf-8")
        if replace:
            os.replace(partial, out)
            return out
        for n in itertools.count(2):
            if _claim(partial, out):
                return out
            out = folder / f"{Path(name).stem}-{n}.json"
    except OSError as exc:
        if exc.errno in DISK_ERRNOS:
            raise DiskError(f"cannot write {out}: {exc.strerror}; free some space and run again") from None
        raise UserError(f"cannot write {out}: {exc.strerror or exc}") from None
    finally:
        partial.unlink(missing_ok=True)


def _claim(partial: Path, out: Path) -> bool:
    """Give `partial` the name `out` unless that name is taken (a rename would replace it)."""
    try:
        os.link(partial, out)
        return True
    except FileExistsError:
        return False
    except OSError:  # a file system without hard links (FAT, some network shares)
        if out.exists():
            return False
        os.replace(partial, out)
        return True


def load(path: str) -> dict:
    """A saved result: a file (an eval.json, a file of evals/), or a folder's latest."""
    folder = Path(path) if Path(path).is_dir() else None
    file = (history(folder) or [folder / LATEST])[0] if folder else Path(path)
    if not file.is_file():
        raise UserError(f"--compare {path}: no eval.json there; run vitune eval on it first")
    try:
        result = json.loads(file.read_text(encoding="utf-8"))
        shaped = (isinstance(result, dict) and isinstance(result.get("model"), dict) and "target" in result["model"]
                  and isinstance(result.get("files"), list) and all(isinstance(f, dict) for f in result["files"]))
    except (OSError, ValueError):
        shaped = False
    if not shaped:
        raise UserError(f"--compare {path}: {file} is not an eval.json written by vitune eval")
    return result
