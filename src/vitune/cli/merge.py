"""`vitune merge RUN --out DIR`: a LoRA / QLoRA run merged into its base, as one model folder."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from vitune.cli.app import app


@app.command(
    help=(
        "Merge a LoRA or QLoRA run into its base model and write an ordinary model folder with the run's "
        "tokenizer, its training chat template and a generation_config.json that stops at every end-of-turn "
        "token. A QLoRA adapter is merged into the de-quantised 4-bit base it was trained against (--qlora-base "
        "original: into the 16-bit original instead).\n\n"
        "Example: vitune merge runs/quickstart --out runs/quickstart-merged"
    )
)
def merge(
    run: Path = typer.Argument(..., help="LoRA or QLoRA run folder", show_default=False),
    out: Path = typer.Option(..., "--out", help="Folder to write (must not exist, unless --force)", show_default=False),
    dtype: str = typer.Option("auto", "--dtype", help="auto (the base's saved dtype) | float32 | bfloat16 | float16"),
    qlora_base: str = typer.Option("dequantized", "--qlora-base",
                                   help="QLoRA runs: dequantized (the 4-bit weights trained against) | original"),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists"),
) -> None:
    from vitune.export.merge import merge_run

    done = merge_run(run, out, dtype=dtype, qlora_base=qlora_base, force=force)
    into = " (its de-quantised 4-bit weights)" if done["qlora_base"] == "dequantized" else ""
    Console(highlight=False).print(
        f"merged {escape(str(run))} into {escape(done['base'])}{into}, {done['dtype']}: {escape(str(out))} "
        f"(stops at token ids {done['eos_token_id']}; template {done['template']})")
