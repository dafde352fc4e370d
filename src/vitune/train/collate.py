"""Batches: a list of dataset items -> the tensors one forward pass takes.

`PadCollator` pads rows to the longest of the batch (packing off). `PackedCollator` lays
the rows of a micro-batch of bins end to end in ONE row with no padding at all: position
ids restart at every row and `cu_seq_lens_*` mark the row boundaries, which is the layout
flash-attention's varlen kernels and vitune's row-wise SDPA (vitune.models.attention) take.
"""

from __future__ import annotations

import torch
from transformers import DataCollatorWithFlattening

from vitune.data.tokenize import IGNORE


def items(rows) -> list[dict]:
    """Tokenised rows (dataclasses) -> the dicts the collators take."""
    return [{k: v for k, v in vars(r).items() if k != "truncated"} for r in rows]


class PadCollator:
    """Pads a list of {input_ids, labels} rows to the longest row of the batch.

    Right padding with the tokenizer's pad id, labels padded with -100, and an attention
    mask, so padded positions neither attend nor count in the loss.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.multiple = pad_to_multiple_of

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(r["input_ids"]) for r in rows)
        if self.multiple:
            longest = -(-longest // self.multiple) * self.multiple
        ids = torch.full((len(rows), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), longest), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[i, :n] = torch.as_tensor(row["input_ids"])
            labels[i, :n] = torch.as_tensor(row["labels"])
            mask[i, :n] = 1
        # Training keeps no KV cache (transformers would build one for every forward otherwise).
        return {"input_ids": ids, "labels": labels, "attention_mask": mask, "use_cache": False}


def rows_of_bins(bins: list[dict]) -> list[dict]:
    """Packed bins {input_ids, labels, seq_lengths} -> their rows {input_ids, labels}, in order."""
    rows = []
    for b in bins:
        start = 0
        for n in b["seq_lengths"]:
            rows.append({"input_ids": b["input_ids"][start:start + n], "labels": b["labels"][start:start + n]})
            start += n
    return rows


class PackedCollator:
    """A micro-batch of bins {input_ids, labels, seq_lengths} -> one padding-free row.

    transformers' `DataCollatorWithFlattening` does the flattening: position ids restart
    at 0 for every row, `cu_seq_lens_q/k` and `max_length_q/k` give the boundaries, and
    the first label of every row is -100, so no row's first token is ever predicted from
    the row before it.

    With `trim_lm_head` (default) it also passes `logits_to_keep` = the positions whose
    next token is trained, and `shift_labels` = those next tokens: the LM head and the
    cross-entropy then run only where there is a loss (prompt turns carry none), which
    saves up to a quarter of a small model's FLOPs and the memory of the full logits. The
    loss is the same; Trainer counts `shift_labels` for `num_items_in_batch`. transformers'
    causal LMs and Liger's fused linear cross-entropy forward both take these two kwargs.
    """

    def __init__(self, trim_lm_head: bool = True):
        self.flatten = DataCollatorWithFlattening(return_flash_attn_kwargs=True, separator_id=IGNORE)
        self.trim_lm_head = trim_lm_head

    def __call__(self, bins: list[dict]) -> dict:
        batch = self.flatten(rows_of_bins(bins))
        # No KV cache: besides being useless in training, one would turn off transformers'
        # detection of packed rows from the position ids (used by eager and flex_attention).
        batch["use_cache"] = False
        if self.trim_lm_head:
            labels = batch["labels"]
            shifted = torch.full_like(labels, IGNORE)
            shifted[:, :-1] = labels[:, 1:]
            keep = (shifted[0] != IGNORE).nonzero().squeeze(1)
            if len(keep):  # a micro-batch without any trained token keeps the usual path
                batch["logits_to_keep"] = keep
                batch["shift_labels"] = shifted[:, keep]
        return batch
