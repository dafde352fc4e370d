"""Every shipped example config is valid and names bundled data that exists."""

from __future__ import annotations

from pathlib import Path

import pytest

from vitune.config import load_config

from conftest import ROOT

EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_config_is_valid(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    config = load_config(path)
    for spec in config.data.train:
        assert Path(spec.path).exists(), spec.path
