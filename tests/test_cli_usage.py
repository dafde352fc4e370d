"""Usage mistakes on the command line print click's short usage message and exit 2, never a
traceback, on every typer the project allows (typer 0.29 vendors click as `typer._click`)."""

from __future__ import annotations

import pytest

from vitune.cli import main

USAGE_MISTAKES = [
    (["trian"], "No such command 'trian'"),
    (["train", "--bogus", "x.yaml"], "No such option: --bogus"),
    (["train"], "Missing argument"),
    (["data", "inspect"], "Missing argument"),
    (["data", "convert", "a.jsonl", "b.jsonl"], "Missing option '--to'"),
    (["train", "x.yaml", "--nproc", "two"], "Invalid value for '--nproc'"),
    (["chat", "runs/x", "--temperature", "hot"], "Invalid value for '--temperature'"),
]


@pytest.mark.parametrize("argv, message", USAGE_MISTAKES, ids=[" ".join(a) for a, _ in USAGE_MISTAKES])
def test_usage_mistake_prints_usage_and_exits_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Usage: " in err and "Traceback" not in err


def test_help_exits_0(capsys):
    assert main(["--help"]) == 0
    assert "train" in capsys.readouterr().out
