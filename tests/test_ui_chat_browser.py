"""The chat tab in a real browser (tests/browser_fixtures.py): a run answers as `vitune chat` does."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from browser_fixtures import browser, page, rel, root, server, shot, workspace  # noqa: F401 (fixtures)
from conftest import ROOT


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


def test_chat_tab_answers_as_vitune_chat_does(page, run):
    from vitune.data.records import Message
    from vitune.infer.chat import load_chat_model

    expected = load_chat_model(str(run)).answer([Message("user", "Xin chào")], max_new_tokens=128)
    page.get_by_role("tab", name="Chat").click()
    page.locator("#chat-run input").fill(rel(run))
    page.locator("#chat-run input").press("Enter")
    page.locator("#chat-message textarea").fill("Xin chào")
    page.locator("#chat-send").click()
    bot = page.locator("#chat-model .bot").last
    bot.wait_for()
    page.wait_for_function("() => !document.querySelector('#chat-model .pending')", timeout=60_000)
    deadline = time.time() + 60
    while bot.inner_text().strip() != expected.strip() and time.time() < deadline:
        time.sleep(0.5)
    assert bot.inner_text().strip() == expected.strip()
    shot(page, "chat")


