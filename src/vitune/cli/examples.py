"""`vitune examples list | copy NAME DIR`: the bundled examples, put where the user works."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from vitune.cli.app import app

examples_app = typer.Typer(help="List the bundled example configs and copy one, with its data, into a folder.",
                           no_args_is_help=True)
app.add_typer(examples_app, name="examples")


@examples_app.command("list", help="Each bundled example (run configs, DeepSpeed/FSDP/accelerate files, reward "
                                   "functions, demo scripts) with what it is.\n\nExample: vitune examples list")
def list_() -> None:
    from vitune import bundled

    table = Table("name", "what it is", box=None, show_edge=False)
    for name, about in bundled.examples().items():
        table.add_row(escape(name), escape(about))
    Console(highlight=False).print(table)


@examples_app.command(
    help=(
        "Copy an example and every bundled file it names (data, reward functions, other configs) into DIR, "
        "keeping their paths (examples/..., data/...), so that the docs' commands run there as written.\n\n"
        "Example: vitune examples copy quickstart my-project && cd my-project && vitune train examples/quickstart.yaml"
    )
)
def copy(
    name: str = typer.Argument(..., help="An example's name, as `vitune examples list` shows it", show_default=False),
    dest: Path = typer.Argument(Path("."), help="Folder to copy into (made if missing)"),
    force: bool = typer.Option(False, "--force", help="Overwrite files there that differ from the example's"),
) -> None:
    from vitune import bundled

    written = bundled.copy_example(name, dest, force=force)
    console = Console(highlight=False, soft_wrap=True)  # a long path stays on its line
    for path in written:
        console.print(f"wrote {escape(str(path))}")
    first = written[0].relative_to(dest).as_posix()
    if first.endswith(".yaml") and first.count("/") == 1:  # a run config; not a DeepSpeed/FSDP/accelerate file
        console.print(f"next: cd {escape(str(dest))} && vitune train {escape(first)}")
    elif first.startswith("examples/demo"):
        console.print(f"next: cd {escape(str(dest))} && python {escape(first)}")
