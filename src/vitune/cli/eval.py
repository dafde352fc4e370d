"""`vitune eval TARGET --data FILE...` and `vitune eval --compare A B`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from vitune.cli.app import app


@app.command(
    name="eval",
    help=(
        "Evaluate a run folder, model folder, Hub id or .gguf on data files: multiple choice in VMLU's format "
        "(accuracy by log-likelihood and by VMLU's prompt), conversations / Alpaca rows (loss and perplexity on "
        "the answers; --generate adds exact match, chrF and ROUGE-L), plain text (bits per character) or "
        "preference pairs (reward accuracy). An adapter run is compared with its base. Every result is kept, in "
        "TARGET's folder as evals/<UTC time>-<files>.json, and eval.json is a copy of the latest.\n\n"
        "Example: vitune eval runs/quickstart --data data/vmlu_vi.jsonl data/qa_vi_eval.jsonl --generate\n\n"
        "Compare two saved results: vitune eval --compare runs/a runs/b"
    ),
)
def eval_(
    target: Optional[str] = typer.Argument(None, help="Run folder, model folder, Hub id or .gguf file",
                                           show_default=False),
    data: list[str] = typer.Option([], "--data", help="Data file (repeatable; several after one --data too)"),
    task: str = typer.Option("auto", help="auto (from the rows) | multiple_choice | conversations | text | preference"),
    base: str = typer.Option("auto", help="auto (an adapter run's base) | none | MODEL to compare with"),
    generate: bool = typer.Option(False, "--generate", help="Conversations: greedy answers scored against the references"),
    shots: int = typer.Option(0, help="Multiple choice: k solved questions of the same subject before each one"),
    batch_size: int = typer.Option(16, help="Sequences per forward pass"),
    max_new_tokens: int = typer.Option(256, help="Longest generated answer (--generate)"),
    limit: Optional[int] = typer.Option(None, help="Score only the first N rows of each file", show_default=False),
    out: Optional[Path] = typer.Option(None, "--out", help="A new file for the result, or a folder to keep it in "
                                       "(default: TARGET's folder)", show_default=False),
    force: bool = typer.Option(False, "--force", help="Replace the --out file if it exists"),
    compare: Optional[list[str]] = typer.Option(None, "--compare", help="Two results: A B, each an eval.json, a file "
                                                "of evals/ or a folder (its latest)", show_default=False),
    extra: Optional[list[str]] = typer.Argument(None, hidden=True),
) -> None:
    from vitune.errors import UserError
    from vitune.eval import report

    console = Console(highlight=False)
    paths = list(data) + list(extra or [])  # `--data a.jsonl b.jsonl`: the files after the first
    if compare:
        runs = list(compare) + ([target] if target else []) + paths
        if len(runs) != 2:
            raise UserError(f"--compare takes two eval.json files or run folders (A B), got {len(runs)}")
        report.compare(report.load(runs[0]), report.load(runs[1]), console)
        return
    if not target:
        raise UserError("give the model to evaluate: vitune eval TARGET --data FILE (or --compare A B)")
    if not paths:
        raise UserError("give the data to evaluate on: --data FILE (e.g. --data data/vmlu_vi.jsonl)")
    if batch_size < 1 or max_new_tokens < 1 or shots < 0 or (limit is not None and limit < 1):
        raise UserError("--batch-size, --max-new-tokens and --limit must be at least 1, --shots at least 0")
    if out is not None:
        report.check_out(out, replace=force)  # before the evaluation, not after minutes of it
    from vitune.eval.runner import evaluate

    result = evaluate(target, paths, task=task, base=base, generate=generate, shots=shots, batch_size=batch_size,
                      max_new_tokens=max_new_tokens, limit=limit, on_progress=lambda m: console.print(f"eval: {escape(m)}"))
    report.show(result, console)
    where = out or report.default_out(target)
    written = report.save(result, where, replace=force)
    if where.is_dir():
        kept = len(report.history(where))
        console.print(escape(f"wrote {written} and its copy {where / report.LATEST} (the latest; {kept} "
                             f"evaluation{'s' if kept > 1 else ''} kept in {where / report.HISTORY})"))
    else:
        console.print(f"wrote {escape(str(written))}")
    if (Path(target) / "metrics.jsonl").is_file():  # a run folder: its training and held-out loss curves
        from vitune.eval.plot import TASK_PREFIX, plot_evaluations, plot_run, read_curves

        try:
            console.print(f"wrote {escape(str(plot_run(Path(target))))}")
        except UserError as exc:  # a run that logged no loss yet: the figures above still stand
            console.print(f"no loss plot: {escape(str(exc))}")
        if any(key.startswith(TASK_PREFIX) for key in read_curves(Path(target) / "metrics.jsonl")):
            console.print(f"wrote {escape(str(plot_evaluations(Path(target))))}")  # its evaluations while training
