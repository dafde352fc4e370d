"""`vitune push FOLDER --repo ORG/NAME`: a finished run, merged folder or GGUF folder, with its card, to the Hub."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from vitune.cli.app import app


@app.command(
    help=(
        "Upload a finished run, a merged folder or a folder of GGUF exports to a model repository on the Hugging "
        "Face Hub (created if missing), with its model card (README.md: base model, licence, data, figures, how to "
        "use it). Checkpoints, tensorboard logs, progress.json, training_args.bin, rejects.jsonl and hidden files "
        "stay home; --dry-run lists what goes up. The token is HF_TOKEN's or `hf auth login`'s; HF_ENDPOINT picks "
        "another Hub.\n\n"
        "Example: vitune push runs/quickstart --repo my-org/quickstart-vi --private"
    )
)
def push(
    folder: Path = typer.Argument(..., help="Run folder, merged folder or folder of GGUF files", show_default=False),
    repo: str = typer.Option(..., "--repo", help="Hub model repository, ORG/NAME (created if missing)",
                             show_default=False),
    private: bool = typer.Option(False, "--private", help="Create the repository private (an existing one keeps "
                                 "its visibility)"),
    revision: Optional[str] = typer.Option(None, "--revision", "--branch", help="Branch to push to (created from "
                                           "main if missing; default: main)", show_default=False),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be uploaded; write and send nothing"),
) -> None:
    from vitune.export.push import push_folder

    console = Console(highlight=False)
    done = push_folder(folder, repo, private=private, revision=revision, dry_run=dry_run,
                       say=lambda line: console.print(escape(line), soft_wrap=True))
    if done["url"]:
        console.print(f"pushed {len(done['files'])} files: {escape(done['url'])}", soft_wrap=True)
