"""End to end: `vitune train` on tiny models of real architectures, LoRA and full, then
reloading what it wrote with plain transformers / PEFT, and chatting with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from vitune.cli import main
from vitune.config import validate_config
from vitune.data.templates import get_template
from vitune.train.runner import run_training

from conftest import ROOT, write_config, write_jsonl

ALPACA = ROOT / "data" / "alpaca_vi.jsonl"
SHAREGPT = ROOT / "data" / "sharegpt_vi.jsonl"


def config(model: Path, data: Path, out: Path, method: str = "lora", **train):
    return validate_config({
        "model": {"name_or_path": str(model)},
        "method": {"type": method},
        "data": {"train": [{"path": str(data), "max_samples": 16}], "max_length": 256},
        "train": {"max_steps": 4, "micro_batch_size": 4, "learning_rate": 1e-3, "output_dir": str(out),
                  "logging_steps": 1, "report_to": ["tensorboard"], **train},
    })


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lora_on_alpaca_writes_a_complete_run_folder(tiny_models, tmp_path):
    from peft import PeftModel

    out = tmp_path / "run"
    result = run_training(config(tiny_models["llama"], ALPACA, out), None)
    names = {p.name for p in out.iterdir()}
    assert {"config.yaml", "metrics.jsonl", "summary.json", "adapter_config.json", "adapter_model.safetensors",
            "tokenizer.json", "tokenizer_config.json", "tensorboard", "data_report.json"} <= names
    assert "model.safetensors" not in names  # only the adapter is saved
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 16 and adapter["lora_alpha"] == 32
    assert set(adapter["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all({"loss", "learning_rate", "real_tokens", "tokens_per_s", "padding_fraction"} <= set(m) for m in metrics)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["final_loss"] == metrics[-1]["loss"]
    assert summary["real_tokens"] == metrics[-1]["real_tokens"]
    assert any((out / "tensorboard").iterdir())

    # plain PEFT reloads the adapter and gives the logits of the model at the end of training
    base = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    reloaded = PeftModel.from_pretrained(base, str(out)).eval()
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    trained = result.model.eval()
    assert torch.allclose(logits(trained, ids), logits(reloaded, ids), atol=1e-5)
    assert not torch.allclose(logits(reloaded, ids), logits(AutoModelForCausalLM.from_pretrained(tiny_models["llama"]), ids), atol=1e-4)


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "bloom"])
def test_full_fine_tuning_on_sharegpt_saves_a_loadable_model(tiny_models, tmp_path, arch):
    out = tmp_path / "run"
    result = run_training(config(tiny_models[arch], SHAREGPT, out, method="full"), None)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    assert torch.allclose(logits(result.model.eval(), ids), logits(reloaded, ids), atol=1e-5)
    assert result.summary["final_loss"] < result.summary["first_loss"]


def test_saved_tokenizer_carries_the_training_template(tiny_models, tmp_path):
    out = tmp_path / "run"
    cfg = config(tiny_models["qwen2"], ALPACA, out, max_steps=1)
    cfg.model.template = "vinallama"  # not the tokenizer's own (chatml): the saved one must change
    run_training(cfg, None)
    saved = json.loads((out / "tokenizer_config.json").read_text())
    assert saved["chat_template"] == get_template("vinallama").jinja()
    assert not (out / "chat_template.jinja").exists()
    assert AutoTokenizer.from_pretrained(out).chat_template == get_template("vinallama").jinja()


@pytest.mark.slow  # CI's 20-minute budget (fresh-clone durations, 2026-12-08); make test-all runs it
def test_learning_is_real_chat_repeats_a_training_answer(tiny_models, tmp_path, capsys):
    rows = [json.loads(line) for line in ALPACA.read_text(encoding="utf-8").splitlines()[:20]]
    data = write_jsonl(tmp_path / "twenty.jsonl", rows)
    path = write_config(
        tmp_path / "run.yaml",
        model={"name_or_path": str(tiny_models["llama"])},
        method={"type": "full"},
        data={"train": [{"path": str(data)}], "max_length": 512},
        # packed (the default): one bin of up to 512 tokens, ~5 rows, per step
        train={"epochs": 60, "micro_batch_size": 1, "learning_rate": 3e-3, "warmup_ratio": 0.05,
               "output_dir": str(tmp_path / "run"), "logging_steps": 20, "report_to": ["none"]},
    )
    assert main(["train", str(path)]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["final_loss"] < 0.3
    capsys.readouterr()
    for row in rows[:2]:
        question = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
        assert main(["chat", str(tmp_path / "run"), "--prompt", question, "--max-new-tokens", "300"]) == 0
        assert capsys.readouterr().out.strip() == row["output"]


def test_bad_input_exits_2_and_leaves_no_run_folder(tiny_models, tmp_path, capsys):
    out = tmp_path / "run"
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "Hỏi gì?", "input": ""}])
    cases = {
        "model": ({"name_or_path": str(tmp_path / "no-model")}, [{"path": str(ALPACA)}]),
        "data file": ({"name_or_path": str(tiny_models["llama"])}, [{"path": str(tmp_path / "none.jsonl")}]),
        "bad row": ({"name_or_path": str(tiny_models["llama"])}, [{"path": str(bad)}]),
    }
    errors = {}
    for name, (model, train) in cases.items():
        path = write_config(tmp_path / f"{name}.yaml", model=model, data={"train": train}, train={"output_dir": str(out)})
        assert main(["train", str(path)]) == 2
        errors[name] = capsys.readouterr().err.strip()
        assert not out.exists()
    assert errors["model"] == (
        f"error: model not found: {tmp_path / 'no-model'} (model.name_or_path must be a local model folder "
        "or a Hub id such as Viet-Mistral/Vistral-7B-Chat)"
    )
    assert errors["data file"].startswith(f"error: dataset file not found: {tmp_path / 'none.jsonl'}")
    assert errors["bad row"].startswith(f"error: 1 bad row(s): {bad}:1: alpaca row: missing field 'output'")


def test_existing_output_dir_is_not_overwritten_silently(tiny_models, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    path = write_config(tmp_path / "run.yaml", model={"name_or_path": str(tiny_models["llama"])},
                        data={"train": [{"path": str(ALPACA)}]}, train={"output_dir": str(out)})
    assert main(["train", str(path)]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_chat_refuses_an_unfinished_run(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: {}")
    assert main(["chat", str(run), "--prompt", "hi"]) == 2
    assert "is an unfinished run (no summary.json)" in capsys.readouterr().err


def test_init_model_cli_for_every_architecture(tmp_path, capsys):
    for arch in ("llama", "mistral", "qwen2", "bloom"):
        assert main(["init-model", "--arch", arch, "--out", str(tmp_path / arch)]) == 0
        model = AutoModelForCausalLM.from_pretrained(tmp_path / arch)
        tokenizer = AutoTokenizer.from_pretrained(tmp_path / arch)
        assert model.config.model_type == arch
        assert model.config.vocab_size == len(tokenizer)
        assert 2_000_000 < model.num_parameters() < 10_000_000
        assert tokenizer.chat_template
    assert main(["init-model", "--arch", "gpt2", "--out", str(tmp_path / "x")]) == 2
    assert "choose one of llama, mistral, qwen2, gemma3, bloom" in capsys.readouterr().err


# ---------------------------------------------------------------- startup checks (what the web page's Check runs)


def startup_config(out: Path, **train):
    return validate_config({"model": {"name_or_path": "no-model-is-loaded"}, "data": {"train": [{"path": "rows.jsonl"}]},
                            "train": {"output_dir": str(out), **train}})


def test_startup_checks_refuse_a_folder_that_is_not_empty(tmp_path):
    from vitune.errors import UserError
    from vitune.train.preflight import startup_checks

    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError) as refused:
        startup_checks(startup_config(out))
    assert str(refused.value) == (f"train.output_dir {out} already exists and is not empty; choose another folder "
                                  "or set train.overwrite: true (e.g. --set train.overwrite=true)")
    with pytest.raises(UserError) as refused:  # train.resume: auto, but nothing to resume from
        startup_checks(startup_config(out, resume="auto"))
    assert str(refused.value) == (f"train.output_dir {out} already exists and is not empty and holds no complete "
                                  "checkpoint to resume from; choose another folder or set train.overwrite: true "
                                  "(e.g. --set train.overwrite=true)")
    assert (out / "keep.txt").read_text() == "mine"


def test_startup_checks_accept_overwrite_and_a_folder_left_by_a_failed_start(tmp_path):
    from vitune.train.arguments import ScaleOut
    from vitune.train.preflight import Startup, startup_checks

    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert startup_checks(startup_config(out, overwrite=True)) == Startup(resume_from=None, scale_out=ScaleOut({}))
    assert (out / "keep.txt").read_text() == "mine"  # checked, not replaced: only a start replaces it
    (out / "keep.txt").unlink()
    (out / "progress.json").write_text('{"phase": "loading model"}')  # a start killed while loading the model
    assert startup_checks(startup_config(out)) == Startup(resume_from=None, scale_out=ScaleOut({}))


def test_startup_checks_find_the_checkpoint_to_resume_from(tmp_path):
    from vitune.train.checkpoint import MARKER
    from vitune.train.preflight import startup_checks

    out = tmp_path / "run"
    for step in (2, 4):
        (out / f"checkpoint-{step}").mkdir(parents=True)
        (out / f"checkpoint-{step}" / MARKER).write_text("{}")
    (out / "checkpoint-6").mkdir()  # no marker: a save cut short
    assert startup_checks(startup_config(out, resume="auto")).resume_from == out / "checkpoint-4"


def test_startup_checks_refuse_a_missing_deepspeed_file_and_a_missing_adapter(tmp_path):
    from vitune.errors import UserError
    from vitune.train.preflight import startup_checks

    with pytest.raises(UserError) as refused:
        startup_checks(startup_config(tmp_path / "a", deepspeed="nope.json"))
    assert str(refused.value) == ("train.deepspeed = nope.json: file not found (an example: examples/deepspeed/zero2.json, "
                                  "from `vitune examples copy deepspeed/zero2`)")
    config = startup_config(tmp_path / "b")
    config.model.adapter = str(tmp_path / "no-adapter")
    with pytest.raises(UserError) as refused:  # the stage's own rule (stage.check)
        startup_checks(config)
    assert str(refused.value) == (f"model.adapter = {tmp_path / 'no-adapter'}: folder not found (give a LoRA run "
                                  "folder such as runs/my-sft)")


# ---------------------------------------------------------------- which steps are logged


def logged_steps(out: Path) -> list[int]:
    return [m["step"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in m]


def short_run(model: Path, out: Path, **train):
    return validate_config({
        "model": {"name_or_path": str(model)}, "method": {"type": "lora"},
        "data": {"train": [{"path": str(ALPACA), "max_samples": 8}], "max_length": 64, "packing": False},
        "train": {"micro_batch_size": 1, "output_dir": str(out), "report_to": ["none"], **train},
    })


@pytest.mark.parametrize("max_steps, logging_steps, steps", [
    (3, 5, [1, 3]),  # the first and the last, though the cadence reaches neither
    (6, 1, [1, 2, 3, 4, 5, 6]),  # each once: the last step is not logged twice
])
def test_the_first_and_the_last_step_are_always_logged(tiny_models, tmp_path, max_steps, logging_steps, steps):
    out = tmp_path / "run"
    result = run_training(short_run(tiny_models["llama"], out, max_steps=max_steps, logging_steps=logging_steps), None)
    assert logged_steps(out) == steps
    assert result.summary["first_loss"] != result.summary["final_loss"]


def test_unset_logging_steps_logs_about_20_points_at_most_10_steps_apart(tiny_models, tmp_path):
    from vitune.train.trainer import logging_every

    assert [logging_every(n) for n in (3, 6, 39, 40, 100, 200, 5000)] == [1, 1, 1, 2, 5, 10, 10]
    out = tmp_path / "run"
    run_training(short_run(tiny_models["llama"], out, max_steps=45), None)  # 45 // 20: every 2nd step
    assert logged_steps(out) == [1, *range(2, 45, 2), 45]


def test_dry_run_shows_the_learning_rate_a_run_gets_by_default(tiny_models, tmp_path, capsys):
    for method, line in (("full", "learning rate: 2e-5, the default for full fine-tuning (train.learning_rate)"),
                         ("qlora", "learning rate: 2e-4, the default for QLoRA (train.learning_rate)")):
        path = write_config(tmp_path / f"{method}.yaml", model={"name_or_path": str(tiny_models["llama"])},
                            method={"type": method}, data={"train": [{"path": str(ALPACA)}], "max_length": 128},
                            train={"output_dir": str(tmp_path / method)})
        assert main(["train", str(path), "--dry-run"]) == 0
        shown = " ".join(capsys.readouterr().out.split())
        assert line in shown and "advice train.learning_rate" not in shown
    capsys.readouterr()
    assert main(["train", str(path), "--dry-run", "--set", "train.learning_rate=1e-4"]) == 0
    assert "learning rate:" not in capsys.readouterr().out  # the user's own value: nothing to say
