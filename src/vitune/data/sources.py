"""Reading rows from files, folders, globs and Hub datasets, each row labelled with where it came from.

Plain-text files (`.txt`, for continued pretraining) are documents separated by blank lines: each
run of non-blank lines is one document, read as a row {"text": ...} (its lines joined with
newlines). A file without blank lines is one document (split into chunks later if it is long).
`.jsonl` and `.txt` files can also be read from a byte range (`start`, `end`): a row belongs to
the range holding its first byte, so ranges that tile a file read every row exactly once -- how
streaming gives each process its own share without reading the others'.
"""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from vitune.errors import DataError

LOCAL_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".arrow", ".txt")
RANGE_SUFFIXES = (".jsonl", ".txt")  # files read from a byte range (data.streaming shards)


@dataclass
class RawRow:
    source: str  # "data/x.jsonl:12" or "data/x.parquet row 12"
    row: Optional[dict]  # None when the row itself could not be read
    problem: Optional[tuple[str, str]] = None  # (reason, detail) for an unreadable row
    offset: Optional[int] = None  # byte offset of the row in its file (.jsonl, .txt)
    end: Optional[int] = None  # byte offset just after the row (.jsonl, .txt)


def resolve_files(path: str) -> list[Path]:
    """A file, a folder (its data files) or a glob -> the files to read, sorted."""
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix in LOCAL_SUFFIXES and f.is_file())
        # a folder of data files keeps its notes (README.txt) out; a folder of only .txt is a text corpus
        if any(f.suffix != ".txt" for f in files):
            files = [f for f in files if f.suffix != ".txt"]
        if not files:
            raise DataError(f"{path}: folder has no data files ({', '.join(LOCAL_SUFFIXES)})")
        return files
    if any(ch in path for ch in "*?["):
        files = sorted(Path(f) for f in glob.glob(path, recursive=True) if Path(f).suffix in LOCAL_SUFFIXES)
        if not files:
            raise DataError(f"{path}: no data files match this pattern")
        return files
    return []


def looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or Path(path).suffix in LOCAL_SUFFIXES or Path(path).exists()


def read_rows(path: str, split: str = "train") -> Iterator[RawRow]:
    """Every row of a dataset path, in file order."""
    files = resolve_files(path)
    if not files:
        if looks_local(path):
            raise DataError(f"dataset file not found: {path} (check data.train[].path; paths are relative to where you run vitune)")
        yield from _read_hub(path, split)
        return
    for file in files:
        if file.suffix == ".jsonl":
            yield from _read_jsonl(file)
        elif file.suffix == ".txt":
            yield from _read_txt(file)
        elif file.suffix == ".json":
            yield from _read_json(file)
        else:
            yield from _read_with_datasets(file)


def read_range(file: Path, start: int = 0, end: Optional[int] = None) -> Iterator[RawRow]:
    """The rows of a .jsonl or .txt file whose first byte lies in [start, end)."""
    return _read_jsonl(file, start, end) if file.suffix == ".jsonl" else _read_txt(file, start, end)


def _lines(fh, start: int, end: Optional[int]) -> Iterator[tuple[int, bytes]]:
    """(offset, line) for every line of an open binary file that starts in [start, end)."""
    if start > 0:
        fh.seek(start - 1)
        fh.readline()  # the rest of the line holding byte start-1 belongs to the range before
    else:
        fh.seek(0)
    while True:
        offset = fh.tell()
        if end is not None and offset >= end:
            return
        line = fh.readline()
        if not line:
            return
        yield offset, line


def _read_jsonl(file: Path, start: int = 0, end: Optional[int] = None) -> Iterator[RawRow]:
    with open(file, "rb") as fh:
        for number, (offset, raw) in enumerate(_lines(fh, start, end), start=1):
            # line numbers are known when reading from the start; a range names byte offsets
            source = f"{file}:{number}" if start == 0 else f"{file} byte {offset}"
            try:
                # utf-8-sig: a byte order mark (Notepad writes one) starts the file, not the row
                text = raw.decode("utf-8-sig" if offset == 0 else "utf-8")
            except UnicodeDecodeError as exc:
                yield RawRow(source, None, ("undecodable bytes", f"not UTF-8 at byte {offset + exc.start} of the file; "
                                            "save the file as UTF-8"), offset, offset + len(raw))
                continue
            if not text.strip():
                continue
            span = (offset, offset + len(raw))
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                yield RawRow(source, None, ("invalid JSON", f"invalid JSON ({exc.msg} at column {exc.colno})"), *span)
                continue
            if not isinstance(row, dict):
                yield RawRow(source, None, ("wrong type", f"a row must be a JSON object, got {type(row).__name__}"), *span)
                continue
            yield RawRow(source, row, None, *span)


def _blank_line_before(fh, offset: int) -> bool:
    """Whether the line that ends just before `offset` (a line start) is blank, or there is none."""
    if offset == 0:
        return True
    back = offset - 1  # the newline ending the previous line
    while back > 0:
        step = min(back, 4096)
        fh.seek(back - step)
        chunk = fh.read(step)
        at = chunk.rfind(b"\n")
        if at >= 0:
            back = back - step + at + 1
            break
        back -= step
    fh.seek(back)
    return not fh.read(offset - back).strip()


def _read_txt(file: Path, start: int = 0, end: Optional[int] = None) -> Iterator[RawRow]:
    """Documents separated by blank lines; a document belongs to the range holding its first byte."""
    with open(file, "rb") as fh:
        lines = _lines(fh, start, None)  # the last document of the range may run past `end`
        first = True
        number = 0
        doc: list[str] = []
        doc_start = doc_end = 0
        skipping = False  # inside a document that began before `start`
        for offset, raw in lines:
            number += 1
            if first:
                first = False
                here = fh.tell()
                skipping = not _blank_line_before(fh, offset)
                fh.seek(here)
            try:
                text = raw.decode("utf-8-sig" if offset == 0 else "utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{file}: not UTF-8 at byte {offset + exc.start}; save the file as UTF-8") from None
            if not text.strip():
                if doc:
                    yield _document(file, start, doc_line, doc, doc_start, doc_end)
                    doc = []
                skipping = False
                if end is not None and offset >= end:
                    return
                continue
            if skipping:
                continue
            if not doc:
                if end is not None and offset >= end:
                    return
                doc_start, doc_line = offset, number
            doc.append(text.rstrip("\r\n"))
            doc_end = offset + len(raw)
        if doc:
            yield _document(file, start, doc_line, doc, doc_start, doc_end)


def _document(file: Path, start: int, line: int, lines: list[str], offset: int, end: int) -> RawRow:
    source = f"{file}:{line}" if start == 0 else f"{file} byte {offset}"
    return RawRow(source, {"text": "\n".join(lines)}, None, offset, end)


def _read_json(file: Path) -> Iterator[RawRow]:
    try:
        data = json.loads(file.read_bytes().decode("utf-8-sig"))  # a byte order mark is not JSON
    except UnicodeDecodeError as exc:
        raise DataError(f"{file}: not UTF-8 at byte {exc.start}; save the file as UTF-8") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{file}: invalid JSON at line {exc.lineno} column {exc.colno} ({exc.msg}); "
                        "for one object per line name the file .jsonl") from None
    if isinstance(data, dict):
        # {"train": [...]} or {"data": [...]}: one list of rows inside
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{file}: expected a JSON list of rows (or one object holding one list)")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"{file}: expected a JSON list of rows, got {type(data).__name__}")
    for index, row in enumerate(data, start=1):
        source = f"{file} row {index}"
        if not isinstance(row, dict):
            yield RawRow(source, None, ("wrong type", f"a row must be a JSON object, got {type(row).__name__}"))
        else:
            yield RawRow(source, row)


def _quiet_datasets():
    """datasets, imported, with its progress bars and log lines off: the terminal stays for
    vitune's own output, and a bad file is one error line."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    return datasets


def _read_with_datasets(file: Path) -> Iterator[RawRow]:
    datasets = _quiet_datasets()

    builder = {".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}[file.suffix]
    try:
        ds = datasets.load_dataset(builder, data_files=str(file), split="train")
    except Exception as exc:  # datasets raises many kinds; the user needs the file and the reason
        raise DataError(f"{file}: cannot read as {builder} ({str(exc).splitlines()[0]})") from None
    for index, row in enumerate(ds, start=1):
        yield RawRow(f"{file} row {index}", dict(row))


def _read_hub(name: str, split: str) -> Iterator[RawRow]:
    datasets = _quiet_datasets()

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:
        raise DataError(
            f"dataset {name!r}: not a local file and could not be loaded from the Hub "
            f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
        ) from None
    for index, row in enumerate(ds, start=1):
        yield RawRow(f"{name}[{split}] row {index}", dict(row))
