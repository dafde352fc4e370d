"""`vitune ui` in a real browser (tests/browser_fixtures.py: Debian's Chromium, headless, driven
by Playwright). The server is `vitune ui` in its own process, on the tiny Llama model; every
figure the page shows is checked against the function the CLI uses.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest

from browser_fixtures import browser, page, rel, root, server, shot, sync_api, workspace  # noqa: F401 (fixtures)
from conftest import write_jsonl

expect = sync_api.expect
expect.set_options(timeout=60_000)  # the page answers within seconds, but the tests share a busy machine


def form_config(model: Path, data: list[str], **settings) -> dict:
    from vitune.ui import forms

    values = dict(forms.DEFAULTS, **{"model.name_or_path": str(model), "data.train": "\n".join(data)}, **settings)
    return forms.raw_config(values)


def test_data_tab_shows_the_counts_formats_and_rejected_rows_of_vitune_data_inspect(page, root, monkeypatch):
    from vitune.config import validate_config
    from vitune.train.inspection import inspect_data
    from vitune.ui import forms

    monkeypatch.chdir(root.parent)  # the page's server runs there: data/... is read from there
    page.locator("#data-model textarea").fill(rel(root / "tiny-llama"))
    page.locator("#data-inspect").click()  # the bundled files: every row kept
    summary = page.locator("#data-summary")
    summary.get_by_text("rows read / kept / rejected").wait_for()
    assert re.search(r"^template\tllama3$", summary.inner_text(), re.M)  # what auto resolved to, not "auto"
    expect(page.locator("#data-no-rejected")).to_have_text("No rejected rows.")
    expect(page.locator("#data-rejected")).to_be_hidden()

    bad = write_jsonl(root.parent / "bad.jsonl", [
        {"instruction": "Thủ đô của Việt Nam là gì?", "output": "Hà Nội."},
        "{not json",
        {"instruction": "Một câu hỏi không có câu trả lời"},
    ])
    files = ["data/alpaca_vi.jsonl", "data/sharegpt_vi.jsonl", rel(bad)]
    raw = forms.inspection_config(rel(root / "tiny-llama"), "auto", "\n".join(files), 1024, True)
    expected = inspect_data(validate_config(raw)).stats
    page.locator("#data-files textarea").fill("\n".join(files))
    page.locator("#data-inspect").click()
    expect(page.locator("#data-no-rejected")).to_have_text("")
    text = summary.inner_text()
    assert f"{expected['rows_read']} / {expected['rows_kept']} / {expected['rows_rejected']}" in text
    assert (expected["rows_read"], expected["rows_rejected"]) == (443, 2)
    assert f"{expected['packing_efficiency']:.1%}" in text
    assert "alpaca 320" in text and "sharegpt 120" in text and "alpaca 2" in text
    p = expected["length_percentiles"]
    assert f"{p['p50']} / {p['p90']} / {p['p99']} / {p['max']}" in text
    rejected = page.locator("#data-rejected").inner_text()
    assert "bad.jsonl:2" in rejected and "bad.jsonl:3" in rejected and str(root.parent) not in rejected
    headers = page.locator("#data-rejected thead th").all_inner_texts()
    assert [h.strip() for h in headers] == ["file:line", "reason", "detail"]
    # the rendered rows: the trained tokens are marked (the first row's answer is among them)
    rows = page.locator("#data-rows")
    rows.get_by_text("row 1 of 441").wait_for()
    shot(page, "data")


def points(plot, series: str) -> list[tuple[int, float]]:
    """The (step, value) points a plot draws for one series or run, read from their aria labels."""
    marks = plot.locator(f"[aria-label*='{series}']")
    marks.first.wait_for()
    labels = marks.evaluate_all("els => els.map(e => e.getAttribute('aria-label'))")
    return sorted({(int(re.search(r"step: (\d+)", a).group(1)), float(re.search(r"value: ([-0-9.e]+)", a).group(1)))
                   for a in labels})


def test_train_tab_refuses_a_used_folder_in_its_words_then_trains_and_plots_each_logged_step(page, root, workspace):
    from vitune.config import validate_config
    from vitune.errors import ConfigError

    old = root / "ui-run"  # an earlier run's folder: its plots and step must not show for the new run
    old.mkdir()
    write_jsonl(old / "metrics.jsonl", [{"step": s, "loss": 9.0, "learning_rate": 1e-3} for s in range(1, 10)])
    (old / "progress.json").write_text(json.dumps({"phase": "finished", "status": "finished", "step": 9, "max_steps": 9,
                                                   "eta_s": 0, "started": time.time() - 3600}))
    page.get_by_role("tab", name="Train").click()
    page.locator("#f-model textarea").fill(rel(root / "tiny-llama"))
    page.locator("#f-data textarea").fill("data/alpaca_vi.jsonl")
    page.locator("#f-method").get_by_role("radio", name="full", exact=True).check()
    expect(page.locator("#f-lr input")).to_have_value(re.compile(r"^(2e-05|0\.00002)$"))  # full's default
    for field, value in (("#f-max-steps", "3"), ("#f-val-size", "0"), ("#f-logging", "5"), ("#f-max-length", "256"),
                         ("#f-lr", "-1")):
        page.locator(f"{field} input").fill(value)
    page.locator("#f-output textarea").fill(rel(old))
    page.locator("#train-check").click()
    error = page.locator("#error-train-learning_rate")
    error.get_by_text("learning_rate").wait_for(timeout=180_000)
    with pytest.raises(ConfigError) as cli:  # the CLI's own message, next to the field
        validate_config(form_config(root / "tiny-llama", ["data/alpaca_vi.jsonl"], **{"train.learning_rate": -1}),
                        source="form")
    # the page checks as the form changes too: wait for the last check, not the first answer
    expect(error).to_have_text(f"error: {cli.value}")

    page.locator("#f-lr input").fill("0.003")
    page.locator("#train-check").click()  # every start-up check of vitune train: the folder is used
    expect(page.locator("#error-train-output_dir")).to_have_text(
        "error: train.output_dir runs/ui-run already exists and is not empty; choose another folder "
        "or tick “Replace the folder if it exists”")
    expect(page.locator("#train-message")).to_have_text("")
    page.locator("#f-overwrite input").check()
    page.locator("#train-check").click()
    expect(page.locator("#train-message")).to_have_text("The config is valid.")
    expect(page.locator("#error-train-learning_rate")).to_have_text("")
    expect(page.locator("#error-train-output_dir")).to_have_text("")
    expect(page.locator("#train-estimate")).to_contain_text("peak on CPU")
    expect(page.locator("#train-yaml")).to_contain_text("max_steps: 3")
    page.locator("#train-start").click()
    status = page.locator("#train-status p")
    # before its first step the run says what it is doing; the earlier run's step and plots are gone
    expect(status).to_have_text(re.compile(r"^running · (starting|loading model|preparing data) · runs/ui-run$"))
    expect(page.locator("#train-plot_loss-none")).to_have_text("Loss: no points yet.")
    expect(page.locator("#train-plot_loss")).to_be_hidden()
    expect(status).to_have_text(re.compile(r"^(finished|failed)"), timeout=180_000)  # the process ended
    assert status.inner_text() == "finished · runs/ui-run · step 3 / 3"
    metrics = [json.loads(line) for line in (old / "metrics.jsonl").read_text().splitlines()]
    losses = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    assert [step for step, _ in losses] == [1, 3]  # logging every 5 steps logs the first and the last
    shown = points(page.locator("#train-plot_loss"), "series: loss")
    assert [s for s, _ in shown] == [1, 3] and [v for _, v in shown] == pytest.approx([v for _, v in losses], abs=1e-6)
    assert [s for s, _ in points(page.locator("#train-plot_lr"), "series: learning_rate")] == [1, 3]
    assert [s for s, _ in points(page.locator("#train-plot_speed"), "series: tokens_per_s")] == [1, 3]
    expect(page.locator("#train-plot_reward-none")).to_have_text("Accuracy and margin (rm, dpo): no points yet.")
    assert "done: 3 steps" in page.locator("#train-log textarea").input_value()
    # the YAML it ran is the page's own file, in its state folder: the runs folder holds runs only
    assert (workspace / "state" / "ui-run.yaml").is_file() and sorted(p.name for p in root.iterdir()) == [
        "tiny-llama", "ui-run"]
    shot(page, "train")

    page.get_by_role("tab", name="Runs").click()
    page.locator("#runs-refresh").click()
    expect(page.locator("#runs-table")).to_contain_text("ui-run")
    page.locator("#runs-plot [aria-label*='run: ui-run']").first.wait_for()
    shot(page, "runs")
    # another runs folder: the overlay's runs and its legend are that folder's
    shutil.copytree(old, workspace / "other" / "second-run")
    page.locator("#runs-root textarea").fill("other")
    page.locator("#runs-refresh").click()
    page.locator("#runs-plot [aria-label*='run: second-run']").first.wait_for()
    expect(page.locator("#runs-plot [aria-label*='run: ui-run']")).to_have_count(0)
    legend = page.locator("#runs-plot [role='graphics-symbol'][aria-label*='legend'], #runs-plot .role-legend")
    assert "second-run" in legend.first.text_content() and "ui-run" not in legend.first.text_content()


def test_the_learning_rate_follows_the_method_until_the_user_types_one(page):
    page.get_by_role("tab", name="Train").click()
    rate = page.locator("#f-lr input")
    assert float(rate.input_value()) == 2e-4
    page.locator("#f-method").get_by_role("radio", name="full", exact=True).check()
    expect(rate).to_have_value(re.compile(r"^(2e-05|0\.00002)$"))
    page.locator("#f-method").get_by_role("radio", name="lora", exact=True).check()
    expect(rate).to_have_value("0.0002")
    rate.fill("0.0005")
    page.locator("#f-method").get_by_role("radio", name="full", exact=True).check()
    time.sleep(1)
    assert float(rate.input_value()) == 5e-4


def evaluate_on_page(page, run: Path, limit: int, saved: str) -> None:
    """Evaluate `run` on `limit` VMLU rows from the open Evaluate tab; wait for the message naming `saved`."""
    page.locator("#eval-target input").fill(rel(run))
    page.locator("#eval-target input").press("Enter")
    page.locator("#eval-files textarea").fill("data/vmlu_vi.jsonl")
    page.locator("#eval-limit input").fill(str(limit))
    page.locator("#eval-run").click()
    page.locator("#eval-message").get_by_text(saved).wait_for(timeout=120_000)


def test_eval_tab_shows_the_figures_it_saves_in_eval_json(page, root):
    run = root / "ui-run"
    if not (run / "summary.json").is_file():
        pytest.skip("needs the run of the training test")
    page.get_by_role("tab", name="Evaluate").click()
    evaluate_on_page(page, run, limit=8, saved="eval.json")
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


def english_words() -> dict[str, re.Pattern]:
    """Every English text of the page (text.TEXT) that Vietnamese says differently, as a pattern
    of whole words; a text with {placeholders} by its literal parts of two words or more."""
    from vitune.ui.text import TEXT

    found = {}
    for english, vietnamese in TEXT.values():
        if english == vietnamese:
            continue
        for part in re.split(r"\{[^}]*\}", english):
            part = part.strip(" :;,.`“”")
            if part and (len(part.split()) >= 2 or part == english.strip(" :;,.`“”")) and part not in vietnamese:
                found[part] = re.compile(r"(?<![\w/.\-])" + re.escape(part) + r"(?![\w/\-])")
    return found


def english_on_screen(page) -> list[str]:
    """The page's English texts visible now, outside what the CLI and the data say (the YAML,
    the advice, the rows as the model sees them, the logs, the chat)."""
    text = page.evaluate("""() => {
        const skip = ['#train-yaml', '#train-advice', '#data-rows', '#chat-model', '#chat-base'];
        const clone = document.body.cloneNode(true);
        skip.forEach(s => clone.querySelectorAll(s).forEach(e => e.remove()));
        document.body.after(clone); clone.style.position = 'absolute';
        const text = clone.innerText; clone.remove(); return text; }""")
    return sorted(word for word, pattern in english_words().items() if pattern.search(text))


def test_every_tab_in_vietnamese_shows_no_english_of_the_page(page, root):
    run = root / "ui-run"
    page.locator("#language").get_by_text("Tiếng Việt").click()
    page.get_by_role("tab", name="Dữ liệu").wait_for()
    page.locator("#data-model textarea").fill(rel(root / "tiny-llama"))
    page.locator("#data-inspect").click()
    page.locator("#data-summary").get_by_text("dòng đọc / giữ / loại").wait_for()
    expect(page.locator("#data-no-rejected")).to_have_text("Không có dòng nào bị loại.")
    seen = {"data": english_on_screen(page)}

    page.get_by_role("tab", name="Huấn luyện").click()
    page.locator("#f-model textarea").fill(rel(root / "tiny-llama"))
    page.locator("#f-max-length input").fill("256")
    page.locator("#f-output textarea").fill("runs/vi-check")
    page.locator("#train-check").click()
    expect(page.locator("#train-message")).to_have_text("Cấu hình hợp lệ.")
    expect(page.locator("#train-estimate")).to_contain_text("đỉnh trên CPU")
    seen["train"] = english_on_screen(page)
    shot(page, "train-vi")

    page.get_by_role("tab", name="Các lần chạy").click()
    page.locator("#runs-refresh").click()
    if run.is_dir():
        expect(page.locator("#runs-table")).to_contain_text("lần chạy")
    seen["runs"] = english_on_screen(page)

    page.get_by_role("tab", name="Trò chuyện").click()
    page.locator("#chat-run").wait_for()
    seen["chat"] = english_on_screen(page)

    page.get_by_role("tab", name="Đánh giá").click()
    if (run / "summary.json").is_file():
        evaluate_on_page(page, run, limit=2, saved="Đã lưu")
        expect(page.locator("#eval-table")).to_contain_text("chỉ số")
    else:
        page.locator("#eval-files textarea").fill("")
        page.locator("#eval-run").click()
        page.locator("#eval-message").get_by_text("lỗi").wait_for()
    seen["eval"] = english_on_screen(page)

    page.get_by_role("tab", name="Xuất mô hình").click()
    page.locator("#export-source input").fill(rel(root / "no-such-run"))
    page.locator("#export-source input").press("Enter")
    page.locator("#export-run").click()
    time.sleep(5)  # the export's answer itself is checked in English (test_export_tab_...)
    seen["export"] = english_on_screen(page)
    assert seen == {tab: [] for tab in seen}


def test_the_language_switch_shows_the_tables_already_on_the_page_again(page, root):
    page.locator("#data-model textarea").fill(rel(root / "tiny-llama"))
    page.locator("#data-inspect").click()
    page.locator("#data-summary").get_by_text("rows read / kept / rejected").wait_for()
    page.locator("#language").get_by_text("Tiếng Việt").click()
    page.locator("#data-summary").get_by_text("dòng đọc / giữ / loại").wait_for()
    expect(page.locator("#data-no-rejected")).to_have_text("Không có dòng nào bị loại.")
    page.locator("#language").get_by_text("English").click()
    page.locator("#data-summary").get_by_text("rows read / kept / rejected").wait_for()
    page.get_by_role("tab", name="Train").wait_for()
