"""vitune as a package: the bundled files travel in the wheel, `vitune examples` puts them where
the user works, and a wheel installed in a fresh virtual environment runs the quick start path
from a folder that is not the checkout."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

import vitune
from vitune import bundled
from vitune.cli import main

from conftest import ROOT

BUNDLE = ROOT / "src" / "vitune" / "bundled"
EXAMPLE_NAMES = [
    "data", "accelerate/multi_node", "deepspeed/zero2", "deepspeed/zero3_offload", "demo", "demo_tiny", "dpo", "fsdp/fsdp2",
    "grpo", "grpo_rm", "llama3-lora", "ppo", "pt", "pt_vocab", "quickstart", "rewards", "rm", "sft_vocab", "tiny",
    "vinallama-full", "vistral-qlora",
]


def bundle_files() -> list[str]:
    return sorted(p.relative_to(BUNDLE).as_posix() for p in BUNDLE.rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts and p.name != "__init__.py")


def test_the_checkout_reads_the_bundle_through_its_data_and_examples_links():
    assert (ROOT / "data").resolve() == BUNDLE / "data" == bundled.data_dir()
    assert (ROOT / "examples").resolve() == BUNDLE / "examples"


def test_the_package_data_patterns_cover_every_bundled_file():
    """A file added to data/ or examples/ that pyproject.toml's package-data globs miss would be
    missing from the wheel (test_the_wheel_... checks the built wheel itself, in the slow run)."""
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["package-data"]
    missed = []
    for relative in bundle_files():
        folder, name = relative.rsplit("/", 1)
        package = "vitune.bundled." + folder.replace("/", ".")
        if not any(fnmatch.fnmatch(name, glob) for glob in patterns.get(package, [])):
            missed.append(relative)
    assert missed == []


def test_examples_list_names_every_example_with_what_it_is(capsys):
    assert main(["examples", "list"]) == 0
    out = capsys.readouterr().out
    assert list(bundled.examples()) == EXAMPLE_NAMES
    assert re.findall(r"^ (\S+)\s", out, re.M) == ["name", *EXAMPLE_NAMES]
    assert bundled.examples()["deepspeed/zero3_offload"] == (
        "DeepSpeed ZeRO-3 for train.deepspeed, optimizer and param offloaded to the CPU")
    assert bundled.examples()["tiny"] == (
        "vitune tiny demo (`make demo-tiny`): fine-tune a tiny Llama-architecture model on the bundled ...")


def test_examples_copy_writes_the_config_its_data_and_the_data_card(tmp_path, capsys):
    dest = tmp_path / "project"
    assert main(["examples", "copy", "tiny", str(dest)]) == 0
    wanted = ["examples/tiny.yaml", "data/alpaca_vi.jsonl", "data/sharegpt_vi.jsonl", "data/README.md"]
    assert capsys.readouterr().out.splitlines() == [
        *(f"wrote {dest / w}" for w in wanted), f"next: cd {dest} && vitune train examples/tiny.yaml"]
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == sorted(wanted)
    assert all((dest / w).read_bytes() == (BUNDLE / w).read_bytes() for w in wanted)
    assert main(["examples", "copy", "tiny", str(dest)]) == 0  # the same files again: nothing to refuse
    capsys.readouterr()

    (dest / "data" / "alpaca_vi.jsonl").write_text("mine\n", encoding="utf-8")
    assert main(["examples", "copy", "tiny", str(dest)]) == 2
    assert capsys.readouterr().err == (f"error: {dest / 'data' / 'alpaca_vi.jsonl'} exists and differs from the "
                                       "example's; move it away or pass --force to overwrite it\n")
    assert (dest / "data" / "alpaca_vi.jsonl").read_text(encoding="utf-8") == "mine\n"  # kept
    assert main(["examples", "copy", "tiny", str(dest), "--force"]) == 0
    assert (dest / "data" / "alpaca_vi.jsonl").read_bytes() == (BUNDLE / "data" / "alpaca_vi.jsonl").read_bytes()


def test_an_example_brings_the_reward_functions_and_configs_it_names():
    assert bundled.example_files("ppo") == [
        "examples/ppo.yaml", "examples/rewards.py", "examples/rm.yaml", "data/qa_vi_eval.jsonl", "data/alpaca_vi.jsonl",
        "examples/grpo.yaml", "data/preference_vi_eval.jsonl", "data/preference_vi.jsonl", "data/README.md"]
    assert bundled.example_files("deepspeed/zero2") == ["examples/deepspeed/zero2.json"]
    assert bundled.example_files("data") == [f for f in bundle_files() if f.startswith("data/")]
    assert len(bundled.example_files("data")) == 9  # the eight datasets and their card
    assert bundled.example_files("demo") == [
        "examples/demo.py", "examples/quickstart.yaml", "data/corpus_vi_eval.jsonl", "data/alpaca_vi.jsonl",
        "data/sharegpt_vi.jsonl", "data/README.md"]


def test_an_unknown_example_is_one_line(tmp_path, capsys):
    assert main(["examples", "copy", "quikstart", str(tmp_path)]) == 2
    assert capsys.readouterr().err == "error: no example named 'quikstart'; `vitune examples list` shows the 21 examples\n"
    assert list(tmp_path.iterdir()) == []


def test_every_example_an_error_message_names_is_bundled():
    """Error messages name examples through bundled.example_hint (a path and the command that
    copies it): each name used in the source must be an example, and no message names an
    examples/ path any other way."""
    src = ROOT / "src" / "vitune"
    used, raw = set(), []
    for path in src.rglob("*.py"):
        if BUNDLE in path.parents:
            continue
        text = path.read_text(encoding="utf-8")
        used |= set(re.findall(r"example_hint\('([^']+)'\)", text))
        raw += [f"{path.name}: {m}" for m in re.findall(r"(?:Error|raise)\([^)]*examples/[\w/.-]+", text)]
    assert used == {"deepspeed/zero2", "fsdp/fsdp2"}
    assert raw == []
    assert bundled.example_hint("fsdp/fsdp2") == "examples/fsdp/fsdp2.yaml, from `vitune examples copy fsdp/fsdp2`"


def test_vitune_version_comes_from_one_place(capsys):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "version" not in project["project"] and project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "vitune.__version__"}
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"vitune {vitune.__version__}\n"


# ------------------------------------------------------------ the wheel, outside the checkout


def sh(args: list, cwd: Path, env: dict, timeout: int = 600) -> str:
    done = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args}: exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.mark.slow
def test_the_wheel_installs_in_a_fresh_environment_and_runs_the_quick_start_outside_the_checkout(tmp_path):
    """`python -m build` makes the sdist and, from it, the wheel; the wheel and its dependencies
    (constraints.txt, as `make install`) go into a new virtual environment, and the README's path
    runs from an empty folder: --help, --version, examples copy, init-model, a 2-step train, chat,
    data inspect."""
    import torch

    dist = tmp_path / "dist"
    sh([sys.executable, "-m", "build", "--outdir", dist, ROOT], tmp_path, dict(os.environ))
    wheel = dist / f"vitune-{vitune.__version__}-py3-none-any.whl"
    assert sorted(p.name for p in dist.iterdir()) == [wheel.name, f"vitune-{vitune.__version__}.tar.gz"]
    with zipfile.ZipFile(wheel) as zf:
        packaged = sorted(n.removeprefix("vitune/bundled/") for n in zf.namelist()
                          if n.startswith("vitune/bundled/") and not n.endswith("__init__.py"))
    assert packaged == bundle_files()

    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    sh([sys.executable, "-m", "venv", venv], tmp_path, env)
    pip = [venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-compile", "--disable-pip-version-check"]
    # the CPU build this environment runs (a plain `torch` would pull the multi-GB CUDA build; see the Makefile)
    sh([*pip, f"torch=={torch.__version__.split('+')[0]}"], tmp_path, env)
    sh([*pip, wheel, "-c", ROOT / "constraints.txt"], tmp_path, env)

    work = tmp_path / "work"
    work.mkdir()
    env = {**env, "PATH": f"{venv / 'bin'}{os.pathsep}{env['PATH']}", "HF_HUB_OFFLINE": "1"}
    where = sh(["python", "-c", "import vitune, sys; print(vitune.__file__)"], work, env)
    assert where.startswith(str(venv)), where  # the installed package, not the checkout's
    assert "examples" in sh(["vitune", "--help"], work, env)
    assert sh(["vitune", "--version"], work, env) == f"vitune {vitune.__version__}\n"
    sh(["vitune", "examples", "copy", "tiny", "."], work, env)
    sh(["vitune", "init-model", "--arch", "llama", "--out", "runs/tiny-llama"], work, env)
    sh(["vitune", "train", "examples/tiny.yaml", "--set", "train.max_steps=2", "--set", "train.output_dir=runs/tiny"],
       work, env)
    summary = json.loads((work / "runs" / "tiny" / "summary.json").read_text(encoding="utf-8"))
    assert (summary["steps"], summary["stage"]) == (2, "sft")
    answer = sh(["vitune", "chat", "runs/tiny", "--prompt", "Xin chào", "--max-new-tokens", "8"], work, env)
    assert answer.strip()
    seen = json.loads(sh(["vitune", "data", "inspect", "examples/tiny.yaml", "--json"], work, env))
    assert (seen["rows_read"], seen["rows_kept"]) == (40, 40)
