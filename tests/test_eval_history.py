"""`vitune eval` keeps every result: <folder>/evals/<UTC time>-<file stems>.json, one file per
evaluation, and <folder>/eval.json a copy of the latest; `--compare` reads any of them, and an
`--out` file that exists already is refused rather than replaced."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import time
from pathlib import Path

import pytest

from vitune.cli import main
from vitune.eval import report

from conftest import ROOT, train_run

VMLU = ROOT / "data" / "vmlu_vi.jsonl"
QA = ROOT / "data" / "qa_vi_eval.jsonl"


def result(target: str, acc: float, files=("vmlu_vi.jsonl",)) -> dict:
    return {"model": {"target": target}, "files": [{"path": f"data/{f}", "task": "multiple_choice",
                                                     "model": {"acc": {"average": acc}}} for f in files]}


def at(monkeypatch, stamp: str) -> None:
    """report's clock stopped at `stamp` (UTC, YYYYmmdd-HHMMSS)."""
    frozen, real = time.strptime(stamp, report.STAMP), time.gmtime
    monkeypatch.setattr(report.time, "gmtime", lambda *seconds: real(*seconds) if seconds else frozen)


@pytest.fixture(scope="module")
def evaluated(tiny_llama, tmp_path_factory):
    """A LoRA run evaluated twice by the command: (run, [each result as evaluate returned it], [its output])."""
    run = train_run(tmp_path_factory.mktemp("history"), tiny_llama, "lora")
    computed, outputs, real_save = [], [], report.save

    def spy(result, out, replace=False):
        computed.append(json.loads(json.dumps(result)))
        return real_save(result, out, replace)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(report, "save", spy)
        patch.setenv("COLUMNS", "1000")  # rich folds a long path at the terminal's width
        for data, limit in ([QA], "3"), ([VMLU, QA], "2"):
            with contextlib.redirect_stdout(io.StringIO()) as shown:  # capsys is one test's, not a module's
                assert main(["eval", str(run), "--data", *map(str, data), "--limit", limit, "--base", "none"]) == 0
            outputs.append(" ".join(shown.getvalue().split()))
            time.sleep(1.1)  # a second apart, as two evaluations by hand are
    return run, computed, outputs


def test_two_evaluations_of_a_run_keep_two_files_with_the_figures_each_computed(evaluated):
    run, computed, _ = evaluated
    newest, oldest = report.history(run)
    assert re.fullmatch(r"\d{8}-\d{6}-qa_vi_eval\.json", oldest.name)
    assert re.fullmatch(r"\d{8}-\d{6}-vmlu_vi\+qa_vi_eval\.json", newest.name)
    assert sorted(p.name for p in (run / "evals").iterdir()) == [oldest.name, newest.name]
    assert json.loads(oldest.read_text(encoding="utf-8")) == computed[0]
    assert json.loads(newest.read_text(encoding="utf-8")) == computed[1]
    assert [f["rows_scored"] for f in computed[0]["files"]] == [3]
    assert [f["rows_scored"] for f in computed[1]["files"]] == [2, 2]


def test_eval_json_is_a_copy_of_the_latest(evaluated):
    run, _, _ = evaluated
    assert (run / "eval.json").read_bytes() == report.history(run)[0].read_bytes()


def test_the_command_says_where_it_kept_the_result(evaluated):
    run, _, outputs = evaluated
    first, second = report.history(run)[::-1]
    assert f"wrote {first} and its copy {run / 'eval.json'} (the latest; 1 evaluation kept in {run / 'evals'})" \
        in outputs[0]
    assert f"wrote {second} and its copy {run / 'eval.json'} (the latest; 2 evaluations kept in {run / 'evals'})" \
        in outputs[1]


def test_compare_reads_a_history_file_and_a_folder_as_its_latest(evaluated, capsys):
    run, computed, _ = evaluated
    oldest = report.history(run)[1]
    assert main(["eval", "--compare", str(oldest), str(run)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "qa_vi_eval.jsonl" in line and "│ loss" in line)
    a, b = computed[0]["files"][0]["model"]["loss"], computed[1]["files"][1]["model"]["loss"]
    assert [cell.strip() for cell in row.split("│")[3:6]] == [f"{a:.4f}", f"{b:.4f}", f"{b - a:+.4f}"]


def test_an_out_file_that_exists_is_refused_before_the_evaluation(tiny_llama, tmp_path, capsys):
    out = tmp_path / "mine.json"
    out.write_text("the user's own result\n", encoding="utf-8")
    assert main(["eval", str(tiny_llama), "--data", str(QA), "--limit", "1", "--out", str(out)]) == 2
    assert capsys.readouterr() == ("", f"error: --out {out} exists already (an earlier result?); give another file "
                                       "name, or add --force to replace it\n")
    assert out.read_text(encoding="utf-8") == "the user's own result\n"


def test_force_replaces_an_out_file(tiny_llama, tmp_path):
    out = tmp_path / "mine.json"
    out.write_text("old\n", encoding="utf-8")
    assert main(["eval", str(tiny_llama), "--data", str(QA), "--limit", "1", "--out", str(out), "--force"]) == 0
    assert json.loads(out.read_text(encoding="utf-8"))["files"][0]["rows_scored"] == 1
    assert not (tmp_path / "evals").exists()  # a file asked for is only that file


def test_two_results_in_the_same_second_keep_both(tmp_path, monkeypatch):
    at(monkeypatch, "20261207-101500")
    first = report.save(result("a", 0.25), tmp_path)
    second = report.save(result("a", 0.5), tmp_path)
    assert (first.name, second.name) == ("20261207-101500-vmlu_vi.json", "20261207-101500-vmlu_vi-2.json")
    assert report.history(tmp_path) == [second, first]
    assert json.loads((tmp_path / "eval.json").read_text())["files"][0]["model"]["acc"]["average"] == 0.5


def test_history_is_newest_first_by_the_time_in_the_name(tmp_path, monkeypatch):
    for stamp, acc in (("20261207-101500", 0.1), ("20261208-090000", 0.2), ("20261207-235959", 0.3)):
        at(monkeypatch, stamp)
        report.save(result("a", acc, ("vmlu_vi.jsonl", "qa_vi_eval.jsonl")), tmp_path)
    assert [p.name for p in report.history(tmp_path)] == [
        "20261208-090000-vmlu_vi+qa_vi_eval.json", "20261207-235959-vmlu_vi+qa_vi_eval.json",
        "20261207-101500-vmlu_vi+qa_vi_eval.json"]
    assert (tmp_path / "eval.json").read_bytes() == (tmp_path / "evals" / "20261207-235959-vmlu_vi+qa_vi_eval.json").read_bytes()


def test_a_folder_with_only_an_eval_json_keeps_it_when_the_next_result_comes(tmp_path, monkeypatch):
    legacy = tmp_path / "eval.json"
    legacy.write_text(json.dumps(result("demo", 0.75, ("qa_vi_eval.jsonl", "vmlu_vi.jsonl"))), encoding="utf-8")
    os.utime(legacy, (1796000000, 1796000000))  # 2026-11-30 00:53:20 UTC
    assert report.history(tmp_path) == [legacy]
    assert report.load(str(tmp_path))["files"][0]["model"]["acc"]["average"] == 0.75

    at(monkeypatch, "20261207-101500")
    new = report.save(result("cli", 0.25), tmp_path)
    kept = tmp_path / "evals" / "20261130-005320-qa_vi_eval+vmlu_vi.json"
    assert report.history(tmp_path) == [new, kept]
    assert json.loads(kept.read_text(encoding="utf-8")) == result("demo", 0.75, ("qa_vi_eval.jsonl", "vmlu_vi.jsonl"))
    assert legacy.read_bytes() == new.read_bytes()


def test_the_runs_tab_lists_every_evaluation_newest_first(tmp_path, monkeypatch):
    from vitune.ui import jobs

    run = tmp_path / "quickstart"
    run.mkdir()
    (run / "eval.json").write_text(json.dumps(result("demo", 0.75)), encoding="utf-8")
    assert [row["evaluation"] for row in jobs.eval_results(run)] == ["eval.json"]
    os.utime(run / "eval.json", (1796000000, 1796000000))
    at(monkeypatch, "20261207-101500")
    report.save(result("cli", 0.25, ("vmlu_vi.jsonl", "qa_vi_eval.jsonl")), run)
    assert jobs.eval_results(run) == [
        {"run": "quickstart", "evaluation": "20261207-101500-vmlu_vi+qa_vi_eval", "file": "vmlu_vi.jsonl",
         "metric": "acc", "model": 0.25, "base": None},
        {"run": "quickstart", "evaluation": "20261207-101500-vmlu_vi+qa_vi_eval", "file": "qa_vi_eval.jsonl",
         "metric": "acc", "model": 0.25, "base": None},
        {"run": "quickstart", "evaluation": "20261130-005320-vmlu_vi", "file": "vmlu_vi.jsonl",
         "metric": "acc", "model": 0.75, "base": None}]
