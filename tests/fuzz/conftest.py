"""Fixtures of the fuzz suite: the folders every case may use (tests/conftest.py keeps the Hub offline)."""

from __future__ import annotations

import json
import shutil

import pytest

from fuzz import targets


@pytest.fixture(scope="session")
def fuzz_world(tiny_llama, tmp_path_factory) -> targets.World:
    """The tiny Llama folder, a finished LoRA run and a finished full run, built once."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from vitune.config import dump_config, validate_config

    base = tmp_path_factory.mktemp("fuzz-world")
    config_yaml = dump_config(validate_config({"model": {"name_or_path": str(tiny_llama)},
                                               "data": {"train": [{"path": "data/alpaca_vi.jsonl"}]}}))
    summary = json.dumps({"steps": 1, "seconds": 1.0, "final_loss": 1.0})
    lora = base / "lora-run"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    get_peft_model(model, config).save_pretrained(lora)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama / name, lora / name)
    full = targets.copy_model(tiny_llama, base / "full-run")
    for run in (lora, full):
        (run / "config.yaml").write_text(config_yaml, encoding="utf-8")
        (run / "summary.json").write_text(summary, encoding="utf-8")
    for f in tiny_llama.iterdir():
        if f.suffix != ".safetensors":
            targets.WORLD_FILES[f.name] = f.read_bytes()
    for kind, run in (("lora", lora), ("full", full)):
        for f in run.iterdir():
            if f.suffix != ".safetensors":
                targets.WORLD_FILES[f"{kind}/{f.name}"] = f.read_bytes()
    return targets.World(tiny_llama, lora, full)


def pytest_terminal_summary(terminalreporter):
    """How many cases each target ran and how they ended (exit code: count)."""
    from fuzz.checker import CASES

    if not CASES:
        return
    targets_seen: dict[str, dict] = {}
    for (name, code), n in CASES.items():
        targets_seen.setdefault(name, {})[code] = n
    terminalreporter.write_line(f"fuzz cases run: {sum(CASES.values())}")
    for name, codes in targets_seen.items():
        ends = ", ".join(f"exit {code}: {n}" for code, n in sorted(codes.items(), key=str))
        terminalreporter.write_line(f"  {name}: {sum(codes.values())} ({ends})")
