"""`vitune data inspect`: what the model will see — rendered rows with the trained tokens
highlighted and token boundaries visible, plus the counts a user needs to trust the data."""

from __future__ import annotations

import numpy as np
from rich.text import Text

from vitune.data.packing import pack_rows, packing_efficiency
from vitune.data.pipeline import DataReport
from vitune.data.tokenize import IGNORE, TokenizedRow

# alternating backgrounds show where one token ends and the next begins
PROMPT_STYLES = ("grey50 on grey15", "grey50 on grey23")
TRAINED_STYLES = ("bold green on grey15", "bold green on grey23")


def sequences_of(rows: list) -> list[TokenizedRow]:
    """The token sequences of a stage's rows: SFT rows themselves, both answers of a preference pair."""
    out = []
    for row in rows:
        if hasattr(row, "sequences"):
            out += row.sequences
        elif hasattr(row, "input_ids"):
            out.append(row)
    return out


def length_percentiles(rows: list) -> dict[str, int]:
    rows = sequences_of(rows)
    if not rows:
        return {}
    lengths = np.array([len(r.input_ids) for r in rows])
    out = {f"p{q}": int(np.percentile(lengths, q, method="nearest")) for q in (50, 90, 99)}
    out["min"], out["max"] = int(lengths.min()), int(lengths.max())
    return out


def statistics(report: DataReport, rows: list[TokenizedRow], eval_rows: list[TokenizedRow],
               packed_length: int | None = None) -> dict:
    """The JSON of `vitune data inspect --json`. With `packed_length` (data.packing on), also the
    share of token slots the training rows fill when packed into bins of that many tokens."""
    stats = report.summary()
    stats["train_rows"] = len(rows)
    stats["eval_rows"] = len(eval_rows)
    stats["length_percentiles"] = length_percentiles(rows)
    sequences = [r for r in rows if isinstance(r, TokenizedRow)]
    stats["packing_efficiency"] = (round(packing_efficiency(pack_rows(sequences, packed_length), packed_length), 4)
                                   if packed_length and sequences and len(sequences) == len(rows) else None)
    stats["first_rejections"] = [r.line() for r in report.rejections[:5]]
    return stats


def token_pieces(tokenizer, row: TokenizedRow) -> list[tuple[str, bool]]:
    """(text, trained) per token, text cut from the decoded row by the tokenizer's offsets.

    Decoding token by token would break multi-byte Vietnamese letters that byte-level BPE
    splits; offsets into the decoded text keep every letter whole (a letter shared by two
    tokens is shown with the first).
    """
    text = tokenizer.decode(row.input_ids)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if enc["input_ids"] != row.input_ids:  # cannot map exactly: fall back to per-token decoding
        return [(tokenizer.decode([i]), lab != IGNORE) for i, lab in zip(row.input_ids, row.labels)]
    pieces, seen = [], 0
    for (start, end), label in zip(enc["offset_mapping"], row.labels):
        start = max(start, seen)
        pieces.append((text[start:end] if end > start else "", label != IGNORE))
        seen = max(seen, end)
    return pieces


def render_row(tokenizer, row: TokenizedRow) -> Text:
    out = Text()
    for n, (piece, trained) in enumerate(token_pieces(tokenizer, row)):
        styles = TRAINED_STYLES if trained else PROMPT_STYLES
        out.append(piece.replace("\n", "↵\n"), style=styles[n % 2])
    return out
