"""`vitune ui` in a real browser (tests/browser_fixtures.py: Debian's Chromium, headless, driven
by Playwright). The server is `vitune ui` in its own process, on the tiny Llama model; every
figure the page shows is checked against the function the CLI uses.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from browser_fixtures import browser, page, rel, root, server, shot, sync_api, workspace  # noqa: F401 (fixtures)
from conftest import write_jsonl


def form_config(model: Path, data: list[str], **settings) -> dict:
    from vitune.ui import forms

    values = dict(forms.DEFAULTS, **{"model.name_or_path": str(model), "data.train": "\n".join(data)}, **settings)
    return forms.raw_config(values)


def test_data_tab_shows_the_counts_formats_and_rejected_rows_of_vitune_data_inspect(page, root, monkeypatch):
    from vitune.config import validate_config
    from vitune.train.inspection import inspect_data
    from vitune.ui import forms

    monkeypatch.chdir(root.parent)  # the page's server runs there: data/... is read from there
    bad = write_jsonl(root.parent / "bad.jsonl", [
        {"instruction": "Thủ đô của Việt Nam là gì?", "output": "Hà Nội."},
        "{not json",
        {"instruction": "Một câu hỏi không có câu trả lời"},
    ])
    files = ["data/alpaca_vi.jsonl", "data/sharegpt_vi.jsonl", rel(bad)]
    raw = forms.inspection_config(rel(root / "tiny-llama"), "auto", "\n".join(files), 1024, True)
    expected = inspect_data(validate_config(raw)).stats

    page.locator("#data-model textarea").fill(rel(root / "tiny-llama"))
    page.locator("#data-files textarea").fill("\n".join(files))
    page.locator("#data-inspect").click()
    summary = page.locator("#data-summary")
    summary.get_by_text("rows read / kept / rejected").wait_for()
    text = summary.inner_text()
    assert f"{expected['rows_read']} / {expected['rows_kept']} / {expected['rows_rejected']}" in text
    assert (expected["rows_read"], expected["rows_rejected"]) == (443, 2)
    assert f"{expected['packing_efficiency']:.1%}" in text
    assert "alpaca 320" in text and "sharegpt 120" in text and "alpaca 2" in text
    p = expected["length_percentiles"]
    assert f"{p['p50']} / {p['p90']} / {p['p99']} / {p['max']}" in text
    rejected = page.locator("#data-rejected").inner_text()
    assert "bad.jsonl:2" in rejected and "bad.jsonl:3" in rejected and str(root.parent) not in rejected
    # the rendered rows: the trained tokens are marked (the first row's answer is among them)
    rows = page.locator("#data-rows")
    rows.get_by_text("row 1 of 441").wait_for()
    shot(page, "data")


def test_train_tab_validates_next_to_the_field_trains_and_plots_every_logged_loss(page, root):
    from vitune.config import validate_config
    from vitune.errors import ConfigError

    page.get_by_role("tab", name="Train").click()
    page.locator("#f-model textarea").fill(rel(root / "tiny-llama"))
    page.locator("#f-data textarea").fill("data/alpaca_vi.jsonl")
    page.locator("#f-method").get_by_role("radio", name="full").check()
    for field, value in (("#f-max-steps", "6"), ("#f-val-size", "0"), ("#f-logging", "1"), ("#f-max-length", "256"),
                         ("#f-lr", "-1")):
        page.locator(f"{field} input").fill(value)
    page.locator("#f-output textarea").fill(rel(root / "ui-run"))
    page.locator("#train-check").click()
    error = page.locator("#error-train-learning_rate")
    error.get_by_text("learning_rate").wait_for()
    with pytest.raises(ConfigError) as cli:  # the CLI's own message, next to the field
        validate_config(form_config(root / "tiny-llama", ["data/alpaca_vi.jsonl"], **{"train.learning_rate": -1}),
                        source="form")
    # the page checks as the form changes too: wait for the last check, not the first answer
    sync_api.expect(error).to_have_text(f"error: {cli.value}")

    page.locator("#f-lr input").fill("0.003")
    page.locator("#train-check").click()
    sync_api.expect(page.locator("#train-message")).to_have_text("The config is valid.")
    sync_api.expect(page.locator("#error-train-learning_rate")).to_have_text("")
    sync_api.expect(page.locator("#train-estimate")).to_contain_text("peak on CPU")
    sync_api.expect(page.locator("#train-yaml")).to_contain_text("max_steps: 6")
    page.locator("#train-start").click()
    status = page.locator("#train-status")
    status.get_by_text(re.compile("finished|failed")).wait_for(timeout=180_000)
    assert "finished" in status.inner_text() and "step 6 / 6" in status.inner_text()
    losses = [json.loads(line)["loss"] for line in (root / "ui-run" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 6
    plot = page.locator("#train-plot_loss")
    plot.locator("[aria-label*='series: loss']").first.wait_for()
    points = plot.locator("[aria-label*='series: loss']").evaluate_all("els => els.map(e => e.getAttribute('aria-label'))")
    values = sorted({float(re.search(r"value: ([-0-9.e]+)", p).group(1)) for p in points})
    assert values == pytest.approx(sorted(losses), abs=1e-6)
    assert "done: 6 steps" in page.locator("#train-log textarea").input_value()
    shot(page, "train")

    # the same folder again while nothing runs is fine; the lock refuses only a live run
    page.get_by_role("tab", name="Runs").click()
    page.locator("#runs-refresh").click()
    sync_api.expect(page.locator("#runs-table")).to_contain_text("ui-run")
    page.locator("#runs-plot [aria-label*='run: ui-run']").first.wait_for()
    shot(page, "runs")


def test_eval_tab_shows_the_figures_it_saves_in_eval_json(page, root):
    run = root / "ui-run"
    if not (run / "summary.json").is_file():
        pytest.skip("needs the run of the training test")
    page.get_by_role("tab", name="Evaluate").click()
    page.locator("#eval-target input").fill(rel(run))
    page.locator("#eval-target input").press("Enter")
    page.locator("#eval-files textarea").fill("data/vmlu_vi.jsonl")
    page.locator("#eval-limit input").fill("8")
    page.locator("#eval-run").click()
    page.locator("#eval-message").get_by_text("eval.json").wait_for(timeout=120_000)
    result = json.loads((run / "eval.json").read_text(encoding="utf-8"))
    from vitune.eval.report import headline

    acc = headline(result["files"][0]["model"], "acc")
    table = page.locator("#eval-table").inner_text()
    assert "acc" in table and f"{round(acc, 4)}" in table
    shot(page, "eval")


def test_export_tab_reports_a_bad_source_in_one_line(page, root):
    page.get_by_role("tab", name="Export").click()
    page.locator("#export-source input").fill(rel(root / "no-such-run"))
    page.locator("#export-source input").press("Enter")
    page.locator("#export-run").click()
    message = page.locator("#export-message")
    message.get_by_text("error").wait_for()
    assert "no-such-run" in message.inner_text() and "Traceback" not in message.inner_text()
    shot(page, "export")


def test_the_language_switch_relabels_the_page(page):
    page.locator("#language").get_by_text("Tiếng Việt").click()
    page.get_by_role("tab", name="Huấn luyện").wait_for()
    page.get_by_role("tab", name="Huấn luyện").click()
    page.get_by_role("button", name="Bắt đầu huấn luyện").wait_for()
    shot(page, "train-vi")
    page.locator("#language").get_by_text("English").click()
    page.get_by_role("tab", name="Train").wait_for()
