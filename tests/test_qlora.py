"""QLoRA on the CPU: bitsandbytes NF4 base weights, LoRA on top, saved adapter reloads with plain PEFT."""

from __future__ import annotations

import pytest
import torch

from vitune.config import validate_config
from vitune.train.runner import run_training

from conftest import ROOT

pytest.importorskip("bitsandbytes")


def test_qlora_trains_and_its_adapter_reloads_with_the_same_logits(tiny_llama, tmp_path):
    import bitsandbytes as bnb
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    out = tmp_path / "run"
    cfg = validate_config({
        "model": {"name_or_path": str(tiny_llama)},
        "method": {"type": "qlora", "quantization": {"bits": 4, "quant_type": "nf4", "double_quant": True}},
        "data": {"train": [{"path": str(ROOT / "data" / "alpaca_vi.jsonl"), "max_samples": 8}], "max_length": 256},
        "train": {"max_steps": 4, "micro_batch_size": 4, "learning_rate": 2e-3, "output_dir": str(out),
                  "logging_steps": 1, "report_to": ["none"]},
    })
    result = run_training(cfg, None)
    model = result.model
    linear4 = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linear4) == 4 * 7  # every linear layer of the 4 blocks is NF4
    assert linear4[0].weight.quant_type == "nf4"
    trainable = {n.split(".")[-3] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B"}
    assert result.summary["final_loss"] < result.summary["first_loss"]

    base = AutoModelForCausalLM.from_pretrained(
        tiny_llama,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32),
        dtype=torch.float32,
    )
    reloaded = PeftModel.from_pretrained(base, str(out)).eval()
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        expected = model.eval()(input_ids=ids).logits
        got = reloaded(input_ids=ids).logits
    assert torch.allclose(expected, got, atol=1e-4)
