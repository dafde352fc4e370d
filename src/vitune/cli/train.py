"""`vitune train CONFIG`: fine-tune a model as one YAML file describes."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from vitune.cli import app
from vitune.config import load_config


@app.command(
    help=(
        "Fine-tune a model as CONFIG (a YAML file) describes.\n\n"
        "Example: vitune train examples/quickstart.yaml --set train.learning_rate=1e-4"
    )
)
def train(
    config: Path = typer.Argument(..., help="Run config, e.g. examples/quickstart.yaml", show_default=False),
    set_: Optional[List[str]] = typer.Option(
        None, "--set", help="Override a key: --set train.epochs=1 (repeatable)", show_default=False
    ),
) -> None:
    from vitune.train.sft import run_sft

    console = Console()
    cfg = load_config(config, set_ or [])
    result = run_sft(cfg, console)
    s = result.summary
    console.print(
        f"done: {s['steps']} steps in {s['seconds']:.0f} s, loss {s['first_loss']:.4f} -> {s['final_loss']:.4f}, "
        f"{s['tokens_per_s']:,.0f} tokens/s. Run folder: {result.output_dir}"
    )
    console.print(f"chat with it: vitune chat {result.output_dir}")
