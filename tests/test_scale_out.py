"""train.deepspeed / train.fsdp reach TrainingArguments; incompatible combinations are refused."""

from __future__ import annotations

import pytest

from vitune.config import validate_config
from vitune.errors import UserError
from vitune.train.arguments import ScaleOut, resolve_scale_out

from conftest import ROOT


def cfg(method="lora", **train):
    return validate_config({"model": {"name_or_path": "m"}, "method": {"type": method},
                            "data": {"train": [{"path": "x"}]}, "train": train})


def test_shipped_engine_configs_are_passed_through():
    zero2 = str(ROOT / "examples" / "deepspeed" / "zero2.json")
    assert resolve_scale_out(cfg(deepspeed=zero2)) == ScaleOut({"deepspeed": zero2}, zero_stage=2)
    fsdp = resolve_scale_out(cfg(fsdp=str(ROOT / "examples" / "fsdp" / "fsdp2.yaml"))).arguments
    assert fsdp["fsdp"] == "full_shard auto_wrap" and fsdp["fsdp_config"]["version"] == 2
    assert resolve_scale_out(cfg()) == ScaleOut({})


def test_qlora_with_zero3_or_fsdp_is_refused():
    zero3 = str(ROOT / "examples" / "deepspeed" / "zero3_offload.json")
    with pytest.raises(UserError, match="QLoRA with ZeRO-3 shards 4-bit weights"):
        resolve_scale_out(cfg("qlora", deepspeed=zero3))
    with pytest.raises(UserError, match="train.fsdp with method.type: qlora is not supported yet"):
        resolve_scale_out(cfg("qlora", fsdp=str(ROOT / "examples" / "fsdp" / "fsdp2.yaml")))


def test_missing_engine_file_and_both_engines():
    with pytest.raises(UserError, match="train.deepspeed = nope.json: file not found"):
        resolve_scale_out(cfg(deepspeed="nope.json"))
    from vitune.errors import ConfigError

    with pytest.raises(ConfigError, match="give either train.deepspeed or train.fsdp, not both"):
        cfg(deepspeed="a.json", fsdp="b.yaml")


def test_dry_run_prepares_and_estimates_without_training(tiny_llama, tmp_path, capsys):
    from vitune.cli import main

    from conftest import write_config

    out = tmp_path / "run"
    path = write_config(tmp_path / "run.yaml", model={"name_or_path": str(tiny_llama)},
                        data={"train": [{"path": str(ROOT / "data" / "alpaca_vi.jsonl"), "max_samples": 8}]},
                        train={"output_dir": str(out), "learning_rate": 5e-3})
    assert main(["train", str(path), "--dry-run"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "data: 8 rows read, 8 kept, 0 rejected" in text
    assert "advice train.learning_rate: 5e-3 is outside 5e-5..5e-4, the usual range for LoRA (the docs recommend 1e-4..3e-4)" in text
    assert "optimizer states" in text and "predicted" in text
    assert f"dry run: the config, tokenizer and data of {path} are ready; nothing was trained" in text
    assert not out.exists()


def test_dry_run_refuses_a_missing_engine_file(tiny_llama, tmp_path, capsys):
    from vitune.cli import main

    from conftest import write_config

    path = write_config(tmp_path / "run.yaml", model={"name_or_path": str(tiny_llama)},
                        data={"train": [{"path": str(ROOT / "data" / "alpaca_vi.jsonl"), "max_samples": 4}]},
                        train={"output_dir": str(tmp_path / "run"), "deepspeed": "nope.json"})
    assert main(["train", str(path), "--dry-run"]) == 2
    assert "train.deepspeed = nope.json: file not found" in capsys.readouterr().err


def test_a_deepspeed_file_that_is_not_a_json_object_is_one_line(tmp_path):
    broken = tmp_path / "zero.json"
    broken.write_text('{"zero_optimization": {"stage": 2,', encoding="utf-8")
    with pytest.raises(UserError) as exc:
        resolve_scale_out(cfg(deepspeed=str(broken)))
    assert str(exc.value).startswith(f"train.deepspeed = {broken}: not a JSON file (Expecting property name")
    assert str(exc.value).endswith("; see examples/deepspeed/zero2.json, from `vitune examples copy deepspeed/zero2`")
    broken.write_text('[2]', encoding="utf-8")
    with pytest.raises(UserError, match=r"expected a JSON object with zero_optimization: \{stage: ...\}"):
        resolve_scale_out(cfg(deepspeed=str(broken)))
