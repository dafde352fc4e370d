"""Shared fixtures: tiny models of real architectures, built once per test session, and real
tokenizers and chat templates (tests/real_assets.py: downloaded once, cached outside the repository)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

from real_assets import llama_bpe, llama_spm, qwen2, real_chat_template, real_tokenizer, sdist_chat_templates  # noqa: F401 (fixtures)
from real_model import gemma3, gemma3_gguf, smollm2, smollm2_gguf  # noqa: F401 (fixtures)
from vitune.cli import main, quiet_libraries

quiet_libraries()
# Prepared-data cache of this test session only, so runs never see each other's entries.
os.environ["VITUNE_CACHE_DIR"] = tempfile.mkdtemp(prefix="vitune-cache-")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def hub_offline():
    """No test may wait on the network: a Hub id fails at once, as on CI's offline machine (a test
    of what vitune says when the Hub cannot be reached sets itself online: test_push)."""
    import datasets.config
    import huggingface_hub.constants

    patch = pytest.MonkeyPatch()
    patch.setenv("HF_HUB_OFFLINE", "1")
    patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    patch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    yield
    patch.undo()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    from vitune.models.tiny import TINY_FAMILIES, init_tiny_model

    base = tmp_path_factory.mktemp("tiny")
    return {arch: init_tiny_model(arch, base / arch) for arch in TINY_FAMILIES}


@pytest.fixture(scope="session")
def tiny_llama(tiny_models) -> Path:
    return tiny_models["llama"]


def write_jsonl(path: Path, rows: list) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n")
    return path


def write_config(path: Path, **sections) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(sections, allow_unicode=True), encoding="utf-8")
    return path


def train_run(tmp_path: Path, model: Path, name: str, method: str = "lora", stage: str = "sft", data=None, **lora) -> Path:
    """A two-step tiny run on the bundled Alpaca data (or `data`); its run folder."""
    out = tmp_path / name
    config = write_config(
        tmp_path / f"{name}.yaml",
        model={"name_or_path": str(model)},
        method={"type": method, **({"lora": {"dropout": 0.0, **lora}} if method != "full" else {})},
        data={"train": [{"path": str(data or ROOT / "data" / "alpaca_vi.jsonl"), "max_samples": 16}], "max_length": 128},
        train={"stage": stage, "max_steps": 2, "micro_batch_size": 4, "learning_rate": 1e-2, "warmup_ratio": 0.0,
               "output_dir": str(out), "report_to": ["none"]},
    )
    assert main(["train", str(config)]) == 0
    return out
