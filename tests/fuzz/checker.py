"""The property every fuzz case must hold: no traceback ever reaches the user.

`run_cli(argv, cwd)` runs `vitune.cli.main(argv)` in this process with stdout, stderr and
stdin replaced; an exception raising out of `main` is a bug and fails the case as it is.
`check_user_facing(outcome)` checks what the user sees: exit 0, 2 (a mistake of theirs) or
130 (interrupted) or 74 (a full disk), and a 2 or 74 says one line "error: ..." (or click's usage text).
"""

from __future__ import annotations

import io
import json
import os
import sys
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from hypothesis import note

from vitune.cli import main

OK, USER_ERROR, INTERRUPTED, DISK = 0, 2, 130, 74  # 74: a full or failing disk (errors.DiskError)

# cases run in this session by (target, exit code), shrinking included; printed at the end of the run
CASES: Counter = Counter()


@dataclass
class Outcome:
    argv: list[str]
    code: object
    out: str
    err: str


@contextmanager
def _stdin(text: str):
    old = sys.stdin
    sys.stdin = io.StringIO(text)
    try:
        yield
    finally:
        sys.stdin = old


def run_cli(argv: list[str], cwd: Path, stdin: str = "") -> Outcome:
    """main(argv) with cwd as the working folder (stray relative paths land there)."""
    note(f"argv: {argv!r}")
    out, err = io.StringIO(), io.StringIO()
    before = os.getcwd()
    os.chdir(cwd)
    try:
        with redirect_stdout(out), redirect_stderr(err), _stdin(stdin):
            code = main(list(argv))  # an exception here is the bug: it propagates with its traceback
    finally:
        os.chdir(before)
    outcome = Outcome(list(argv), code, out.getvalue(), err.getvalue())
    note(f"exit {code}; stderr: {outcome.err[-2000:]!r}")
    return outcome


PROGRESS_LINES = ("model: ",)


def check_user_facing(outcome: Outcome) -> None:
    assert outcome.code in (OK, USER_ERROR, INTERRUPTED, DISK), f"exit code {outcome.code!r} for {outcome.argv!r}"
    assert "Traceback" not in outcome.err and "Traceback" not in outcome.out, outcome.err
    if outcome.code in (USER_ERROR, DISK):
        # lines as a terminal shows them: str.splitlines would also split at \x1c-\x1e, \x85, \u2028
        lines = outcome.err.strip("\n").split("\n") if outcome.err.strip("\n") else []
        # what vitune said before the error on stderr (a .gguf model's conversion) is not part of it
        lines = [line for line in lines if not line.startswith(PROGRESS_LINES)]
        if "Usage: " in outcome.err or (not lines and "Usage: " in outcome.out):
            return  # click's usage message for a mistake on the command line (bare `vitune`: help, exit 2)
        if len(lines) == 1 and lines[0].startswith("Error: "):
            return  # click's one line without the usage, e.g. "Error: Option '--arch' requires an argument."
        assert len(lines) == 1 and lines[0].startswith("error: ") and len(lines[0]) > len("error: "), (
            f"a user error must be one line 'error: ...', got {outcome.err!r}"
        )


def check_data_counts(outcome: Outcome) -> None:
    """`data inspect --json` under on_error: skip: every row read is kept or rejected, and
    the rejections by reason add up."""
    if outcome.code != OK:
        return
    stats = json.loads(outcome.out)
    assert stats["rows_read"] == stats["rows_kept"] + stats["rows_rejected"], stats
    assert sum(stats["rejected_by_reason"].values()) == stats["rows_rejected"], stats
    assert stats["rows_kept"] >= 0 and stats["train_rows"] >= 1, stats
