"""A left-padded KV cache over many rows, as the hand-written decode loops use it (`vitune serve`'s
engine, infer/batching.py, and the RL rollouts, train/rollouts.py): which cache a prefill gets,
and how rows leave and columns are padded or dropped.

Rows are left-padded to a common width, so every row ends at the same cache column; an explicit
attention mask says which columns are real. Sliding-window layers (Mistral, the sliding layers of
Gemma 2/3) get a cache that keeps every key (a `DynamicCache` without the model's config): then the
model's own mask functions apply each layer's window in cache columns, which, since a row's real
tokens are contiguous at the right end, is the same window of tokens as under `generate`
(infer/batching.py's docstring has the full argument).
"""

from __future__ import annotations

from typing import Optional

import torch

# the layer kinds (transformers' `layer_types`) whose keys a left-padded cache can hold, one per column
PADDABLE = ("full_attention", "sliding_attention")


def attention_windows(model) -> list[Optional[int]]:
    """Each layer's sliding window (None: the layer sees every earlier token), as transformers lays out
    the model's cache (`get_layer_types_and_kwargs`, what `DynamicCache(config=...)` builds). Empty
    when some layer is of a kind a padded cache cannot hold (linear or chunked attention): the model
    then prefills into its own cache, which `check_paddable` refuses."""
    config = getattr(model, "config", None)
    if config is None:  # not a transformers model
        return []
    from transformers.cache_utils import get_layer_types_and_kwargs

    types, kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    if any(t not in PADDABLE for t in types):
        return []
    return [k.get("sliding_window") if t == "sliding_attention" else None for t, k in zip(types, kwargs)]


def prefill_cache(windows: list[Optional[int]], keyword: str) -> dict:
    """The forward's cache argument for a prefill: none (the model's own, all full layers), or one
    that keeps every key of every layer, sliding ones too (the module's docstring says why)."""
    if not any(w is not None for w in windows):
        return {}
    from transformers import DynamicCache

    return {keyword: DynamicCache()}


def check_paddable(cache) -> None:
    """Raise unless every layer of `cache` keeps plain keys and values that left padding cannot change."""
    from transformers.cache_utils import DynamicLayer

    # any other layer (linear-attention states, quantized keys, a sliding layer that keeps only its
    # window) cannot be left-padded: padded, it is not the same model
    kinds = sorted({type(layer).__name__ for layer in cache.layers if type(layer) is not DynamicLayer})
    if kinds:
        raise RuntimeError(f"this model's cache layers ({', '.join(kinds)}) cannot be batched by vitune serve")


def keep_rows(cache, index: torch.Tensor) -> None:
    """Keep the rows `index` (a 1-d tensor of row numbers) of every layer's keys and values, in that order."""
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[index], layer.values[index]


def drop_columns(cache, columns: int) -> None:
    """Drop the oldest `columns` columns of every layer's keys and values."""
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[:, :, columns:], layer.values[:, :, columns:]


def pad_left(cache, columns: int) -> None:
    """Add `columns` zero columns before every layer's keys and values (masked out by the caller)."""
    if columns:
        for layer in cache.layers:
            layer.keys = torch.nn.functional.pad(layer.keys, (0, 0, columns, 0))
            layer.values = torch.nn.functional.pad(layer.values, (0, 0, columns, 0))
