"""Loading runs no code that came with a model, a checkpoint or a config: trust_remote_code
stays off, weights come from safetensors (pickle only when the user allows it), and YAML is
read with the safe loader."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vitune.cli import main
from vitune.config import MethodConfig, ModelConfig, apply_override
from vitune.models.loading import check_safe_weights, load_model, load_tokenizer
from vitune.train.checkpoint import MARKER

from conftest import ROOT, write_config


def refusal(where, files: str = "") -> str:
    found = f" ({files})" if files else ""
    return (f"error: {where} has no safetensors weights, only pickle files{found}; loading pickle can run arbitrary "
            "code. Use safetensors weights, or if you trust their source allow pickle: model.allow_pickle: true "
            "(vitune chat: --allow-pickle)")


@pytest.fixture(scope="module")
def pickle_model(tiny_llama, tmp_path_factory) -> Path:
    """The tiny Llama with its weights as pytorch_model.bin (a pickle) instead of safetensors."""
    folder = tmp_path_factory.mktemp("pickled") / "model"
    shutil.copytree(tiny_llama, folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


def test_remote_code_stays_off_and_weights_come_from_safetensors_by_default(tiny_llama, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    calls = {}
    for cls, name in ((AutoTokenizer, "tokenizer"), (AutoModelForCausalLM, "model")):
        real = cls.from_pretrained

        def recording(path, *args, _real=real, _name=name, **kwargs):
            calls[_name] = kwargs
            return _real(path, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", recording)
    model_cfg = ModelConfig(name_or_path=str(tiny_llama))
    load_tokenizer(model_cfg.name_or_path, model_cfg.trust_remote_code)
    load_model(model_cfg, MethodConfig(type="full"))
    assert calls["tokenizer"]["trust_remote_code"] is False
    assert calls["model"]["trust_remote_code"] is False
    assert calls["model"]["use_safetensors"] is True


def test_a_model_with_pickle_weights_only_is_refused_unless_allowed(pickle_model, tmp_path, capsys):
    out = tmp_path / "run"
    config = write_config(
        tmp_path / "run.yaml",
        model={"name_or_path": str(pickle_model)},
        method={"type": "full"},
        data={"train": [{"path": str(ROOT / "data" / "alpaca_vi.jsonl"), "max_samples": 8}], "max_length": 128},
        train={"output_dir": str(out), "max_steps": 1, "report_to": ["none"]},
    )
    assert main(["train", str(config)]) == 2
    assert capsys.readouterr().err.strip() == refusal(pickle_model, "pytorch_model.bin")
    assert not out.exists()

    assert main(["chat", str(pickle_model), "--prompt", "Xin chào"]) == 2
    assert capsys.readouterr().err.strip() == refusal(pickle_model, "pytorch_model.bin")
    assert main(["chat", str(pickle_model), "--prompt", "Xin chào", "--max-new-tokens", "2", "--allow-pickle"]) == 0


def test_chat_refuses_a_pickle_adapter_and_a_pickle_base_model(tiny_llama, pickle_model, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama / name, adapter / name)
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_llama)}))
    (adapter / "adapter_model.bin").write_bytes(b"never unpickled")
    assert main(["chat", str(adapter), "--prompt", "Xin chào"]) == 2
    assert capsys.readouterr().err.strip() == refusal(adapter, "adapter_model.bin")

    (adapter / "adapter_model.bin").rename(adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(pickle_model)}))
    assert main(["chat", str(adapter), "--prompt", "Xin chào"]) == 2
    assert capsys.readouterr().err.strip() == refusal(pickle_model, "pytorch_model.bin")


def test_a_hub_repo_with_pickle_weights_only_gets_the_same_line(tmp_path, monkeypatch):
    """A Hub repo in the local cache (offline) that has config.json and pytorch_model.bin only."""
    import huggingface_hub.constants

    from vitune.errors import UserError

    snapshot = tmp_path / "models--someone--pickled" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (tmp_path / "models--someone--pickled" / "refs").mkdir()
    (tmp_path / "models--someone--pickled" / "refs" / "main").write_text("0" * 40)
    (snapshot / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
        "num_key_value_heads": 1, "num_hidden_layers": 1, "vocab_size": 64}))
    (snapshot / "pytorch_model.bin").write_bytes(b"never unpickled")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(UserError) as caught:
        load_model(ModelConfig(name_or_path="someone/pickled"), MethodConfig(type="full"))
    assert f"error: {caught.value}" == refusal("someone/pickled")


def test_resume_refuses_a_checkpoint_with_pickle_weights(tiny_llama, tmp_path, capsys):
    out = tmp_path / "run"
    checkpoint = out / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    for name in (MARKER, "trainer_state.json", "pytorch_model.bin", "optimizer.pt", "rng_state.pth"):
        (checkpoint / name).write_bytes(b"never unpickled")
    config = write_config(
        tmp_path / "run.yaml",
        model={"name_or_path": str(tiny_llama)},
        data={"train": [{"path": str(ROOT / "data" / "alpaca_vi.jsonl")}]},
        train={"output_dir": str(out), "resume": "auto"},
    )
    assert main(["train", str(config)]) == 2
    assert capsys.readouterr().err.strip() == refusal(checkpoint, "pytorch_model.bin")


def test_trainer_state_files_are_not_weights(tmp_path):
    """optimizer.pt, scheduler.pt, rng_state*.pth and training_args.bin are pickle files Trainer
    writes beside the weights (and reads back with weights_only=True): they neither pass nor fail a folder."""
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "rng_state_1.pth", "training_args.bin"):
        (tmp_path / name).write_bytes(b"")
    check_safe_weights(tmp_path, allow_pickle=False)  # no weights at all: from_pretrained says so
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    check_safe_weights(tmp_path, allow_pickle=False)


def test_a_python_tag_in_the_config_is_a_config_error_and_runs_nothing(tmp_path, capsys):
    touched = tmp_path / "touched"
    config = tmp_path / "evil.yaml"
    config.write_text(f'model:\n  name_or_path: !!python/object/apply:os.system ["touch {touched}"]\n')
    assert main(["train", str(config)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {config} line 2: not valid YAML (could not determine a constructor for the tag "
        "'tag:yaml.org,2002:python/object/apply:os.system')"
    )
    # an override is parsed with the safe loader too: the tag stays text
    raw: dict = {}
    apply_override(raw, f'model.name_or_path=!!python/object/apply:os.system ["touch {touched}"]')
    assert raw == {"model": {"name_or_path": f'!!python/object/apply:os.system ["touch {touched}"]'}}
    assert not touched.exists()
