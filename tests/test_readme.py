"""The README's config reference lists every key of the schema, and its commands exist."""

from __future__ import annotations

import re

import yaml

from vitune.config import RunConfig, _inner_model

from conftest import ROOT


def schema_keys(model, prefix="") -> set[str]:
    keys = set()
    for name, field in model.model_fields.items():
        inner = _inner_model(field.annotation)
        keys.add(prefix + name)
        if inner is not None:
            keys |= schema_keys(inner, prefix + name + ".")
    return keys


def yaml_keys(node, prefix="") -> set[str]:
    keys = set()
    if isinstance(node, list):
        node = node[0] if node and isinstance(node[0], dict) else {}
    if isinstance(node, dict):
        for name, value in node.items():
            keys.add(prefix + name)
            if isinstance(value, (dict, list)) and name not in ("columns",):
                keys |= yaml_keys(value, prefix + name + ".")
    return keys


def test_config_reference_lists_every_key_and_validates():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"## Config reference.*?```yaml\n(.*?)```", readme, re.S).group(1)
    reference = yaml.safe_load(block)
    # the reference is a valid config (it lists the quantization section, used by qlora), and so
    # are its dpo and rl sections with their stages
    base = {k: v for k, v in reference.items() if k not in ("dpo", "rl")}
    base["method"] = {**reference["method"], "type": "qlora"}
    RunConfig.model_validate(base)
    for stage in ("dpo", "rl"):
        RunConfig.model_validate({**base, "train": {**base["train"], "stage": stage}, stage: reference[stage]})
    missing = {k for k in schema_keys(RunConfig) - yaml_keys(reference) if not k.startswith("data.eval.")}  # eval entries are train entries
    assert missing == set()


def test_readme_gives_the_two_setup_commands():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "make demo" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()
