"""The typer app every command module registers its commands on (cli/__init__.py imports them all)."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="vitune",
    help=(
        "Fine-tune open LLMs (Llama, Mistral, Qwen, BLOOM, Vistral, VinaLlama, ...) on Alpaca and "
        "ShareGPT data with LoRA, QLoRA or full fine-tuning.\n\n"
        "Example: vitune init-model --arch llama --out runs/tiny-llama && vitune train examples/quickstart.yaml"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
