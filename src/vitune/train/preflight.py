"""The checks `vitune train` runs on a config before it loads anything: `startup_checks(config)`.

They are the cheap ones, each failing on the user's input in one line (UserError): the output
folder's rules (train.output_dir, train.overwrite, train.resume), train.deepspeed / train.fsdp,
and the stage's own rules across the config (its section, model.adapter, ...). The runner's
`prepare_run` starts with them, and the web page's "Check" calls the same function, so what
Check accepts is what Start accepts (up to the tokenizer, the data and the model, which only a
start reads).

A run folder that holds nothing but progress.json is a start that failed before it wrote
anything else (train/progress.py): it counts as empty.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vitune.config import RunConfig
from vitune.errors import UserError
from vitune.train.arguments import ScaleOut, resolve_scale_out
from vitune.train.checkpoint import find_resume_checkpoint
from vitune.train.progress import holds_no_run
from vitune.train.stages import stage_for
from vitune.train.trackers import check_trackers


@dataclass(frozen=True)
class Startup:
    """What the startup checks resolved on their way, for the runner to use (a caller that only
    checks can ignore it)."""

    resume_from: Path | None  # the checkpoint train.resume names (None: a fresh start)
    scale_out: ScaleOut  # train.deepspeed / train.fsdp, read and checked


def check_output_dir(path: Path, overwrite: bool, resuming: bool = False) -> None:
    """train.output_dir: a folder that is missing, empty (or holds only a failed start's
    progress.json), or replaced with train.overwrite."""
    if path.exists() and not path.is_dir():
        raise UserError(f"train.output_dir {path} is a file; choose a folder")
    if path.exists() and not overwrite and not holds_no_run(path):
        extra = " and holds no complete checkpoint to resume from" if resuming else ""
        raise UserError(
            f"train.output_dir {path} already exists and is not empty{extra}; choose another folder "
            "or set train.overwrite: true (e.g. --set train.overwrite=true)"
        )


def startup_checks(config: RunConfig) -> Startup:
    """Every check of `config` that needs neither the tokenizer, the data nor the model; raises
    UserError (one line) at the first problem. Reads the folder and the train.deepspeed / train.fsdp
    file; writes nothing."""
    out = Path(config.train.output_dir)
    resume_from = find_resume_checkpoint(out, config.train.resume, config.model.allow_pickle)
    if resume_from is None:
        check_output_dir(out, config.train.overwrite, resuming=config.train.resume == "auto")
    scale_out = resolve_scale_out(config)  # a missing or wrong train.deepspeed / train.fsdp file
    check_trackers(config)  # train.report_to: each tracker's library is installed
    stage_for(config).check(config)  # what the stage needs of the rest of the config (its section, model.adapter, ...)
    return Startup(resume_from, scale_out)

