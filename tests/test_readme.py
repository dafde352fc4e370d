"""The READMEs (English and Vietnamese): the two set-up commands, an example config that is a
valid run config, links that reach the documentation, and the same measured demo as the docs'
Getting started page. The config reference and the commands the docs show are checked in
tests/test_docs.py."""

from __future__ import annotations

import re

import pytest
import yaml

from vitune.config import RunConfig

from conftest import ROOT

READMES = ("README.md", "README.vi.md")


def read(name: str) -> str:
    return (ROOT / name).read_text(encoding="utf-8")


def test_readme_gives_the_two_setup_commands():
    for name in READMES:
        readme = read(name)
        assert "make demo" in readme and "make test" in readme, name
        assert "make docs" in readme and "site/" in readme, name
    assert "make test" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("name", READMES)
def test_the_readme_example_is_a_valid_run_config(name):
    block = re.search(r"cat > my-run\.yaml <<'YAML'\n(.*?)^YAML$", read(name), re.S | re.M).group(1)
    config = RunConfig.model_validate(yaml.safe_load(block))
    assert (config.model.name_or_path, config.model.template, config.method.type, config.train.output_dir) == (
        "runs/gemma-3-270m", "gemma", "lora", "runs/my-run")
    assert [entry.path for entry in config.data.train] == ["data/alpaca_vi.jsonl"]
    assert (ROOT / "data" / "alpaca_vi.jsonl").is_file()


@pytest.mark.parametrize("name", READMES)
def test_every_link_of_the_readme_reaches_a_file(name):
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", read(name))
    local = [link for link in links if "://" not in link]
    assert len(local) >= 25  # the documentation's pages
    assert [link for link in local if not (ROOT / link).is_file()] == []
    suffix = ".vi.md" if name.endswith(".vi.md") else ".md"
    docs = [link for link in local if link.startswith("docs/")]
    assert docs and all(link.endswith(suffix) for link in docs)  # each README links to its own language


@pytest.mark.parametrize(("name", "page", "start"), [
    ("README.md", "docs/index.md", "`make demo` fine-tunes"),
    ("README.vi.md", "docs/index.vi.md", "`make demo` tinh chỉnh"),
])
def test_the_readme_and_the_docs_tell_the_same_measured_demo(name, page, start):
    def paragraph(text: str) -> str:
        return re.search(rf"^{re.escape(start)}.*?(?=\n\n)", text, re.S | re.M).group(0)

    demo = paragraph(read(name))
    assert demo == paragraph(read(page))
    assert ("3.296 → 2.950" in demo or "3,296 → 2,950" in demo) and ("27.0 → 19.1" in demo or "27,0 → 19,1" in demo)
