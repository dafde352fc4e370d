"""The documentation site (mkdocs.yml, docs/): it builds with --strict and offline, every English
page has its Vietnamese twin, the config reference is generated from the schema and lists every
key, and every `vitune` command a page shows exists with the options it shows."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vitune.config import RunConfig, _inner_model

from conftest import ROOT

DOCS = ROOT / "docs"


def load_hook(name: str):
    """A build hook of docs/hooks/, imported by path as MkDocs imports it."""
    spec = importlib.util.spec_from_file_location(f"vitune_docs_hook_{name}", DOCS / "hooks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pages(vietnamese: bool = False) -> list[Path]:
    """The markdown pages of the site (not the hooks), English ones or their .vi.md twins."""
    return sorted(path for path in DOCS.rglob("*.md")
                  if "hooks" not in path.relative_to(DOCS).parts and path.name.endswith(".vi.md") == vietnamese)


def schema_keys(model, prefix="") -> set[str]:
    """Every key path of the schema, sections included, found as vitune.config finds sections."""
    keys = set()
    for name, field in model.model_fields.items():
        inner = _inner_model(field.annotation)
        keys.add(prefix + name)
        if inner is not None:
            keys |= schema_keys(inner, prefix + name + ".")
    return keys


# ---------------------------------------------------------------- the build


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("docs") / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)],
                            cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "WARNING" not in result.stderr
    return out


def test_the_site_builds_strict_in_english_and_vietnamese(site):
    for page in pages():
        route = page.relative_to(DOCS).with_suffix("")
        route = route.parent if route.name == "index" else route
        assert (site / route / "index.html").is_file(), route
        assert (site / "vi" / route / "index.html").is_file(), route
    assert (site / "assets" / "ui-train.png").is_file()


def test_the_built_pages_hold_the_generated_parts_and_nothing_from_the_network(site):
    for lang in ("", "vi/"):
        config = (site / lang / "reference" / "config" / "index.html").read_text(encoding="utf-8")
        assert "vitune:config-reference" not in config and "<code>train.learning_rate</code>" in config
        results = (site / lang / "benchmarks" / "index.html").read_text(encoding="utf-8")
        assert "vitune:include" not in results
        assert "vitune vs TRL SFTTrainer" in results  # a heading of benchmarks/RESULTS.md
    index = (site / "index.html").read_text(encoding="utf-8")
    assert "fonts.googleapis.com" not in index and "fonts.gstatic.com" not in index  # theme.font: false
    assert 'hreflang="vi"' in index  # the language switch


def test_every_english_page_has_its_vietnamese_twin_and_no_twin_is_orphaned():
    english = {path.relative_to(DOCS).with_suffix("") for path in pages()}
    vietnamese = {path.relative_to(DOCS).with_suffix("").with_suffix("") for path in pages(vietnamese=True)}
    assert len(english) == 30
    assert english == vietnamese


def test_the_vietnamese_pages_are_written_in_vietnamese():
    # a twin that is a copy of the English page would pass the test above; every twin holds
    # Vietnamese words with their diacritics (not one page is a placeholder or a copy)
    for page in pages(vietnamese=True):
        text = page.read_text(encoding="utf-8")
        english = page.with_name(page.name.removesuffix(".vi.md") + ".md").read_text(encoding="utf-8")
        assert text != english, page
        assert re.search(r"\b(của|và|được|một|các)\b", text), page


# ---------------------------------------------------------------- the config reference


def test_the_config_reference_lists_every_key_of_the_schema():
    hook = load_hook("config_reference")
    expected = schema_keys(RunConfig)
    for lang in ("en", "vi"):
        page = hook.config_reference(lang)
        rows = re.findall(r"^\| `([a-z_.]+)` \|", page, re.M)
        headings = re.findall(r"^#+ `([a-z_.]+)` \{ #", page, re.M)
        assert len(rows) == len(set(rows))  # each key once
        assert set(rows) | set(headings) == expected
    # nested sections, entries of lists and optional sections are all walked
    assert {"method.quantization.bits", "data.train.path", "data.eval.path", "rl.rewards.function", "eval.limit"} <= expected


def test_the_config_reference_rows_show_type_limits_default_and_description():
    page = load_hook("config_reference").config_reference("en")
    assert "| `data.max_length` | int (> 1) | `2048` | Tokens per row. |" in page
    assert ("| `train.optimizer` | `auto` \\| `adamw_torch` \\| `adamw_torch_fused` \\| `adamw_bnb_8bit` \\| "
            "`paged_adamw_8bit` \\| `paged_adamw_32bit` \\| `adafactor` \\| `sgd` | `auto` | auto = adamw_bnb_8bit "
            "when bitsandbytes is installed (a quarter of AdamW's state memory), else adamw_torch. 8-bit and paged "
            "optimizers (bitsandbytes) cut optimizer memory. |") in page
    assert "| `model.name_or_path` | str | **required** | Hub id (org/name) or local model folder. |" in page
    assert "| `train.report_to` | list of `tensorboard` \\| `wandb` \\| `mlflow` \\| `none` | `[tensorboard]` |" in page
    vietnamese = load_hook("config_reference").config_reference("vi")
    assert "| `data.max_length` | int (> 1) | `2048` | Số token mỗi dòng. |" in vietnamese


def test_the_config_reference_example_is_a_run_folders_config_yaml(tmp_path):
    from vitune.config import dump_config, load_run_config

    page = load_hook("config_reference").config_reference("en")
    block = re.search(r"\{ #smallest-config \}.*?```yaml\n(.*?)```", page, re.S).group(1)
    (tmp_path / "config.yaml").write_text(block, encoding="utf-8")
    assert dump_config(load_run_config(tmp_path)) == block  # read back as vitune reads a run folder
    written = yaml.safe_load(block)
    assert written["model"]["name_or_path"] == "runs/smollm2-135m-instruct"
    assert (written["train"]["optimizer"], written["data"]["max_length"], written["method"]["lora"]["r"]) == ("auto", 2048, 16)


def test_a_note_for_a_key_the_schema_lacks_fails_the_build(monkeypatch):
    hook = load_hook("config_reference")
    monkeypatch.setitem(hook.NOTES, "train.learnin_rate", ("a typo", "một lỗi gõ"))
    with pytest.raises(ValueError, match=r"NOTES names keys the schema does not have: \['train.learnin_rate'\]"):
        hook.config_reference("en")


def test_the_config_pages_are_generated_not_written_by_hand():
    for name, lang in (("config.md", "en"), ("config.vi.md", "vi")):
        source = (DOCS / "reference" / name).read_text(encoding="utf-8")
        assert f"<!-- vitune:config-reference {lang} -->" in source
        assert "learning_rate: " not in source  # no hand-written YAML reference beside the generated one


# ---------------------------------------------------------------- commands shown in the docs


def shown_commands() -> list[tuple[str, str, list[str]]]:
    """(file, line, words after `vitune`) for every line starting `vitune ` in a bash block of the
    docs and the READMEs; continued lines (a trailing backslash) are joined, and the command ends
    at a comment, `&&`, `|` or `;`."""
    found = []
    for path in [*pages(), *pages(vietnamese=True), ROOT / "README.md", ROOT / "README.vi.md"]:
        text = path.read_text(encoding="utf-8")
        for block in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M):
            for line in block.replace("\\\n", " ").splitlines():
                if not line.startswith("vitune "):
                    continue
                lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
                lexer.whitespace_split = True
                words = []
                for word in lexer:
                    if word in ("&&", "||", "|", ";", "&"):
                        break
                    words.append(word)
                found.append((str(path.relative_to(ROOT)), line, words[1:]))
    return found


def test_the_docs_show_commands_of_every_group():
    groups = {words[0] for _, _, words in shown_commands()}
    assert groups == {"init-model", "train", "chat", "merge", "export", "serve", "eval", "ui", "score", "vocab",
                      "data", "estimate", "push", "examples", "config", "--version"}


def test_every_command_shown_in_the_docs_exists_with_the_options_it_shows(capsys, monkeypatch):
    import typer

    from vitune.cli import app, main

    monkeypatch.setenv("COLUMNS", "250")  # rich wraps the help at the terminal's width
    helps: dict[tuple[str, ...], str] = {}
    for where, line, words in shown_commands():
        if words[0].startswith("-"):  # an option of vitune itself (vitune --version)
            assert main(["--help"]) == 0
            assert re.search(rf"(?<![\w-]){re.escape(words[0])}(?![\w-])", capsys.readouterr().out), line
            continue
        command, path = typer.main.get_command(app), []
        for word in words:  # the subcommand words, up to the first argument that is not one
            sub = getattr(command, "commands", {}).get(word)
            if sub is None:
                break
            command, path = sub, [*path, word]
        assert path and not hasattr(command, "commands"), f"{where}: not a vitune command: {line}"
        if tuple(path) not in helps:
            assert main([*path, "--help"]) == 0, f"{where}: {line}"
            helps[tuple(path)] = capsys.readouterr().out
        help_text = helps[tuple(path)]
        for word in words[len(path):]:
            option = word.split("=", 1)[0]
            if re.fullmatch(r"--?[A-Za-z][\w-]*", option):
                assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", help_text), \
                    f"{where}: `vitune {' '.join(path)}` has no option {option}: {line}"
    assert len(helps) == 17  # every command, each asked for its --help once
