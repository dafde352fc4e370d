"""Packing: tokenised rows -> bins of at most `max_length` tokens, rows kept whole.

`pack_rows(rows, max_length)` lays rows end to end in bins chosen by best-fit decreasing
(longest row first, each into the fullest bin it still fits), which fills bins to ~99% on
SFT length distributions. Each bin remembers its rows' lengths (`seq_lengths`); the
collator (vitune.train.collate) turns them into position ids that restart at every row and
into the row boundaries the attention uses, so no row ever sees another one.

Hand-written rather than TRL's `pack_dataset`: ours packs the whole dataset at once (TRL's
packs each 1,000-row `map` batch separately), needs no Arrow round trip for rows that are
already Python lists, and never truncates (rows were fitted to max_length before).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Sequence

from vitune.data.tokenize import TokenizedRow


@dataclass
class PackedRow:
    """One bin: its rows' ids and labels end to end, and each row's length."""

    input_ids: list[int]
    labels: list[int]
    seq_lengths: list[int]


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins whose sums are at most `capacity`.

    Every index appears exactly once. Raises ValueError for an item longer than a bin.
    """
    too_long = [n for n in lengths if n > capacity]
    if too_long:
        raise ValueError(f"a row of {max(too_long)} tokens does not fit in a bin of {capacity}")
    bins: list[list[int]] = []
    # Bins grouped by free space; `spaces` is the sorted list of distinct free spaces, so the
    # best fit (the smallest space that still holds the row) is one bisect away.
    by_space: dict[int, list[int]] = {}
    spaces: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        need = lengths[index]
        at = bisect.bisect_left(spaces, need)
        if at < len(spaces):
            space = spaces[at]
            b = by_space[space].pop()
            if not by_space[space]:
                del by_space[space]
                spaces.pop(at)
        else:
            space, b = capacity, len(bins)
            bins.append([])
        bins[b].append(index)
        left = space - need
        if left > 0:
            if left not in by_space:
                by_space[left] = []
                bisect.insort(spaces, left)
            by_space[left].append(b)
    return bins


def pack_rows(rows: Sequence[TokenizedRow], max_length: int) -> list[PackedRow]:
    """Rows -> bins of at most `max_length` tokens; each row whole and in exactly one bin."""
    packed = []
    for members in best_fit_decreasing([len(r.input_ids) for r in rows], max_length):
        ids: list[int] = []
        labels: list[int] = []
        for i in members:
            ids += rows[i].input_ids
            labels += rows[i].labels
        packed.append(PackedRow(ids, labels, [len(rows[i].input_ids) for i in members]))
    return packed


def packing_efficiency(bins: Sequence[PackedRow], max_length: int) -> float:
    """Real tokens / token slots of the bins (1.0 = every bin full)."""
    return sum(len(b.input_ids) for b in bins) / (len(bins) * max_length) if bins else 0.0
