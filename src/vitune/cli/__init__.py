"""The `vitune` command: one small module per command group, one entry point here.

User mistakes (`UserError`) print one line and exit 2; a full or failing disk while saving
(`DiskError`) prints one line and exits 74 (sysexits' EX_IOERR), its checkpoints kept to
resume from; anything else is a bug: exit 1.
"""

from __future__ import annotations

import os
import sys

import typer
from rich.console import Console
from rich.markup import escape

from vitune.errors import DISK_ERRNOS, DiskError, UserError


# each command module registers its commands on the app (cli/app.py) when it is imported
from vitune.cli import chat as _chat  # noqa: F401
from vitune.cli import config as _config  # noqa: F401
from vitune.cli import data as _data  # noqa: F401
from vitune.cli import estimate as _estimate  # noqa: F401
from vitune.cli import eval as _eval  # noqa: F401
from vitune.cli import examples as _examples  # noqa: F401
from vitune.cli import export as _export  # noqa: F401
from vitune.cli import init_model as _init_model  # noqa: F401
from vitune.cli import merge as _merge  # noqa: F401
from vitune.cli import push as _push  # noqa: F401
from vitune.cli import score as _score  # noqa: F401
from vitune.cli import serve as _serve  # noqa: F401
from vitune.cli import train as _train  # noqa: F401
from vitune.cli import ui as _ui  # noqa: F401
from vitune.cli import vocab as _vocab  # noqa: F401
from vitune.cli.app import app

err_console = Console(stderr=True)


def quiet_libraries() -> None:
    """Keep the terminal for vitune's own output: library progress bars and notices off."""
    import logging
    import os
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # bitsandbytes warns on import that an optional Hub-fetched CPU kernel is missing
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    try:
        code = app(args=argv, standalone_mode=False)  # typer.Exit(n) comes back as n
    except UserError as exc:
        err_console.print(f"[bold red]error:[/] {escape(one_line(str(exc)))}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except Exception as exc:
        from vitune.train.runner import RunInterrupted

        if not isinstance(exc, RunInterrupted):
            return _other_error(exc)
        err_console.print(f"[bold yellow]{escape(str(exc))}[/]", highlight=False, soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 0
    return code if isinstance(code, int) else 0


def run_script(script_main) -> None:
    """Run a script's `main()` (examples/demo.py) as vitune runs a command: a user error is one
    line and its exit status, never a traceback. Exits with main's return value."""
    quiet_libraries()
    try:
        code = script_main()
    except UserError as exc:
        err_console.print(f"[bold red]error:[/] {escape(one_line(str(exc)))}", highlight=False, soft_wrap=True)
        code = exc.exit_code
    sys.exit(code)


def one_line(message: str) -> str:
    """A user error is one line: control characters from the user's own paths, keys and values
    (a newline in a file name, a NUL in a --set value) are shown escaped, as Python writes them."""
    if message.isprintable():
        return message
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)


def _other_error(exc: Exception) -> int:
    # Click's usage errors are user errors too. Match them by class name along the MRO, not by
    # isinstance against `click`: typer 0.29 vendors click as `typer._click`, whose classes are
    # not click's, and a later typer may move them again.
    names = {cls.__name__ for cls in type(exc).__mro__}
    if "ClickException" in names and hasattr(exc, "show"):
        exc.show()
        return getattr(exc, "exit_code", 2)
    if "Abort" in names:
        return 130
    if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
        # a full or failing disk under any other write (metrics.jsonl, tensorboard, the cache):
        # not a bug; checkpoints and the final save say more themselves (train/checkpoint.py)
        where = f" {exc.filename}" if exc.filename else ""
        message = (f"{os.strerror(exc.errno)} while writing{where}; free space or check the disk, then run again "
                   "(a training run resumes from its last complete checkpoint with --set train.resume=auto)")
        err_console.print(f"[bold red]error:[/] {escape(one_line(message))}", highlight=False, soft_wrap=True)
        return DiskError.exit_code
    raise exc


def run() -> None:
    sys.exit(main())
