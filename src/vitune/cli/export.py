"""`vitune export gguf SOURCE --out FILE --quant TYPE`: a run or model folder as one GGUF file."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from vitune.cli.app import app

export_app = typer.Typer(help="Export a run or model for other runtimes (llama.cpp, Ollama, LM Studio).",
                         no_args_is_help=True)
app.add_typer(export_app, name="export")


@export_app.command(
    help=(
        "Write a run folder (a LoRA / QLoRA run is merged first) or a model folder as one GGUF file for "
        "llama.cpp, Ollama and LM Studio, with the training chat template and the end-of-turn token. "
        "Quant types f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1 are written in Python; K-quants "
        "(q4_k_m, ...) are quantised by llama.cpp itself and need llama-cpp-python.\n\n"
        "Example: vitune export gguf runs/quickstart --out quickstart-q8_0.gguf --quant q8_0"
    )
)
def gguf(
    source: Path = typer.Argument(..., help="Run folder or model folder", show_default=False),
    out: Path = typer.Option(..., "--out", help="GGUF file to write (must not exist, unless --force)",
                             show_default=False),
    quant: str = typer.Option("f16", "--quant", help="f32 | f16 | bf16 | q8_0 | q4_0 | q4_1 | q5_0 | q5_1 | q4_k_m ..."),
    name: str = typer.Option(None, "--name", help="Model name written into the file (default: the folder's name)"),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists"),
) -> None:
    from vitune.export.gguf import export_gguf

    console = Console(highlight=False)
    done = export_gguf(source, out, quant=quant, force=force, name=name, say=lambda line: console.print(escape(line), soft_wrap=True))
    ends = ", ".join(f"{k} {v}" for k, v in done["special"].items() if k in ("bos", "eos", "eot"))
    kept = f"; kept at f16 (rows not a multiple of the block): {len(done['kept_f16'])} tensors" if done["kept_f16"] else ""
    console.print(
        f"wrote {escape(str(out))}: {done['architecture']}, {done['quant']}, {done['bytes'] / 2**20:.1f} MiB, "
        f"{done['tensors']} tensors, {done['tokens']} tokens ({done['tokenizer']}"
        f"{', pre-tokenizer ' + done['pre_tokenizer'] if done['pre_tokenizer'] else ''}), {ends}, "
        f"chat template {'included' if done['chat_template'] else 'none'}{kept}", soft_wrap=True)
    if done["window"]:
        console.print(f"context length {done['window']:,} tokens, the model's sliding window: llama.cpp's "
                      f"{done['architecture']} graph has none, and within the window it computes what the model does",
                      soft_wrap=True)
