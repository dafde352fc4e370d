"""Data sources: every local file type, folders and globs, mixing with weight and max_samples."""

from __future__ import annotations

import json

import pytest

from vitune.config import DataConfig
from vitune.data.pipeline import DataReport, load_conversations
from vitune.data.sources import read_rows
from vitune.errors import DataError

from conftest import write_jsonl

ROWS = [{"instruction": f"Câu hỏi {i}", "input": "", "output": f"Trả lời {i}"} for i in range(6)]


def test_csv_parquet_json_and_jsonl_read_the_same_rows(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(ROWS)
    ds.to_csv(tmp_path / "a.csv")
    ds.to_parquet(tmp_path / "a.parquet")
    (tmp_path / "a.json").write_text(json.dumps(ROWS, ensure_ascii=False), encoding="utf-8")
    write_jsonl(tmp_path / "a.jsonl", ROWS)
    for name in ("a.csv", "a.parquet", "a.json", "a.jsonl"):
        rows = list(read_rows(str(tmp_path / name)))
        assert [{k: r.row[k] or "" for k in ("instruction", "input", "output")} for r in rows] == ROWS, name
    assert [r.source for r in read_rows(str(tmp_path / "a.jsonl"))][:2] == [f"{tmp_path}/a.jsonl:1", f"{tmp_path}/a.jsonl:2"]
    assert [r.source for r in read_rows(str(tmp_path / "a.parquet"))][-1] == f"{tmp_path}/a.parquet row 6"


def test_folders_and_globs_read_every_data_file_in_order(tmp_path):
    (tmp_path / "d").mkdir()
    write_jsonl(tmp_path / "d" / "b.jsonl", ROWS[3:])
    write_jsonl(tmp_path / "d" / "a.jsonl", ROWS[:3])
    (tmp_path / "d" / "notes.txt").write_text("not data")
    by_folder = [r.row["instruction"] for r in read_rows(str(tmp_path / "d"))]
    by_glob = [r.row["instruction"] for r in read_rows(str(tmp_path / "d" / "*.jsonl"))]
    assert by_folder == by_glob == [r["instruction"] for r in ROWS]
    with pytest.raises(DataError, match="no data files match this pattern"):
        list(read_rows(str(tmp_path / "d" / "*.parquet")))


def test_max_samples_weight_and_seeded_shuffle(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", ROWS)
    b = write_jsonl(tmp_path / "b.jsonl", [{**r, "instruction": "B" + r["instruction"]} for r in ROWS])
    cfg = DataConfig(train=[{"path": str(a), "max_samples": 2}, {"path": str(b), "weight": 1.5}])
    report = DataReport()
    train, _ = load_conversations(cfg, seed=3, report=report)
    from collections import Counter

    assert report.rows_read == 8  # max_samples stops reading a's file after 2 rows
    counts = Counter(c.source for c in train)
    assert {s: n for s, n in counts.items() if s.startswith(str(a))} == {f"{a}:1": 1, f"{a}:2": 1}
    b_counts = sorted(n for s, n in counts.items() if s.startswith(str(b)))
    assert b_counts == [1, 1, 1, 2, 2, 2]  # weight 1.5: every row once, a seeded half twice
    again, _ = load_conversations(cfg, seed=3, report=DataReport())
    other, _ = load_conversations(cfg, seed=4, report=DataReport())
    assert [c.source for c in again] == [c.source for c in train]
    assert [c.source for c in other] != [c.source for c in train]


def test_a_json_file_that_is_not_a_list_is_a_one_line_error(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"a": 1}')
    with pytest.raises(DataError, match=r"x.json: expected a JSON list of rows"):
        list(read_rows(str(path)))
    path.write_text("[1, 2")
    with pytest.raises(DataError, match=r"x.json: invalid JSON at line 1 column 6"):
        list(read_rows(str(path)))
