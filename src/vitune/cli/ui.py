"""`vitune ui`: the web page (Gradio) for data, training, runs, chat, evaluation and export."""

from __future__ import annotations

from pathlib import Path

import typer

from vitune.cli.app import app


@app.command(
    help=(
        "Open the web UI: inspect data, fill a training form and watch its curves, compare runs, chat "
        "(side by side with the base model), evaluate and export. Bound to this machine only by default.\n\n"
        "Example: vitune ui --port 7860 --lang vi"
    )
)
def ui(
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0 lets other machines in: there is no login)"),
    port: int = typer.Option(7860, help="TCP port"),
    root: Path = typer.Option(Path("runs"), help="Folder of run and model folders the page lists and writes into"),
    lang: str = typer.Option("auto", help="auto (Vietnamese when the system locale is) | vi | en"),
    state_dir: Path = typer.Option(
        None, help="Folder for what the page generates (the YAML of each run it starts); default $VITUNE_UI_STATE_DIR, "
        "else $XDG_STATE_HOME/vitune/ui (~/.local/state/vitune/ui)"),
) -> None:
    from vitune.cli.serve import check_port
    from vitune.errors import UserError
    from vitune.ui.text import LANGUAGES, default_language

    if lang != "auto" and lang not in LANGUAGES:
        raise UserError(f"--lang {lang}: choose auto, vi or en")
    check_port(host, port)
    from vitune.ui.app import launch
    from vitune.ui.jobs import default_state_dir

    root.mkdir(parents=True, exist_ok=True)
    state_dir = state_dir or default_state_dir()
    typer.echo(f"vitune ui on http://{host}:{port} (runs folder {root}, page state {state_dir}); Ctrl-C stops it", err=True)
    launch(root, host, port, default_language() if lang == "auto" else lang, state_dir=state_dir)
