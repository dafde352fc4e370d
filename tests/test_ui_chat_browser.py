"""The chat tab in a real browser (tests/browser_fixtures.py): a run answers as `vitune chat` does,
beside its base model when asked, both panels at once, and Stop ends the models' generation."""

from __future__ import annotations

import subprocess
import sys
import time
from urllib.parse import urlparse

import pytest

from browser_fixtures import browser, page, rel, root, server, shot, sync_api, workspace  # noqa: F401 (fixtures)
from conftest import ROOT

expect = sync_api.expect


@pytest.fixture(scope="module")
def run(root):
    """A finished two-step LoRA run of the tiny Llama, trained by the CLI."""
    out = root / "chat-run"
    subprocess.run([sys.executable, "-m", "vitune", "train", str(ROOT / "examples" / "quickstart.yaml"),
                    "--set", f"model.name_or_path={root / 'tiny-llama'}", "--set", "model.template=chatml",
                    "--set", f"train.output_dir={out}", "--set", "train.max_steps=2", "--set", "data.val_size=0",
                    "--set", "data.max_length=128", "--set", "eval=null"],
                   check=True, capture_output=True, cwd=ROOT)
    return out


@pytest.fixture(scope="module")
def server_process(server):
    """The `vitune ui` process behind the page (psutil), found by its port."""
    psutil = pytest.importorskip("psutil")
    port = str(urlparse(server).port)
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if "ui" in cmdline and "--port" in cmdline and cmdline[cmdline.index("--port") + 1] == port:
            return proc
    raise RuntimeError(f"no vitune ui process on port {port}")


def greedy_answer(path, question: str, max_new_tokens: int = 128) -> str:
    from vitune.data.records import Message
    from vitune.infer.chat import load_chat_model

    return load_chat_model(str(path)).answer([Message("user", question)], max_new_tokens=max_new_tokens)


def open_chat(page, run, greedy: bool = True) -> None:
    page.get_by_role("tab", name="Chat").click()
    page.locator("#chat-run input").fill(rel(run))
    page.locator("#chat-run input").press("Enter")
    if greedy:
        page.locator("#chat-greedy input").check()
        expect(page.locator("#chat-temperature input")).to_have_value("0")


def send(page, message: str) -> None:
    page.locator("#chat-message textarea").fill(message)
    page.locator("#chat-send").click()


def wait_for_answer(page, panel: str, expected: str) -> None:
    """Until the panel's last answer is `expected` (60 s), then asserts it."""
    bot = page.locator(f"#{panel} .bot").last
    bot.wait_for()
    page.wait_for_function(f"() => !document.querySelector('#{panel} .pending')", timeout=60_000)
    deadline = time.time() + 60
    while bot.inner_text().strip() != expected and time.time() < deadline:
        time.sleep(0.5)
    assert bot.inner_text().strip() == expected


@pytest.mark.slow  # ~20 s for its page and model (CI's 20-minute budget); make test-all runs it
def test_the_page_samples_by_default_and_greedy_is_one_click_away(page):
    page.get_by_role("tab", name="Chat").click()
    expect(page.locator("#chat-temperature input")).to_have_value("0.7")
    expect(page.locator("#chat-top-p input")).to_have_value("0.9")
    expect(page.locator("#chat-repetition-penalty input")).to_have_value("1")
    expect(page.locator("#chat-greedy input")).not_to_be_checked()
    page.locator("#chat-greedy input").check()
    expect(page.locator("#chat-temperature input")).to_have_value("0")
    page.locator("#chat-greedy input").uncheck()
    expect(page.locator("#chat-temperature input")).to_have_value("0.7")
    page.locator("#chat-temperature input").fill("0")
    page.locator("#chat-temperature input").press("Tab")
    expect(page.locator("#chat-greedy input")).to_be_checked()


def test_the_base_panel_shows_only_side_by_side(page):
    page.get_by_role("tab", name="Chat").click()
    expect(page.locator("#chat-model")).to_be_visible()
    expect(page.locator("#chat-base")).to_be_hidden()
    page.locator("#chat-with-base input").check()
    expect(page.locator("#chat-base")).to_be_visible()
    page.locator("#chat-with-base input").uncheck()
    expect(page.locator("#chat-base")).to_be_hidden()


@pytest.mark.slow  # ~40 s with its run (CI's 20-minute budget); make test-all runs it
def test_chat_tab_answers_as_vitune_chat_does(page, run):
    expected = greedy_answer(run, "Xin chào")
    open_chat(page, run)
    send(page, "Xin chào")
    wait_for_answer(page, "chat-model", expected)
    expect(page.locator("#chat-send")).to_be_enabled()
    expect(page.locator("#chat-stop")).to_be_disabled()
    shot(page, "chat")


@pytest.mark.slow  # CI's 20-minute budget (fresh-clone durations, 2026-12-08); make test-all runs it
def test_side_by_side_each_panel_answers_as_its_own_model_does(page, run, root):
    expected, expected_base = greedy_answer(run, "Thủ đô của Việt Nam là gì?"), \
        greedy_answer(root / "tiny-llama", "Thủ đô của Việt Nam là gì?")
    assert expected != expected_base  # the two panels are told apart
    open_chat(page, run)
    page.locator("#chat-with-base input").check()
    send(page, "Thủ đô của Việt Nam là gì?")
    wait_for_answer(page, "chat-model", expected)
    wait_for_answer(page, "chat-base", expected_base)


@pytest.mark.slow  # CI's 20-minute budget (fresh-clone durations, 2026-12-08); make test-all runs it
def test_stop_ends_a_long_answer_on_the_server_and_keeps_what_came(page, run, server_process):
    open_chat(page, run)
    page.locator("#chat-max-new-tokens input").fill("100000")  # the tiny model never says its end token
    send(page, "Xin chào")
    bot = page.locator("#chat-model .bot").last
    bot.wait_for()
    page.wait_for_function("() => [...document.querySelectorAll('#chat-model .bot')].pop()?.innerText.length > 40",
                           timeout=60_000)
    expect(page.locator("#chat-send")).to_be_disabled()  # one answer at a time
    clicked = time.time()
    page.locator("#chat-stop").click()
    expect(page.locator("#chat-send")).to_be_enabled(timeout=20_000)
    assert time.time() - clicked < 20
    kept = bot.inner_text().strip()
    assert len(kept) > 40
    # the server stopped computing: it spends (almost) no CPU time while the page waits
    before = server_process.cpu_times()
    time.sleep(3)
    after = server_process.cpu_times()
    assert (after.user + after.system) - (before.user + before.system) < 0.5
    assert bot.inner_text().strip() == kept  # nothing came after the stop
    # and the next answer comes as usual
    expected = greedy_answer(run, "Xin chào")
    page.locator("#chat-max-new-tokens input").fill("128")
    page.locator("#chat-clear").click()
    expect(page.locator("#chat-model .bot")).to_have_count(0)
    send(page, "Xin chào")
    wait_for_answer(page, "chat-model", expected)
