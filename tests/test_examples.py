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


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])  # run configs, not fsdp/ or accelerate/
def test_every_example_passes_the_json_schema_editors_check_with(path):
    import jsonschema
    import yaml

    from vitune.config import config_schema

    jsonschema.validate(yaml.safe_load(path.read_text(encoding="utf-8")), config_schema())


def test_the_schema_refuses_an_unknown_key_and_a_wrong_type_as_the_config_does():
    import jsonschema

    from vitune.config import config_schema

    schema = config_schema()
    assert (schema["$schema"], schema["title"], schema["required"]) == (
        "https://json-schema.org/draft/2020-12/schema", "vitune run config", ["model", "data"])
    base = {"model": {"name_or_path": "m"}, "data": {"train": [{"path": "a.jsonl"}]}}
    jsonschema.validate(base, schema)
    with pytest.raises(jsonschema.ValidationError) as unknown:
        jsonschema.validate({**base, "train": {"learnin_rate": 1e-4}}, schema)
    assert unknown.value.message == "Additional properties are not allowed ('learnin_rate' was unexpected)"
    with pytest.raises(jsonschema.ValidationError) as wrong:
        jsonschema.validate({**base, "method": {"type": "lorra"}}, schema)
    assert wrong.value.message == "'lorra' is not one of ['full', 'lora', 'qlora']"


def test_vitune_config_schema_prints_the_schema(capsys):
    import json

    from vitune.cli import main
    from vitune.config import config_schema

    assert main(["config", "schema"]) == 0
    assert json.loads(capsys.readouterr().out) == config_schema()
