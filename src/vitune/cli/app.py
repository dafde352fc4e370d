"""The typer app every command module registers its commands on (cli/__init__.py imports them all)."""

from __future__ import annotations

import typer

import vitune

app = typer.Typer(
    name="vitune",
    help=(
        "Fine-tune open LLMs (Llama, Mistral, Qwen, BLOOM, Vistral, VinaLlama, ...) on Alpaca and "
        "ShareGPT data with LoRA, QLoRA or full fine-tuning.\n\n"
        "Example: vitune examples copy tiny my-project && cd my-project && vitune init-model --arch llama --out runs/tiny-llama "
        "&& vitune train examples/tiny.yaml"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"vitune {vitune.__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(False, "--version", help="Print vitune's version and exit.", is_eager=True,
                                 callback=_print_version),
) -> None:
    """The options before any command (`vitune --version`)."""
