"""On-disk cache of prepared (tokenised) data.

The key hashes everything the prepared rows depend on: the bytes of every data file (not
its name or date), the tokenizer (its full serialised form), the chat template, the data
settings, the seed and vitune's version. A second run with the same inputs reuses the rows;
any change of those makes a new entry. Entries are written to a temporary folder and
renamed, so a crash mid-write never leaves an entry that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Optional

from vitune import __version__
from vitune.config import DataConfig, cache_home, file_sha256
from vitune.data.records import Rejection
from vitune.data.sources import resolve_files
from vitune.data.tokenize import TokenizedRow
from vitune.errors import DataError

FORMAT_VERSION = "2"  # 2: auto templates locate answers anew and may add EOS


def default_cache_dir() -> Path:
    return cache_home() / "prepared"


def cache_key(data: DataConfig, tokenizer, template, seed: int) -> str:
    h = hashlib.sha256()

    def add(label: str, value) -> None:
        h.update(f"{label}={value}\n".encode("utf-8"))

    add("format", FORMAT_VERSION)
    add("vitune", __version__)
    add("settings", json.dumps(data.model_dump(mode="json", exclude={"cache_dir", "num_proc"}), sort_keys=True))
    add("seed", seed)
    for spec in [*data.train, *(data.eval or [])]:
        files = resolve_files(spec.path)
        if files:
            for f in files:
                add("file", f"{f.name}:{file_sha256(f)}")
        else:
            add("hub", f"{spec.path}:{spec.split}")  # a Hub dataset: its name and split
    add("tokenizer", hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode("utf-8")).hexdigest())
    add("special", json.dumps({k: str(v) for k, v in tokenizer.special_tokens_map.items()}, sort_keys=True))
    add("template", f"{template.name}:{template.jinja() or ''}" if template else "none")
    return h.hexdigest()[:24]


def _save_rows(rows: list[TokenizedRow], path: Path) -> None:
    import datasets

    if not rows:
        return  # an absent folder reads back as no rows (datasets cannot reload an empty table)
    datasets.disable_progress_bars()
    datasets.Dataset.from_dict({
        "input_ids": [r.input_ids for r in rows],
        "labels": [r.labels for r in rows],
        "truncated": [r.truncated for r in rows],
    }).save_to_disk(str(path))


def _load_rows(path: Path) -> list[TokenizedRow]:
    import datasets

    if not path.exists():
        return []
    datasets.disable_progress_bars()
    ds = datasets.load_from_disk(str(path))
    columns = ds.to_dict()
    return [TokenizedRow(i, l, t) for i, l, t in zip(columns["input_ids"], columns["labels"], columns["truncated"])]


def load(entry: Path):
    """-> (train rows, eval rows, report fields) or None when there is no complete entry."""
    if not (entry / "report.json").is_file():
        return None
    report = json.loads((entry / "report.json").read_text(encoding="utf-8"))
    report["rejections"] = [Rejection(**r) for r in report["rejections"]]
    return _load_rows(entry / "train"), _load_rows(entry / "eval"), report


def save(entry: Path, train: list[TokenizedRow], evaluation: list[TokenizedRow], report: dict) -> None:
    tmp = entry.with_name(entry.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
    except (OSError, ValueError) as exc:  # a file in the way, no permission, read-only, a NUL in the name
        raise DataError(f"data.cache_dir {entry.parent}: cannot write the prepared-data cache there "
                        f"({getattr(exc, 'strerror', None) or exc}); choose another folder or set data.cache: false") from None
    _save_rows(train, tmp / "train")
    _save_rows(evaluation, tmp / "eval")
    fields = dict(report)
    fields["rejections"] = [r.__dict__ for r in report["rejections"]]
    (tmp / "report.json").write_text(json.dumps(fields, ensure_ascii=False, default=str), encoding="utf-8")
    if entry.exists():
        shutil.rmtree(entry)
    os.replace(tmp, entry)


def entry_for(key: str, cache_dir: Optional[str]) -> Path:
    return (Path(cache_dir) if cache_dir else default_cache_dir()) / key
