"""Attention for packed batches without flash-attn: one causal SDPA call per row.

A packed micro-batch is one long row holding many conversations (vitune.train.collate).
transformers' own answer for SDPA is a dense mask over the whole packed row built from the
position ids: correct, but it computes every (query, key) pair of the row and throws most
away -- (sum of lengths)^2 work instead of the sum of lengths^2, which is what made TRL's
packing slower than padding on the CPU. flash-attn's varlen kernel does the right thing on
NVIDIA GPUs when installed; everywhere else this function does it with plain PyTorch: it
cuts the row at `cu_seq_lens_q` and runs causal SDPA (flash kernel on CPU and GPU) per row.

It is registered with transformers' AttentionInterface under PACKED_SDPA and switched on
only while vitune trains on packed batches (`packed_attention`); the model is given back
with SDPA, so a saved model never names it and inference never depends on it.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import flash_attention_mask

PACKED_SDPA = "vitune_packed_sdpa"

# The last row lengths seen: every layer of one forward gets the same `cu_seq_lens_q`
# tensor, and reading it back from a GPU waits for the device, so read it once.
_lengths: list = [None, None]


def _row_lengths(cu_seq_lens: torch.Tensor) -> list[int]:
    if _lengths[0] is not cu_seq_lens:
        _lengths[0], _lengths[1] = cu_seq_lens, cu_seq_lens.diff().tolist()
    return _lengths[1]


def packed_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                          cu_seq_lens_q=None, **kwargs):
    """query [1, heads, tokens, dim], key/value [1, kv_heads, tokens, dim] -> ([1, tokens, heads, dim], None)."""
    if cu_seq_lens_q is None:
        # Not a packed batch (a plain forward pass on unpadded ids): ordinary causal SDPA.
        if attention_mask is not None:
            raise NotImplementedError(
                f"{PACKED_SDPA} handles packed training batches and unpadded inputs only; "
                "call model.set_attn_implementation('sdpa') for padded batches"
            )
        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling, **kwargs)
    lengths = _row_lengths(cu_seq_lens_q)
    gqa = query.shape[1] != key.shape[1]
    p = dropout if module.training else 0.0
    window = kwargs.get("sliding_window")
    prefix = kwargs.get("vitune_prefix")  # per row: tokens at the start of the row before that it also sees
    rows = []
    # torch.split, not slicing: the backward of a split is one concatenation, while each
    # slice's backward would write its gradient into a zero tensor of the whole row.
    keys, values = key.split(lengths, dim=2), value.split(lengths, dim=2)
    for j, q in enumerate(query.split(lengths, dim=2)):
        k, v = keys[j], values[j]
        n = q.shape[2]
        if prefix and prefix[j]:
            # a preference pair's second answer: its prompt is the start of the row before
            # (vitune.train.preference); keys are [prompt; answer], causal over the answer
            shared = prefix[j]
            k, v = torch.cat([keys[j - 1][:, :, :shared], k], dim=2), torch.cat([values[j - 1][:, :, :shared], v], dim=2)
            q_pos = torch.arange(shared, shared + n, device=query.device)
            k_pos = torch.arange(shared + n, device=query.device)
            visible = k_pos[None, :] <= q_pos[:, None]
            if window:
                visible &= k_pos[None, :] > q_pos[:, None] - window
            rows.append(F.scaled_dot_product_attention(q, k, v, attn_mask=visible, dropout_p=p, scale=scaling,
                                                       enable_gqa=gqa))
        elif window and n > window:  # Mistral-style sliding window: keys within `window` of the query
            i = torch.arange(n, device=query.device)
            band = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
            rows.append(F.scaled_dot_product_attention(q, k, v, attn_mask=band, dropout_p=p, scale=scaling, enable_gqa=gqa))
        else:
            rows.append(F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, scale=scaling, enable_gqa=gqa))
    out = rows[0] if len(rows) == 1 else torch.cat(rows, dim=2)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
# flash-attention's mask rule: no mask at all unless there is padding, so no dense
# (tokens x tokens) mask is ever built for a packed row.
AttentionMaskInterface.register(PACKED_SDPA, flash_attention_mask)


@contextmanager
def unpacked_attention(model):
    """Within `packed_attention`, a block that runs the model on ordinary padded batches (an
    evaluation during training): plain SDPA, which takes the padding mask, then back."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if base.config._attn_implementation != PACKED_SDPA:
        yield
        return
    base.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        base.set_attn_implementation(PACKED_SDPA)


def supports_packing(model) -> bool:
    """Does the architecture route attention through AttentionInterface (and so take row
    boundaries)? Llama, Mistral, Qwen2 and most recent ones do; BLOOM (ALiBi) does not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, "_supports_attention_backend", False))


@contextmanager
def packed_attention(model):
    """Within the block, a model loaded with SDPA attends row by row on packed batches."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if base.config._attn_implementation != "sdpa":
        yield  # flash_attention_2 / flex_attention / eager handle packed rows themselves
        return
    base.set_attn_implementation(PACKED_SDPA)
    try:
        yield
    finally:
        base.set_attn_implementation("sdpa")
