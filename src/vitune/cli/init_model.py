"""`vitune init-model`: a tiny random model of a real architecture, or a real pretrained model
from an installed package (--preset), as an ordinary Hugging Face model folder."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from vitune.cli.app import app


@app.command(
    "init-model",
    help=(
        "Write a model folder: a tiny random model (a few million parameters) of a real architecture, "
        "with a BPE tokenizer trained on the bundled Vietnamese data, or with --preset a real "
        "pretrained model shipped in a Python package.\n\n"
        "Examples: vitune init-model --arch qwen2 --out runs/tiny-qwen2\n\n"
        "vitune init-model --preset smollm2-135m-instruct --out runs/smollm2"
    ),
)
def init_model(
    out: Path = typer.Option(..., help="Folder to write the model to", show_default=False),
    arch: Optional[str] = typer.Option(None, help="Tiny random model: llama | mistral | qwen2 | gemma3 | bloom [default: llama]"),
    preset: Optional[str] = typer.Option(None, help="Real model: smollm2-135m-instruct | gemma3-270m", show_default=False),
    seed: int = typer.Option(0, help="Seed of the random weights (tiny models)"),
    sliding_window: Optional[int] = typer.Option(
        None, help="Tokens each sliding-window layer sees (tiny mistral: none by default; tiny gemma3: 32)",
        show_default=False),
) -> None:
    from vitune.errors import UserError

    console = Console()
    if preset is not None:
        if arch is not None or sliding_window is not None:
            given = "--arch" if arch is not None else "--sliding-window"
            raise UserError(f"give {given} (a tiny random model) or --preset (a real model), not both")
        from vitune.models.presets import PRESETS, write_preset

        folder, converted = write_preset(preset, out)
        how = "converted from its GGUF file" if converted else "from the cache of an earlier conversion"
        console.print(f"wrote {PRESETS[preset].about.split(' (')[0]} to {escape(str(folder))} ({how})", highlight=False, soft_wrap=True)
        return
    from vitune.models.tiny import init_tiny_model

    arch = arch or "llama"
    folder = init_tiny_model(arch, out, seed=seed, sliding_window=sliding_window)
    console.print(f"wrote a tiny {arch} model to {escape(str(folder))}")
