"""What a training step costs: model FLOPs per token, attention FLOPs, and the device's
peak, for the achieved TFLOP/s and MFU (model FLOPs utilisation) in the logs.

The usual convention (PaLM, Megatron): a token costs 6 N FLOPs for a forward and backward
pass through N matmul weights (embeddings excluded, LM head included), 4 N when the base
weights are frozen (LoRA, QLoRA: no weight gradients), plus causal attention, 6 * layers *
width * length per token of a row. Recomputation by activation checkpointing is not
counted: MFU measures useful work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Dense bf16 tensor-core peaks (FLOP/s) of common training GPUs; the first name found in
# torch.cuda.get_device_name() wins. Unknown devices (and CPUs) get no MFU, only TFLOP/s.
PEAK_BF16 = {
    "H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "GH200": 989e12, "B200": 2250e12,
    "A100": 312e12, "A800": 312e12, "L40S": 362e12, "L40": 181e12, "A6000": 155e12,
    "A10G": 125e12, "A10": 125e12, "L4": 121e12, "RTX 4090": 165e12, "RTX 3090": 71e12,
}


@dataclass(frozen=True)
class FlopsModel:
    per_token: float  # 6 N (or 4 N with frozen base weights)
    per_square: float  # attention: FLOPs per (row length)^2, summed over rows

    def step(self, tokens: int, sum_squares: int) -> float:
        return self.per_token * tokens + self.per_square * sum_squares


def flops_model(model) -> FlopsModel:
    """FLOPs per token and per squared row length of a (possibly PEFT-wrapped) causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    embeddings = {id(p) for p in base.get_input_embeddings().parameters()}
    # Count matmul weights (2-D and up) that are not the input embedding; LoRA adapters are
    # tiny and their trainable flag would wrongly make the whole model "trained".
    n, trained = 0, False
    for name, p in base.named_parameters():
        if p.dim() < 2 or id(p) in embeddings or "lora_" in name:
            continue
        n += p.numel() * (2 if getattr(p, "quant_state", None) is not None else 1)  # 4-bit packs 2 per byte
        trained |= p.requires_grad
    if getattr(config, "tie_word_embeddings", False):
        n += base.get_input_embeddings().weight.numel()  # the tied LM head is still a matmul
    layers = getattr(config, "num_hidden_layers", 0)
    heads = getattr(config, "num_attention_heads", 0)
    head_dim = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else 0)
    return FlopsModel(per_token=(6 if trained else 4) * n, per_square=6 * layers * heads * head_dim)


def peak_flops() -> float | None:
    """The bf16 peak of the GPU in use, or None when unknown (CPU, unlisted GPU)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16.items() if key in name), None)


def peak_memory_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None
