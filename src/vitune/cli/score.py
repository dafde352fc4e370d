"""`vitune score RUN --data FILE`: the reward a trained reward model gives each row."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from vitune.cli.app import app


@app.command(
    help=(
        "Score rows with a reward model (a run of train.stage: rm): preference rows get the reward of "
        "chosen and of rejected (and the share ranked right), instruction and conversation rows the "
        "reward of their last answer.\n\n"
        "Example: vitune score runs/rm --data data/preference_vi_eval.jsonl --out runs/rm/scores.jsonl"
    )
)
def score(
    run: str = typer.Argument(..., help="Reward-model run folder", show_default=False),
    data: List[str] = typer.Option(..., "--data", help="Data file (repeatable)", show_default=False),
    out: Optional[Path] = typer.Option(None, "--out", help="Write one JSON line per row here", show_default=False),
    n: int = typer.Option(5, "-n", help="How many rows to show"),
) -> None:
    from vitune.infer.scoring import score_files

    console = Console(highlight=False)
    rows = score_files(run, data)
    if out is not None:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            with open(out, "w", encoding="utf-8") as fh:
                for row in rows:
                    fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        except OSError as exc:
            from vitune.errors import UserError

            raise UserError(f"cannot write {out}: {exc.strerror or exc}; choose another --out file") from None
    pairs = [r for r in rows if "chosen" in r]
    table = Table(title=f"rewards of {escape(run)}")
    table.add_column("row")
    for column in (("chosen", "rejected") if pairs else ("reward",)):
        table.add_column(column, justify="right")
    for row in rows[:n]:
        values = (row["chosen"], row["rejected"]) if "chosen" in row else (row["reward"],)
        table.add_row(escape(row["source"]), *(f"{v:.4f}" for v in values))
    console.print(table)
    if pairs:
        right = sum(r["chosen"] > r["rejected"] for r in pairs)
        console.print(f"{len(pairs)} pairs: chosen ranked above rejected in {right} ({right / len(pairs):.1%})")
    else:
        mean = sum(r["reward"] for r in rows) / len(rows)
        console.print(f"{len(rows)} rows: mean reward {mean:.4f}")
    if out is not None:
        console.print(f"wrote {len(rows)} rows to {escape(str(out))}")
