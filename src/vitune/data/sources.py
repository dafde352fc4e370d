"""Reading rows from files, folders, globs and Hub datasets, each row labelled with where it came from."""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from vitune.errors import DataError

LOCAL_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".arrow")


@dataclass
class RawRow:
    source: str  # "data/x.jsonl:12" or "data/x.parquet row 12"
    row: Optional[dict]  # None when the row itself could not be read
    problem: Optional[tuple[str, str]] = None  # (reason, detail) for an unreadable row


def resolve_files(path: str) -> list[Path]:
    """A file, a folder (its data files) or a glob -> the files to read, sorted."""
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix in LOCAL_SUFFIXES and f.is_file())
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
        elif file.suffix == ".json":
            yield from _read_json(file)
        else:
            yield from _read_with_datasets(file)


def _read_jsonl(file: Path) -> Iterator[RawRow]:
    with open(file, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            source = f"{file}:{number}"
            try:
                # utf-8-sig: a byte order mark (Notepad writes one) starts the file, not the row
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                yield RawRow(source, None, ("undecodable bytes", f"not UTF-8 at byte {exc.start} of the line; save the file as UTF-8"))
                continue
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                yield RawRow(source, None, ("invalid JSON", f"invalid JSON ({exc.msg} at column {exc.colno})"))
                continue
            if not isinstance(row, dict):
                yield RawRow(source, None, ("wrong type", f"a row must be a JSON object, got {type(row).__name__}"))
                continue
            yield RawRow(source, row)


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
