"""The stage table: one list of stages, one file per stage, and decisions that are stage attributes."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from vitune.config import STAGE_INFO, validate_config
from vitune.train import arguments
from vitune.train.stages import STAGES

from conftest import ROOT

ALPACA = ROOT / "data" / "alpaca_vi.jsonl"

TRAIN = ROOT / "src" / "vitune" / "train"


def test_every_stage_of_the_config_table_is_one_file_under_train_stages():
    assert list(STAGES) == list(STAGE_INFO) == ["sft", "pt", "rm", "dpo", "rl"]
    for name, stage in STAGES.items():
        assert stage.info is STAGE_INFO[name]
        assert Path(type(stage).__module__.replace(".", "/") + ".py").name == f"{name}.py"
    files = sorted(p.stem for p in (TRAIN / "stages").glob("*.py") if p.stem != "__init__")
    assert files == sorted(STAGE_INFO)


def test_no_code_outside_the_stage_files_compares_stage_names():
    """What differs between stages is an attribute or a hook, never `stage.name == ...` elsewhere."""
    found = []
    for path in (ROOT / "src" / "vitune").rglob("*.py"):
        if path.parent.name == "stages":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Compare):
                names = [n for n in [node.left, *node.comparators] if isinstance(n, ast.Constant)]
                if any(n.value in STAGE_INFO for n in names) and "stage" in ast.unparse(node):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert found == []


def test_the_ui_stage_menu_and_the_config_help_come_from_the_table():
    source = (ROOT / "src" / "vitune" / "ui" / "app.py").read_text(encoding="utf-8")
    assert "STAGE_INFO.values()" in source and '"dpo"]' not in source
    from vitune.config import TrainConfig

    assert TrainConfig.model_fields["stage"].description == (
        "sft: supervised fine-tuning on instructions or conversations; pt: continued pretraining on raw text (text "
        "rows, .txt files); rm: a reward model trained on preference pairs; dpo: preference optimisation: DPO, IPO, "
        "hinge, ORPO, SimPO, KTO (the dpo section picks the loss); rl: reinforcement learning from rewards: GRPO, "
        "RLOO, PPO (the rl section).")


@pytest.mark.parametrize("stage, liger", [("sft", True), ("pt", True), ("rm", False), ("dpo", False), ("rl", False)])
def test_liger_is_a_stage_attribute_and_pt_gets_it_too(tiny_llama, monkeypatch, stage, liger):
    # as if on a GPU with liger-kernel installed: the stage decides whether its loss can take it
    monkeypatch.setattr(arguments, "use_liger", lambda setting, model: True)
    extra = {"rl": {"rewards": [{"function": "examples.rewards:vietnamese"}]}} if stage == "rl" else {}
    config = validate_config({"model": {"name_or_path": str(tiny_llama)}, "data": {"train": [{"path": str(ALPACA)}]},
                              "train": {"stage": stage}, **extra})
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert arguments.plan_speed(config, model, STAGES[stage]).liger is liger


def test_the_lines_printed_at_the_end_are_the_stages():
    out = Path("runs/x")
    summary = {"eval_loss_start": 2.5, "eval_loss_end": 2.0,
               "eval_rewards_accuracy_start": 0.5, "eval_rewards_accuracy_end": 0.875, "eval_rewards_margin_end": 1.25,
               "eval_bits_per_char_start": 1.5, "eval_bits_per_char_end": 1.25,
               "eval_reward_start": -1.0, "eval_reward_end": -0.5, "reward_first": -1.5, "reward_last": -0.25}
    assert STAGES["sft"].result_lines(summary, out) == ["held-out loss 2.5000 -> 2.0000", "chat with it: vitune chat runs/x"]
    assert STAGES["pt"].result_lines(summary, out)[1] == "held-out bits per character 1.5000 -> 1.2500"
    assert STAGES["rm"].result_lines(summary, out)[1:] == [
        "held-out pairs: chosen preferred in 50.0% -> 87.5%, mean margin 1.250",
        "score answers with it: vitune score runs/x --data FILE"]
    assert STAGES["dpo"].result_lines(summary, out)[1] == "held-out pairs: chosen preferred in 50.0% -> 87.5%, mean margin 1.250"
    assert STAGES["rl"].result_lines(summary, out)[1:3] == [
        "held-out prompts: mean reward -1.0000 (start) -> -0.5000 (end)",
        "mean reward -1.5000 (first step) -> -0.2500 (last step)"]
    resumed = {"eval_loss_end": 2.0}  # a resume keeps no start figure
    assert STAGES["sft"].result_lines(resumed, out)[0] == "held-out loss 2.0000"
