"""GPU speed settings of a run, each decided once from the config, the model and the device:
Liger kernels, how many layers to checkpoint, TF32. On the CPU every one of them is off."""

from __future__ import annotations

import importlib.util
import math

import torch

from vitune.errors import UserError
from vitune.models.chunked_loss import CHUNK_BYTES, loss_path

# Architectures whose Liger patches vitune has checked (liger-kernel supports more).
LIGER_ARCHITECTURES = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "mixtral", "phi3"}


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def use_liger(setting, model) -> bool:
    """train.liger_kernel (auto | true | false) -> apply Liger kernels or not."""
    if setting is False:
        return False
    model_type = _base(model).config.model_type
    installed = importlib.util.find_spec("liger_kernel") is not None
    on_gpu = torch.cuda.is_available()
    if setting is True:
        if not installed:
            raise UserError("train.liger_kernel: true needs liger-kernel; install it with: pip install 'vitune[gpu]'")
        if not on_gpu:
            raise UserError("train.liger_kernel: true needs an NVIDIA GPU (Liger's kernels are Triton kernels)")
        if model_type not in LIGER_ARCHITECTURES:
            raise UserError(f"train.liger_kernel: true, but Liger does not cover {model_type}; "
                            f"supported: {', '.join(sorted(LIGER_ARCHITECTURES))}")
        return True
    return installed and on_gpu and model_type in LIGER_ARCHITECTURES


def use_tf32() -> bool | None:
    """TF32 matmuls for whatever still runs in fp32 on Ampere and newer; None = leave as is."""
    return True if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8 else None


def activation_bytes_per_token(config, dtype_bytes: int) -> tuple[float, float]:
    """(one decoder layer without checkpointing, one checkpointed layer) per token, roughly.

    16 h + 6 i values per token and layer (matmul inputs, norms, attention and SwiGLU
    intermediates, LoRA's dropped-out inputs) matches the 84 GiB measured for a Llama-3-8B
    shape at 8,192 tokens per micro-batch; a checkpointed layer keeps only its input.
    """
    h = config.hidden_size
    i = getattr(config, "intermediate_size", None) or 4 * h
    return (16 * h + 6 * i) * dtype_bytes, h * dtype_bytes


def checkpointing_plan(setting, model, tokens_per_micro_batch: int, liger: bool, full_fine_tuning: bool) -> int:
    """train.gradient_checkpointing -> 0 (off) or n: checkpoint every n-th layer (1 = all).

    auto picks the fewest checkpointed layers whose estimated peak fits in 90% of the GPU:
    recomputing costs ~30% of a step, so memory that would go unused is spent on speed.
    """
    if setting is True:
        return 1
    if setting is False or not torch.cuda.is_available():
        return 0
    base = _base(model)
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    budget = 0.9 * torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    params = list(base.parameters())
    weights = sum(p.numel() * p.element_size() for p in params)
    # grad + Adam moments + fp32 master copy of every trained weight; LoRA adapters are tiny
    trainable = 16 * sum(p.numel() for p in params) if full_fine_tuning else 0
    dtype_bytes = 2 if base.dtype in (torch.bfloat16, torch.float16) else 4
    if liger:
        logits = 0
    elif loss_path(model) == "chunked":  # one chunk of fp32 logits and its softmax (models/chunked_loss.py)
        logits = min(2 * CHUNK_BYTES, tokens_per_micro_batch * config.vocab_size * (dtype_bytes + 8))
    else:
        logits = tokens_per_micro_batch * config.vocab_size * (dtype_bytes + 8)  # + fp32 upcast and grad
    fixed = weights + trainable + logits + 2**30  # + CUDA context and allocator slack
    full, kept = activation_bytes_per_token(config, dtype_bytes)
    layers = config.num_hidden_layers

    def peak(every_n: int) -> float:
        checkpointed = 0 if every_n == 0 else math.ceil(layers / every_n)
        return fixed + tokens_per_micro_batch * ((layers - checkpointed) * full + checkpointed * kept)

    for every_n in (0, *range(layers, 1, -1)):
        if peak(every_n) <= budget:
            return every_n
    return 1
