"""The run config: overrides, unknown keys and bad values give exact one-line errors."""

from __future__ import annotations

import pytest
import yaml

from vitune.cli import main
from vitune.config import apply_override, load_config, validate_config
from vitune.errors import ConfigError

from conftest import write_config

BASE = {"model": {"name_or_path": "m"}, "data": {"train": [{"path": "x.jsonl"}]}}


def problem(raw: dict) -> str:
    with pytest.raises(ConfigError) as info:
        validate_config(raw, "run.yaml")
    return str(info.value)


def test_defaults_are_filled_in():
    cfg = validate_config(BASE)
    assert cfg.method.type == "lora"
    assert cfg.method.lora.target_modules == "all-linear"
    assert cfg.model.template == "auto"
    assert cfg.train.learning_rate == 2e-4
    assert cfg.data.train[0].format == "auto"


def test_overrides_reach_any_key(tmp_path):
    path = write_config(tmp_path / "run.yaml", **BASE)
    cfg = load_config(
        path,
        [
            "train.learning_rate=1e-4",
            "data.train.0.path=y.jsonl",
            "method.lora.target_modules=[q_proj, v_proj]",
            "data.train.0.columns.output=answer",
            "train.epochs=1",
        ],
    )
    assert cfg.train.learning_rate == 1e-4
    assert cfg.data.train[0].path == "y.jsonl"
    assert cfg.method.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.train[0].columns == {"output": "answer"}
    assert cfg.train.epochs == 1.0


def test_unknown_key_names_the_nearest_valid_key():
    assert problem({**BASE, "train": {"learnin_rate": 1e-4}}) == (
        "run.yaml: unknown key 'train.learnin_rate'; did you mean 'train.learning_rate'?"
    )


def test_key_in_the_wrong_section_names_its_section():
    assert problem({**BASE, "train": {"lora": {"r": 8}}}) == "run.yaml: unknown key 'train.lora'; did you mean 'method.lora'?"
    assert problem({**BASE, "packing": True}) == "run.yaml: unknown key 'packing'; did you mean 'data.packing'?"


def test_unknown_key_inside_a_list_item():
    raw = {**BASE, "data": {"train": [{"path": "x", "formt": "alpaca"}]}}
    assert problem(raw) == "run.yaml: unknown key 'data.train[0].formt'; did you mean 'data.train[0].format'?"


def test_bad_choice_lists_what_is_allowed():
    assert problem({**BASE, "method": {"type": "qlor"}}) == (
        "run.yaml: method.type = 'qlor' is not allowed; expected 'full', 'lora' or 'qlora'"
    )


def test_wrong_type_and_range_name_key_and_value():
    assert problem({**BASE, "train": {"learning_rate": "fast"}}) == (
        "run.yaml: train.learning_rate = 'fast': input should be a valid number, unable to parse string as a number"
    )
    assert problem({**BASE, "train": {"epochs": 0}}) == "run.yaml: train.epochs = 0: input should be greater than 0"


def test_missing_required_key():
    assert problem({"data": BASE["data"]}) == "run.yaml: missing required key 'model'"
    assert problem({**BASE, "model": {}}) == "run.yaml: missing required key 'model.name_or_path'"


def test_cross_field_rules_raise_instead_of_rewriting():
    assert problem({**BASE, "method": {"type": "full", "lora": {"r": 8}}}) == (
        "run.yaml: method.lora is only used with method.type: lora or qlora"
    )
    raw = {**BASE, "data": {"train": [{"path": "x"}], "eval": [{"path": "y"}], "val_size": 0.1}}
    assert problem(raw) == "run.yaml: data: give either data.eval or data.val_size, not both"


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match=r"^--set 'trainlr': write it as key.path=value"):
        apply_override({}, "trainlr")
    with pytest.raises(ConfigError, match=r"data.train is a list of 1 item\(s\); address one as data.train.0"):
        apply_override({"data": {"train": [{}]}}, "data.train.3.path=x")


def test_cli_config_mistakes_exit_2_with_one_line(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: config file not found: ")
    assert "\n" not in err and "Traceback" not in err

    path = write_config(tmp_path / "run.yaml", **BASE, train={"learnin_rate": 1})
    assert main(["train", str(path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {path}: unknown key 'train.learnin_rate'; did you mean 'train.learning_rate'?"
    )


def test_cli_invalid_yaml(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("model: [unclosed\n", encoding="utf-8")
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path} line ") and "not valid YAML" in err


@pytest.mark.parametrize("method, default", [("lora", 2e-4), ("qlora", 2e-4), ("full", 2e-5)])
def test_an_unset_learning_rate_is_the_methods_default_and_config_yaml_shows_it(method, default, tmp_path):
    from vitune.config import dump_config, load_run_config

    cfg = validate_config({**BASE, "method": {"type": method}})
    assert cfg.train.learning_rate == default
    assert "learning_rate" not in cfg.train.model_fields_set  # still the default, not the user's
    (tmp_path / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
    assert yaml.safe_load(dump_config(cfg))["train"]["learning_rate"] == default
    assert load_run_config(tmp_path).train.learning_rate == default


def test_a_learning_rate_the_user_wrote_is_kept_for_every_method():
    for method in ("lora", "qlora", "full"):
        cfg = validate_config({**BASE, "method": {"type": method}, "train": {"learning_rate": 3e-4}})
        assert cfg.train.learning_rate == 3e-4 and "learning_rate" in cfg.train.model_fields_set
