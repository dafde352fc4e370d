"""Hyperparameter guidance: advice with exact texts, never a changed value; impossible context is an error."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from vitune.config import validate_config
from vitune.errors import ConfigError
from vitune.train.guidance import advise, check_max_length

MODEL = SimpleNamespace(max_position_embeddings=4096)


def cfg(**sections):
    base = {"model": {"name_or_path": "m"}, "data": {"train": [{"path": "x.jsonl"}], "max_length": 2048}}
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return validate_config(base)


def test_usual_settings_get_no_advice():
    assert advise(cfg(), MODEL) == []


@pytest.mark.parametrize("method, lr, text", [
    ("lora", 5e-3, "5e-3 is outside 5e-5..5e-4, the usual range for LoRA (the docs recommend 1e-4..3e-4)"),
    ("qlora", 2e-5, "2e-5 is outside 5e-5..5e-4, the usual range for QLoRA (the docs recommend 1e-4..3e-4)"),
    ("full", 2e-4, "2e-4 is outside 5e-6..1e-4, the usual range for full fine-tuning (the docs recommend 1e-5..2e-5)"),
    ("full", 1e-6, "1e-6 is outside 5e-6..1e-4, the usual range for full fine-tuning (the docs recommend 1e-5..2e-5)"),
])
def test_a_learning_rate_outside_the_methods_usual_range_is_advised(method, lr, text):
    config = cfg(method={"type": method}, train={"learning_rate": lr})
    assert [(a.key, a.text) for a in advise(config, MODEL)] == [("train.learning_rate", text)]
    assert config.train.learning_rate == lr  # advice never changes values


@pytest.mark.parametrize("method, lr", [("lora", 5e-5), ("lora", 5e-4), ("qlora", 1e-4), ("full", 5e-6), ("full", 1e-4)])
def test_a_learning_rate_at_the_edges_of_the_usual_range_gets_no_advice(method, lr):
    assert advise(cfg(method={"type": method}, train={"learning_rate": lr}), MODEL) == []


def test_each_methods_default_learning_rate_gets_no_advice():
    for method in ("lora", "qlora", "full"):
        assert advise(cfg(method={"type": method}), MODEL) == [], method


def test_context_length_advice_and_error():
    (advice,) = advise(cfg(data={"max_length": 3000}), MODEL)
    assert advice.text.startswith("3000: common context lengths are 512, 1024, 2048, 4096, 8192 (the model accepts up to 4096)")
    with pytest.raises(ConfigError) as info:
        check_max_length(cfg(data={"max_length": 8192}), MODEL)
    assert str(info.value) == (
        "data.max_length = 8192 is longer than the model's max_position_embeddings (4096); lower it to at most 4096"
    )
    check_max_length(cfg(data={"max_length": 4096}), MODEL)


def test_lora_ratio_and_fp16_advice():
    texts = {a.key: a.text for a in advise(cfg(method={"lora": {"r": 8, "alpha": 64}}, model={"dtype": "float16"}), MODEL)}
    assert texts == {
        "method.lora.alpha": "alpha/r = 8; the update is scaled by alpha/r, and 1..2 (alpha = r or 2r) is usual",
        "model.dtype": "float16 overflows more easily than bfloat16; use bfloat16 on GPUs that have it (A100, H100, RTX 30xx/40xx)",
    }
