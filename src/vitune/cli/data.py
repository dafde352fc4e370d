"""`vitune data ...`: look at prepared data, convert between formats."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from vitune.cli.app import app

data_app = typer.Typer(help="Inspect and convert datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")



@data_app.command(
    help=(
        "Show rendered rows with trained tokens in green (token boundaries by shading) and the "
        "data counts: rows read/kept/rejected by reason, truncations, token lengths.\n\n"
        "Example: vitune data inspect examples/quickstart.yaml -n 2"
    )
)
def inspect(
    config: Path = typer.Argument(..., help="Run config", show_default=False),
    n: int = typer.Option(3, "-n", help="How many rows to show"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object of statistics, nothing else"),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a key (repeatable)", show_default=False),
) -> None:
    from vitune.config import load_config
    from vitune.data.inspect import render_row, sequences_of
    from vitune.data.preference import TokenizedPair
    from vitune.train.inspection import inspect_data

    cfg = load_config(config, set_ or [])
    seen = inspect_data(cfg)
    stats, rows, tokenizer, template, report = seen.stats, seen.rows, seen.tokenizer, seen.template, seen.report
    streamed = cfg.data.streaming
    if as_json:
        typer.echo(json.dumps(stats, ensure_ascii=False))
        return
    console = Console(highlight=False)
    if streamed:
        console.print(f"data.streaming: the first {len(rows)} bins of the stream (process 0's share), "
                      "each document's pieces end to end; the stream's own counts come at the end of a run")
    for i, row in enumerate(rows[:n]):
        if isinstance(row, TokenizedPair):  # chosen and rejected, each as the model sees it
            for side, seq in (("chosen", row.chosen), ("rejected", row.rejected)):
                if seq is not None:
                    console.rule(f"row {i + 1} of {len(rows)}, {side}: {len(seq.input_ids)} tokens, "
                                 f"{sum(l != -100 for l in seq.labels)} trained")
                    console.print(render_row(tokenizer, seq), soft_wrap=True)
            continue
        if not sequences_of([row]):
            continue
        console.rule(f"row {i + 1} of {len(rows)}: {len(row.input_ids)} tokens, "
                     f"{sum(l != -100 for l in row.labels)} trained")
        console.print(render_row(tokenizer, row), soft_wrap=True)
    used = f" (template {template.name})" if template else ""
    table = Table(title=f"data of {escape(str(config))}{used}", show_header=False)
    table.add_row("rows read / kept / rejected", f"{stats['rows_read']} / {stats['rows_kept']} / {stats['rows_rejected']}")
    for reason, count in stats["rejected_by_reason"].items():
        table.add_row(f"  rejected: {reason}", str(count))
    table.add_row("rows truncated", str(stats["rows_truncated"]))
    table.add_row("train / eval rows", f"{stats['train_rows']} / {stats['eval_rows']}")
    table.add_row("tokens (trained fraction)", f"{stats['total_tokens']:,} ({stats['trained_token_fraction']:.1%})")
    p = stats["length_percentiles"]
    if p:
        table.add_row("sequence length p50 / p90 / p99 / max", f"{p['p50']} / {p['p90']} / {p['p99']} / {p['max']}")
    if stats["packing_efficiency"] is not None:
        table.add_row(f"packing efficiency (bins of {cfg.data.max_length})", f"{stats['packing_efficiency']:.1%}")
    for path, counts in stats["formats"].items():
        table.add_row(f"  format of {escape(path)}", ", ".join(f"{k} {v}" for k, v in counts.items()))
    console.print(table)
    for notice in stats["template_notices"]:
        console.print(f"[yellow]notice[/] template: {notice}")
    for line in stats["first_rejections"]:
        console.print(f"[red]rejected[/] {escape(line)}")
    if report.from_cache:
        console.print(f"[dim]prepared data reused from the cache ({escape(str(report.cached_at))})[/]")


@data_app.command(
    help=(
        "Rewrite a dataset in another row format (alpaca, sharegpt, messages). Refuses a "
        "conversion that would lose information unless --force.\n\n"
        "Example: vitune data convert data/alpaca_vi.jsonl runs/alpaca_as_sharegpt.jsonl --to sharegpt --force"
    )
)
def convert(
    src: str = typer.Argument(..., help="Input file (json, jsonl, csv, parquet)", show_default=False),
    dst: str = typer.Argument(..., help="Output file (.jsonl or .json)", show_default=False),
    to: str = typer.Option(..., help="alpaca | sharegpt | messages", show_default=False),
    source_format: str = typer.Option("auto", "--from", help="Input format (auto-detected by default)"),
    force: bool = typer.Option(False, help="Convert even if some information is lost"),
) -> None:
    from vitune.data.convert import convert_file

    count = convert_file(src, dst, to, source_format=source_format, force=force)
    Console().print(f"wrote {count} {to} rows to {escape(dst)}")
