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
    for path in config.eval.data if config.eval else []:
        assert Path(path).exists(), path


def test_the_quickstart_holds_out_20_rows_and_the_demo_finds_its_questions_among_them(monkeypatch):
    import importlib.util

    from vitune.data.pipeline import DataReport, load_conversations

    monkeypatch.chdir(ROOT)
    spec = importlib.util.spec_from_file_location("demo", ROOT / "examples" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    config = load_config(ROOT / "examples" / "quickstart.yaml")
    assert (config.model.name_or_path, config.model.template, config.method.type) == ("runs/gemma-3-270m", "gemma", "lora")
    train, held_out = load_conversations(config.data, config.train.seed, DataReport())
    assert (len(train), len(held_out)) == (150, 20)
    questions = demo.single_turn(held_out, 3)
    assert len(questions) == 3
    trained = {c.messages[0].text for c in train}
    assert not any(q.messages[0].text in trained for q in questions)  # never trained on
