"""`vitune config schema`: the run config's JSON Schema, for editors that complete and check YAML."""

from __future__ import annotations

import json

import typer

from vitune.cli.app import app

config_app = typer.Typer(help="The run config's JSON Schema for editors.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command(
    help=(
        "Print the JSON Schema of the run config (every section, key, type, default and description), for the "
        "YAML language server: save it and start a config with `# yaml-language-server: $schema=vitune.schema.json`.\n\n"
        "Example: vitune config schema > vitune.schema.json"
    )
)
def schema() -> None:
    from vitune.config import config_schema

    typer.echo(json.dumps(config_schema(), indent=2, ensure_ascii=False))
