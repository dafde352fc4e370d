"""Every folder and file vitune writes has the mode the user's umask gives (755 / 644 under umask 022),
so that another account, a serving container with another uid or a shared team folder can read it:
safetensors writes its files 0600 and tempfile.mkdtemp its folders 0700 unless vitune says otherwise."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from vitune.export.gguf import export_gguf
from vitune.export.merge import merge_run
from vitune.models import gguf
from vitune.models.permissions import umask_modes
from vitune.models.vocab import extend_vocabulary

from conftest import ROOT, train_run, write_config


@pytest.fixture(autouse=True)
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture(scope="module")
def lora_run(tiny_llama, tmp_path_factory) -> Path:
    old = os.umask(0o022)  # a module fixture runs before the autouse one
    try:
        return train_run(tmp_path_factory.mktemp("perm"), tiny_llama, "lora")
    finally:
        os.umask(old)


def modes(path: Path) -> dict[str, str]:
    """{path under `path`: its permission bits in octal}, `path` itself as "."."""
    items = [path, *path.rglob("*")] if path.is_dir() else [path]
    return {str(p.relative_to(path)) if p != path else ".": oct(stat.S_IMODE(os.lstat(p).st_mode)) for p in items}


def expected(path: Path) -> dict[str, str]:
    items = [path, *path.rglob("*")] if path.is_dir() else [path]
    return {str(p.relative_to(path)) if p != path else ".": "0o755" if p.is_dir() else "0o644" for p in items}


def test_a_runs_adapter_and_every_file_of_the_run_are_644_in_755_folders(lora_run):
    assert modes(lora_run / "adapter_model.safetensors") == {".": "0o644"}
    assert modes(lora_run) == expected(lora_run)


def test_a_merged_folder_is_755_with_644_files(lora_run, tmp_path):
    merge_run(lora_run, tmp_path / "merged")
    found = modes(tmp_path / "merged")
    assert found["."] == "0o755" and found["model.safetensors"] == "0o644"
    assert found == expected(tmp_path / "merged")


def test_an_extended_vocabulary_folder_is_755_with_644_files(tiny_llama, tmp_path):
    extend_vocabulary(str(tiny_llama), [str(ROOT / "data" / "alpaca_vi.jsonl")], 40, tmp_path / "extended")
    found = modes(tmp_path / "extended")
    assert found["."] == "0o755" and found["model.safetensors"] == "0o644" and found["tokenizer.json"] == "0o644"
    assert found == expected(tmp_path / "extended")


def test_a_gguf_file_and_its_converted_cache_folder_are_644_and_755(tiny_llama, tmp_path):
    export_gguf(tiny_llama, tmp_path / "tiny.gguf", "f32")
    assert modes(tmp_path / "tiny.gguf") == {".": "0o644"}
    folder, converted, _ = gguf.cached_conversion(tmp_path / "tiny.gguf", cache_dir=tmp_path / "cache")
    found = modes(folder)
    assert converted and found["."] == "0o755" and found["model.safetensors"] == "0o644"
    assert found == expected(folder)


def test_umask_modes_follows_the_umask_and_keeps_what_its_owner_may_run(tmp_path):
    (tmp_path / "folder").mkdir(mode=0o700)
    (tmp_path / "folder" / "weights").write_bytes(b"w")
    os.chmod(tmp_path / "folder" / "weights", 0o600)
    (tmp_path / "folder" / "tool").write_bytes(b"#!/bin/sh\n")
    os.chmod(tmp_path / "folder" / "tool", 0o700)
    os.umask(0o027)
    umask_modes(tmp_path / "folder")
    assert modes(tmp_path / "folder") == {".": "0o750", "weights": "0o640", "tool": "0o750"}


def test_a_tiny_model_folder_is_755_with_644_files(tmp_path):
    from vitune.models.tiny import init_tiny_model

    out = init_tiny_model("llama", tmp_path / "tiny", seed=0)
    assert modes(out) == expected(out)
    assert modes(out)["model.safetensors"] == "0o644"


def test_a_checkpoint_saved_while_training_is_755_with_644_files(tiny_llama, tmp_path, monkeypatch):
    """A run stopped after a checkpoint never reaches the final save, which fixes the whole folder:
    the checkpoint must be right on its own (the final save's fix is switched off here)."""
    from vitune.cli import main
    from vitune.train import sharding

    monkeypatch.setattr(sharding, "umask_modes", lambda path: None)
    out = tmp_path / "run"
    config = write_config(
        tmp_path / "run.yaml", model={"name_or_path": str(tiny_llama)}, method={"type": "lora"},
        data={"train": [{"path": str(ROOT / "data" / "alpaca_vi.jsonl"), "max_samples": 8}], "max_length": 128},
        train={"max_steps": 1, "save_steps": 1, "micro_batch_size": 4, "output_dir": str(out), "report_to": ["none"]},
    )
    assert main(["train", str(config)]) == 0
    checkpoint = out / "checkpoint-1"
    assert modes(checkpoint) == expected(checkpoint)
    assert modes(checkpoint)["adapter_model.safetensors"] == "0o644"
