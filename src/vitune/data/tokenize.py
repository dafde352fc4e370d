"""Conversations -> token ids and labels, with the loss mask taken from the rendering itself.

The template gives the rendered text and the character spans the model learns; the tokenizer
gives each token's place in that text (character offsets from `tokenizers`, or byte lengths
from tiktoken for byte-level BPE, see `byte_bpe`); a token carries a label when it overlaps a
trained span. No token ids are guessed, so the mask is right for any template and any
tokenizer, and re-tokenising the rendered text gives the same ids.
"""

from __future__ import annotations

import logging
import unicodedata
from dataclasses import dataclass
from typing import Optional

import numpy as np

from vitune.data import byte_bpe
from vitune.data.records import Conversation
from vitune.data.templates import Template, TemplateRefused

IGNORE = -100
log = logging.getLogger(__name__)


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


def _span_tokens(enc, a: int, b: int, n: int) -> Optional[tuple[int, int]]:
    """The token range [i, j) that `label_tokens` would mark for the span [a, b), found from
    its two edges instead of every token's offsets.

    Offsets grow along the text, so the overlapping tokens are contiguous: take the token of
    the first and last covered character of the span, then widen over neighbours that still
    overlap (tokens sharing a character's range, empty ranges at trimmed whitespace).
    None when no character of the span is covered by a token.
    """
    first = next((t for c in range(a, b) if (t := enc.char_to_token(c)) is not None), None)
    if first is None:
        return None
    last = next(t for c in range(b - 1, a - 1, -1) if (t := enc.char_to_token(c)) is not None)
    while first > 0 and enc.token_to_chars(first - 1)[1] > a:
        first -= 1
    while last + 1 < n and enc.token_to_chars(last + 1)[0] < b:
        last += 1
    return first, last + 1


def tokenize_conversations(
    convs: list[Conversation],
    tokenizer,
    template: Template,
    *,
    train_on_prompt: bool = False,
    mask_history: bool = False,
    keep_refusals: bool = False,
) -> list[TokenizedRow]:
    """Render conversations and tokenize them in one batch, labels from the rendered spans.

    `train_on_prompt` is one span over the whole text. Byte-level BPE tokenizers run on
    tiktoken where it gives the same ids (see `byte_bpe`); the others, and rows tiktoken
    cannot take, on the Rust `tokenizers` backend called directly (same ids as
    `tokenizer(text, add_special_tokens=False)`).

    A conversation the template refuses raises `TemplateRefused`; with `keep_refusals` the
    refusal takes the row's place in the list instead, so the caller can count it.
    """
    if not convs:
        return []
    texts, spans, refused = [], [], {}
    for k, conv in enumerate(convs):
        try:
            rendered = template.render(conv, trained_turns(conv, False, mask_history))
        except TemplateRefused as exc:
            if not keep_refusals:
                raise
            refused[k] = exc
            continue
        texts.append(rendered.text)
        spans.append([(0, len(rendered.text))] if train_on_prompt else rendered.spans)
    rows = _tokenize_texts(tokenizer, texts, spans)
    if refused:
        done = iter(rows)
        rows = [refused[k] if k in refused else next(done) for k in range(len(convs))]
    return rows


def _tokenize_texts(tokenizer, texts: list[str], spans: list[list[tuple[int, int]]]) -> list[TokenizedRow]:
    if not texts:
        return []
    encoder = byte_bpe.encoder_for(tokenizer)
    if encoder is not None:
        rows = _with_tiktoken(encoder, tokenizer, texts, spans)
        if rows is not None:
            return rows
    return _with_tokenizers(tokenizer, texts, spans)


def _with_tokenizers(tokenizer, texts: list[str], spans: list[list[tuple[int, int]]]) -> list[TokenizedRow]:
    encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    rows = []
    for enc, row_spans in zip(encodings, spans):
        ids = enc.ids
        labels = [IGNORE] * len(ids)
        for a, b in row_spans:
            found = _span_tokens(enc, a, b, len(ids)) if b > a else None
            if found is None:
                # no token covers a character of the span: fall back to the full offsets rule
                mask = label_tokens(np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2), [(a, b)])
                for k in np.flatnonzero(mask):
                    labels[k] = ids[k]
                continue
            i, j = found
            labels[i:j] = ids[i:j]
        rows.append(TokenizedRow(ids, labels))
    return rows


# rows of a batch encoded by both engines and compared (at least the first one)
CROSS_CHECKED_ROWS = 200


def _with_tiktoken(encoder, tokenizer, texts: list[str], spans: list[list[tuple[int, int]]]) -> Optional[list[TokenizedRow]]:
    """Rows from tiktoken, or None (after a notice) when it cannot stand in for `tokenizers`.

    Rows it cannot take (not NFC for a tokenizer that composes text) go through `tokenizers`.
    """
    own = [not encoder.nfc or unicodedata.is_normalized("NFC", text) for text in texts]
    try:
        return _tiktoken_rows(encoder, tokenizer, texts, spans, own)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # a Rust panic in tiktoken arrives as pyo3's PanicException (a BaseException)
        return _fall_back(tokenizer, f"tiktoken failed: {type(exc).__name__}: {exc}")


def _tiktoken_rows(encoder, tokenizer, texts, spans, own: list[bool]) -> Optional[list[TokenizedRow]]:
    ids_of = encoder.encode_iter([text for text, ok in zip(texts, own) if ok])
    others = iter(_with_tokenizers(tokenizer, [t for t, ok in zip(texts, own) if not ok],
                                   [s for s, ok in zip(spans, own) if not ok]))
    rows = []
    for text, row_spans, ok in zip(texts, spans, own):
        if not ok:
            rows.append(next(others))
            continue
        ids = next(ids_of)
        ends = encoder.cumulative_ends(ids)
        ascii_text = text.isascii()
        if (ends[-1] if ends else 0) != (len(text) if ascii_text else len(text.encode("utf-8"))):
            return _fall_back(tokenizer, f"tokens do not cover the text of row {len(rows) + 1}")
        labels = [IGNORE] * len(ids)
        for a, b in row_spans:
            if b > a:
                if not ascii_text:  # character positions -> byte positions
                    a, b = len(text[:a].encode("utf-8")), len(text[:b].encode("utf-8"))
                i, j = encoder.token_range(ids, ends, a, b)
                labels[i:j] = ids[i:j]
        rows.append(TokenizedRow(ids, labels))
    mine = [k for k, ok in enumerate(own) if ok]
    sample = mine[:: max(1, len(mine) // CROSS_CHECKED_ROWS)]
    reference = _with_tokenizers(tokenizer, [texts[k] for k in sample], [spans[k] for k in sample])
    for k, ref in zip(sample, reference):
        if rows[k] != ref:
            return _fall_back(tokenizer, f"row {k + 1} differs")
    return rows


def _fall_back(tokenizer, what: str) -> None:
    byte_bpe.disable(tokenizer)
    log.warning("notice: tiktoken cannot stand in for this tokenizer (%s); "
                "tokenizing with tokenizers, which is slower", what)
    return None


def fit_length(row: TokenizedRow, max_length: int, overflow: str) -> Optional[TokenizedRow]:
    """Apply max_length: None when the row must be dropped, else the row (maybe truncated)."""
    if len(row.input_ids) <= max_length:
        return row
    if overflow == "drop":
        return None
    return TokenizedRow(row.input_ids[:max_length], row.labels[:max_length], truncated=True)
