"""`vitune train CONFIG`: fine-tune a model as one YAML file describes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape

from vitune.cli.app import app
from vitune.config import load_config


@app.command(
    help=(
        "Fine-tune a model as CONFIG (a YAML file) describes.\n\n"
        "Example: vitune train examples/quickstart.yaml --set train.learning_rate=1e-4"
    )
)
def train(
    config: Path = typer.Argument(..., help="Run config, e.g. examples/quickstart.yaml", show_default=False),
    set_: Optional[List[str]] = typer.Option(
        None, "--set", help="Override a key: --set train.epochs=1 (repeatable)", show_default=False
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Check the config, prepare (and cache) the data, print the estimate and advice; train nothing"
    ),
    nproc: int = typer.Option(1, "--nproc", help="Train with N processes on this machine (through accelerate launch)"),
    device: str = typer.Option("H100", help="GPU the --dry-run estimate is for (see vitune estimate)"),
) -> None:
    from vitune.train.runner import run_training  # lazy: torch and transformers, not for `vitune --help`
    from vitune.train.stages import stage_for

    cfg = load_config(config, set_ or [])
    # under accelerate launch only the main process prints (ranks are set in the environment)
    console = Console(quiet=os.environ.get("RANK", "0") != "0")
    if nproc > 1 and "LOCAL_RANK" not in os.environ:
        from vitune.train.run_lock import output_dir_lock  # lazy: as above

        with output_dir_lock(Path(cfg.train.output_dir)):
            pass  # refuse a folder in use here, in one line, not from inside the launched ranks
        raise typer.Exit(launch(config, set_ or [], nproc))
    if dry_run:
        from vitune.cli.estimate import print_estimate  # lazy: as above
        from vitune.models.estimate import estimate
        from vitune.train.runner import prepare_run

        prepared = prepare_run(cfg, console)
        print_estimate(cfg, estimate(cfg, prepared.model_config, device), console)
        console.print(f"dry run: the config, tokenizer and data of {escape(str(config))} are ready; nothing was trained")
        return
    result = run_training(cfg, console)
    if console.quiet:
        return
    s = result.summary
    # a run resumed from its last step trains no step, so it logs no loss
    loss = f"loss {s['first_loss']:.4f} -> {s['final_loss']:.4f}, " if s["first_loss"] is not None else ""
    console.print(
        f"done: {s['steps']} steps in {s['seconds']:.0f} s, {loss}"
        f"{s['tokens_per_s']:,.0f} tokens/s. Run folder: {escape(str(result.output_dir))}"
    )
    for line in stage_for(cfg).result_lines(s, result.output_dir):  # the stage's figures and what to do next
        console.print(escape(line))


def launch(config: Path, overrides: list[str], nproc: int) -> int:
    """Re-run this command under `accelerate launch` with nproc processes on this machine.

    accelerate (not a launcher of ours) starts the processes and sets up torch.distributed:
    NCCL on GPUs, gloo on the CPU. Each rank trains on its share of every global batch.
    """
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(nproc),
           "--num_machines", "1", "--dynamo_backend", "no", "--mixed_precision", "no"]
    # accelerate's multi-process launcher (torchrun); with no GPU vitune's TrainingArguments
    # run on the CPU and torch.distributed uses gloo. (`--cpu` would start a single process.)
    cmd += ["--multi_gpu"]
    # a free port, not torchrun's fixed 29500: two runs on one machine must not meet
    cmd += ["--main_process_port", str(free_port())]
    cmd += ["-m", "vitune", "train", str(config)]
    for item in overrides:
        cmd += ["--set", item]
    return subprocess.call(cmd)


def free_port() -> int:
    """A TCP port nobody listens on now, for the ranks to meet on (the OS picks it)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
