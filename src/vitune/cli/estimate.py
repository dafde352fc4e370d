"""`vitune estimate CONFIG`: peak GPU memory and tokens/s of a run, from the model's config.json
(on the CPU, tokens/s from a short probe of this machine's matmuls)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from vitune.cli.app import app
from vitune.config import load_config

PARTS = [
    ("base_weights", "base weights"),
    ("lora_params", "LoRA adapter"),
    ("gradients", "gradients"),
    ("optimizer_states", "optimizer states"),
    ("activations", "activations"),
    ("logits_loss", "logits + loss"),
    ("cuda_overhead", "CUDA context + allocator"),
]


@app.command(
    help=(
        "Predict the peak GPU memory and tokens/s of the run CONFIG describes, from the model's "
        "config.json alone (no weights are downloaded). --device CPU times this machine's matmuls "
        "for a fraction of a second instead of assuming a peak.\n\n"
        "Example: vitune estimate examples/quickstart.yaml --set model.name_or_path=meta-llama/Meta-Llama-3-8B "
        "--set method.type=qlora --device T4"
    )
)
def estimate(
    config: Path = typer.Argument(..., help="Run config, e.g. examples/quickstart.yaml", show_default=False),
    set_: Optional[List[str]] = typer.Option(
        None, "--set", help="Override a key: --set data.max_length=4096 (repeatable)", show_default=False
    ),
    device: str = typer.Option("H100", help="H100 | H200 | A100 | RTX4090 | L4 | T4 | CPU"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table"),
) -> None:
    from vitune.models.estimate import estimate as predict
    from vitune.models.architecture import load_model_config
    from vitune.models.estimate import get_device

    cfg = load_config(config, set_ or [])
    get_device(device)  # an unknown device is reported before any download
    result = predict(cfg, load_model_config(cfg.model.name_or_path, cfg.model.trust_remote_code), device)
    if as_json:
        typer.echo(json.dumps(result.to_dict()))
        return

    print_estimate(cfg, result, Console(highlight=False))


def print_estimate(cfg, result, console: Console) -> None:
    """The breakdown table, the predicted speed and the notes."""
    tokens = cfg.data.max_length * cfg.train.micro_batch_size
    table = Table(
        title=f"{escape(cfg.model.name_or_path)} · {cfg.method.type} · {tokens:,} tokens per micro-batch · {result.device}",
        show_header=True,
    )
    table.add_column("part")
    table.add_column("GiB", justify="right")
    for key, label in PARTS:
        table.add_row(label, f"{getattr(result, key):.2f}")
    table.add_row("[bold]peak[/] (parts not alive at once are not added)", f"[bold]{result.total:.2f}")
    table.add_row("[dim]of which torch allocates (peak_memory_gib)", f"[dim]{result.peak_allocated:.2f}")
    console.print(table)
    console.print(
        f"trainable {result.trainable_params:,} of {result.total_params:,} parameters; "
        f"{result.flops_per_token / 1e9:.2f} GFLOP per token; predicted {speed_text(result)}"
    )
    for note in result.notes:
        console.print(f"[dim]- {note}[/]")


def speed_text(result) -> str:
    """'20–35 tokens/s (measured probe: 61.2 GFLOP/s)' on the CPU, '5,300–6,600 tokens/s' on a GPU:
    a range, never one number, because the middle is only as good as the assumptions under it."""
    low, high = result.tokens_per_s_range
    digits = 1 if high < 10 else 0
    text = f"{low:,.{digits}f}–{high:,.{digits}f} tokens/s"
    if result.probe_flops:
        text += f" (measured probe: {result.probe_flops / 1e9:.1f} GFLOP/s)"
    return text
