"""What `vitune eval` shows and keeps: a rich table of one result (model beside its base, and the
difference), eval.json written whole or not at all, and `--compare A B` of two saved results."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from rich.markup import escape

from vitune.errors import DISK_ERRNOS, DiskError, UserError

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
    """eval.json in the target's folder when it is a local folder, else in the working directory."""
    folder = Path(target)
    return folder / "eval.json" if folder.is_dir() else Path("eval.json")


def save(result: dict, out: Path) -> Path:
    """Write eval.json under a temporary name, then rename: a half-written file never exists."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        partial.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(partial, out)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        if exc.errno in DISK_ERRNOS:
            raise DiskError(f"cannot write {out}: {exc.strerror}; free some space and run again") from None
        raise UserError(f"cannot write {out}: {exc.strerror or exc}") from None
    return out


def load(path: str) -> dict:
    """A saved result: an eval.json, or a folder holding one."""
    file = Path(path) / "eval.json" if Path(path).is_dir() else Path(path)
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
