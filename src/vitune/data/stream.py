"""Streaming continued-pretraining data (data.streaming: true): a corpus larger than memory, read,
normalised, tokenised and packed on the fly.

`TextStream` is a torch IterableDataset over the process's own share of the corpus: of every
training file, process r of W reads the bytes [r*size/W, (r+1)*size/W) -- a row belongs to the
share holding its first byte (vitune.data.sources.read_range) -- so the processes read disjoint
shares that together are the whole corpus, and none reads another's. Files are read in the
order data.train lists them, rows in file order (no shuffle: a stream cannot be shuffled
without reading it); at the end of its share a process starts again (the next epoch).

Each document is tokenised as vitune.data.pretrain tokenises it (ending with one end-of-document
token) and laid into bins of exactly data.max_length tokens: a document fills the rest of the
current bin and goes on in the next one (counted as split), so no token is padding and none is
dropped; every piece is a row of its own in the bin (`seq_lengths`), so attention stays within it.
Memory holds one document's tokens and one bin, whatever the corpus size.

Every bin carries the stream position after it: (epoch, file, byte offset of the document being
read, tokens of it already used) and the counts so far. The trainer keeps the position of the
last bin it trained on and saves it in each checkpoint (stream-<rank>.json); a resumed run
seeks to that position and goes on from the next token, without reading the stream again.

Supported here: local .jsonl (a text column) and .txt files. Other sources (.parquet, .csv, Hub
datasets) are refused for streaming with one line: convert them to .jsonl, or stream off.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch

from vitune.config import DataConfig, DatasetSpec
from vitune.data.formats import detect_format
from vitune.data.pipeline import DataReport
from vitune.data.pretrain import document_end_id, document_ids, normalised, text_of
from vitune.data.records import Rejection
from vitune.data.sources import RANGE_SUFFIXES, read_range, resolve_files
from vitune.errors import ConfigError, DataError

POSITION_FILE = "stream-{rank}.json"


@dataclass
class StreamPosition:
    """Where a process's stream stands, and what it has read so far (carried over a resume)."""

    epoch: int = 0
    file: int = 0  # index into the stream's files
    offset: int | None = None  # byte offset of the document being read; None = the start of the share
    skip: int = 0  # tokens of that document already laid into bins
    documents: int = 0  # documents finished (every token used), this epoch and before
    tokens: int = 0  # tokens laid into bins
    split: int = 0  # documents that did not fit in the rest of a bin and went on in the next
    rejected: int = 0  # rows that are not usable text (skipped with data.on_error: skip)

    def to_json(self) -> dict:
        return asdict(self)


def stream_files(data: DataConfig) -> list[tuple[Path, DatasetSpec]]:
    """The files data.train streams from, checked: local .jsonl / .txt only, each read once."""
    files = []
    for spec in data.train:
        if spec.weight != 1.0 or spec.max_samples is not None:
            raise ConfigError(f"data.train {spec.path}: weight and max_samples are not used with data.streaming "
                              "(a stream is read in order, once per epoch); remove them or set data.streaming: false")
        found = resolve_files(spec.path)
        if not found:
            raise DataError(f"{spec.path}: data.streaming reads local .jsonl and .txt files; this is not one (a Hub "
                            "dataset or a missing file); download or convert it to .jsonl, or set data.streaming: false")
        for file in found:
            if file.suffix not in RANGE_SUFFIXES:
                raise DataError(f"{file}: data.streaming reads .jsonl and .txt files, not {file.suffix}; convert it "
                                "to .jsonl (one {\"text\": ...} per line) or set data.streaming: false")
            files.append((file, spec))
    return files


class TextStream(torch.utils.data.IterableDataset):
    """Bins of exactly max_length tokens from this process's share of the corpus, forever."""

    def __init__(self, data: DataConfig, tokenizer, rank: int = 0, world: int = 1,
                 position: StreamPosition | None = None):
        self.data = data
        self.tokenizer = tokenizer
        self.files = stream_files(data)
        self.rank, self.world = rank, world
        self.max_length = data.max_length
        self.start = position or StreamPosition()
        document_end_id(tokenizer)  # a tokenizer without one fails here, before training

    def share(self, index: int) -> tuple[int, int]:
        """Byte range [start, end) of file `index` that this process reads."""
        size = self.files[index][0].stat().st_size
        return size * self.rank // self.world, size * (self.rank + 1) // self.world

    def documents(self, position: StreamPosition) -> Iterator[tuple[int, int, list[int] | None]]:
        """(file index, byte offset, token ids or None for an unusable row) of every row from
        `position` on, epoch after epoch; the first is the document the position points into."""
        self.epoch, index, offset = position.epoch, position.file, position.offset
        while True:
            whole_pass, found = index == 0 and offset is None, False
            for i in range(index, len(self.files)):
                file, spec = self.files[i]
                start, end = self.share(i)
                for raw in read_range(file, start if offset is None else offset, end):
                    ids = self._tokens(raw, spec)
                    found = found or ids is not None
                    yield i, raw.offset, ids
                offset = None
            if whole_pass and not found:
                raise DataError(f"process {self.rank} of {self.world} has no usable text in its share of the corpus "
                                f"({', '.join(str(f) for f, _ in self.files)}); give more text or use fewer processes")
            self.epoch, index = self.epoch + 1, 0

    def _tokens(self, raw, spec: DatasetSpec) -> list[int] | None:
        """A raw row -> its document's token ids; None for a row that is not usable text (with
        data.on_error: raise, one line naming it)."""
        report = DataReport()
        text = None
        if raw.row is None:
            report.rejections.append(Rejection(raw.source, *raw.problem))
        else:
            row_format = spec.format if spec.format != "auto" else detect_format(raw.row, spec.columns)
            if row_format is None:
                report.rejections.append(Rejection(raw.source, "unknown format", "the row has no text column"))
            else:
                text = text_of(raw, row_format, spec, report)
        if report.rejections:
            if self.data.on_error == "raise":
                raise DataError(f"bad row in the stream: {report.rejections[0].line()} -- fix it, or set "
                                "data.on_error: skip to train on the rest")
            return None
        return document_ids(self.tokenizer, [normalised(text, self.data, report).text])[0]

    def __iter__(self) -> Iterator[dict]:
        pos = StreamPosition(**self.start.to_json())
        ids: list[int] = []
        seq_lengths: list[int] = []
        resumed = True  # the first document is the one the start position points into
        for index, offset, doc in self.documents(pos):
            if doc is None:
                pos.rejected += 1
                continue
            used = pos.skip if resumed else 0
            pieces = int(used > 0)  # a resumed document already had a piece in an earlier bin
            resumed = False
            while used < len(doc):
                take = min(self.max_length - len(ids), len(doc) - used)
                ids += doc[used:used + take]
                seq_lengths.append(take)
                used += take
                pieces += 1
                pos.tokens += take
                if used == len(doc):
                    pos.documents += 1
                    pos.split += pieces > 1
                if len(ids) == self.max_length:
                    # after this bin: `used` tokens of this document are taken (all of them = go on after it)
                    pos.epoch, pos.file, pos.offset, pos.skip = self.epoch, index, offset, used
                    yield {"input_ids": ids, "labels": list(ids), "seq_lengths": seq_lengths,
                           "stream_position": pos.to_json()}
                    ids, seq_lengths = [], []


def read_position(checkpoint: Path | None, rank: int) -> StreamPosition | None:
    """The stream position a checkpoint saved for this process (None: start from the beginning)."""
    if checkpoint is None:
        return None
    path = Path(checkpoint) / POSITION_FILE.format(rank=rank)
    if not path.is_file():
        raise DataError(f"{checkpoint} has no {path.name}: it was not saved by a streaming run of this process "
                        "count; resume with the same data.streaming and number of processes, or start afresh")
    return StreamPosition(**json.loads(path.read_text(encoding="utf-8")))
