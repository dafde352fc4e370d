"""`vitune init-model`: a tiny random model of a real architecture, for demos and tests."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from vitune.cli import app


@app.command(
    "init-model",
    help=(
        "Write a tiny random model (a few million parameters) of a real architecture, with a BPE "
        "tokenizer trained on the bundled Vietnamese data, as an ordinary Hugging Face model folder.\n\n"
        "Example: vitune init-model --arch qwen2 --out runs/tiny-qwen2"
    ),
)
def init_model(
    arch: str = typer.Option("llama", help="llama | mistral | qwen2 | bloom"),
    out: Path = typer.Option(..., help="Folder to write the model to", show_default=False),
    seed: int = typer.Option(0, help="Seed of the random weights"),
) -> None:
    from vitune.models.tiny import init_tiny_model

    folder = init_tiny_model(arch, out, seed=seed)
    Console().print(f"wrote a tiny {arch} model to {escape(str(folder))}")
