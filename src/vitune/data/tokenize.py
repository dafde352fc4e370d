"""Conversations -> token ids and labels, with the loss mask taken from the rendering itself.

The template gives the rendered text and the character spans the model learns; one batched
call of the fast tokenizer gives each token's character offsets; a token carries a label
when it overlaps a trained span. No token ids are guessed, so the mask is right for any
template and any tokenizer, and re-tokenising the rendered text gives the same ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from vitune.data.records import Conversation
from vitune.data.templates import Template

IGNORE = -100


@dataclass
class TokenizedRow:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


def trained_turns(conv: Conversation, train_on_prompt: bool, mask_history: bool) -> list[bool]:
    """Which messages carry labels: assistant turns (or every turn with train_on_prompt)."""
    last_assistant = max((i for i, m in enumerate(conv.messages) if m.role == "assistant"), default=-1)
    flags = []
    for i, msg in enumerate(conv.messages):
        if msg.train is not None:
            flags.append(msg.train and (msg.role == "assistant" or train_on_prompt))
        elif msg.role == "assistant":
            flags.append(not mask_history or i == last_assistant)
        else:
            flags.append(train_on_prompt)
    return flags


def label_tokens(offsets: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """Boolean per token: does its character range overlap a trained span?

    Overlap, not containment: a token that straddles a span's edge (Mistral's "[/INST]" + an
    answer starting "(" gives the token "](", Qwen2.5's "assistant\\n" + an answer starting
    "\\n" gives "\\n\\n") is trained, so no character of an answer or of its end-of-turn marker
    goes unlearned. Offsets that differ between tokenizers stay inside this rule: SentencePiece's
    "▁word" covers its space (part of the answer in templates that start it with one), a "▁"
    prepended after a special token shares the offsets of the next character, and whitespace
    trimmed from byte-level offsets leaves an empty range at the whitespace's end.
    """
    trained = np.zeros(len(offsets), dtype=bool)
    if len(offsets) == 0:
        return trained
    starts, ends = offsets[:, 0], offsets[:, 1]
    for a, b in spans:
        trained |= (ends > a) & (starts < b)
    return trained


def tokenize_conversations(
    convs: list[Conversation],
    tokenizer,
    template: Template,
    *,
    train_on_prompt: bool = False,
    mask_history: bool = False,
) -> list[TokenizedRow]:
    """Tokenize conversations in one batched call. Prompt turns are rendered by the template
    with `train_on_prompt` handled as one span over the whole text."""
    if not convs:
        return []
    texts, spans = [], []
    for conv in convs:
        rendered = template.render(conv, trained_turns(conv, False, mask_history))
        texts.append(rendered.text)
        spans.append([(0, len(rendered.text))] if train_on_prompt else rendered.spans)
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    rows = []
    for ids, offsets, row_spans in zip(enc["input_ids"], enc["offset_mapping"], spans):
        mask = label_tokens(np.asarray(offsets, dtype=np.int64).reshape(-1, 2), row_spans)
        ids_arr = np.asarray(ids, dtype=np.int64)
        labels = np.where(mask, ids_arr, IGNORE)
        rows.append(TokenizedRow(ids_arr.tolist(), labels.tolist()))
    return rows


def fit_length(row: TokenizedRow, max_length: int, overflow: str) -> Optional[TokenizedRow]:
    """Apply max_length: None when the row must be dropped, else the row (maybe truncated)."""
    if len(row.input_ids) <= max_length:
        return row
    if overflow == "drop":
        return None
    return TokenizedRow(row.input_ids[:max_length], row.labels[:max_length], truncated=True)
