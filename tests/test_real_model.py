"""A real pretrained model in the loop: SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file.

The model is converted once per machine (tests/real_model.py); one short LoRA run on it is
shared by the tests of its result (module fixture `lora_run`)."""

from __future__ import annotations

import json

import pytest
import torch

from vitune.cli import main
from vitune.config import validate_config
from vitune.data.records import Conversation, Message
from vitune.data.templates import resolve_template
from vitune.data.tokenize import tokenize_conversations
from vitune.models import gguf
from vitune.models.loading import load_tokenizer
from vitune.train.runner import run_training

from conftest import ROOT

DEFAULT_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def prompt_ids(tokenizer, text: str) -> torch.Tensor:
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)["input_ids"]


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.slow  # CI's 20-minute budget (fresh-clone durations, 2026-12-08); make test-all runs it
def test_the_gguf_is_converted_once_and_the_folder_gives_the_gguf_logits(smollm2_gguf, smollm2, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # the fixture converted it into <test cache>/models; a later use finds it there
    monkeypatch.setenv("VITUNE_CACHE_DIR", str(smollm2.parent.parent))
    monkeypatch.setattr(gguf, "_converted", {})
    said = []
    assert gguf.model_source(str(smollm2_gguf), say=said.append) == str(smollm2)
    assert said == [f"model: SmolLM2-135M-Instruct.Q4_1.gguf was converted before; loading {smollm2}"]
    marker = json.loads((smollm2 / gguf.MARKER).read_text())
    assert marker["architecture"] == "llama" and marker["sha256"] == gguf.file_sha256(smollm2_gguf)
    assert sorted(p.name for p in smollm2.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
        gguf.MARKER]
    config = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"

    folder_tok = AutoTokenizer.from_pretrained(smollm2)
    gguf_tok = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    text = "Thủ đô của Việt Nam là gì?"
    # 20 tokens for 7 syllables: the English-centric vocabulary Vietnamese pays for
    assert folder_tok(text).input_ids == gguf_tok(text).input_ids == [
        1082, 25275, 117, 24488, 235, 21637, 265, 25275, 117, 81, 10506, 25275, 225, 100, 18620, 303, 16739, 310,
        44730, 47]
    ids = prompt_ids(folder_tok, "What is the capital of France?")
    from_folder = AutoModelForCausalLM.from_pretrained(smollm2)
    from_gguf = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32)
    assert sum(p.numel() for p in from_folder.parameters()) == 134_515_008
    assert torch.equal(logits(from_folder, ids), logits(from_gguf, ids))


def test_template_auto_is_its_chatml_and_trains_each_answer_and_its_im_end(smollm2):
    tokenizer = load_tokenizer(str(smollm2))
    template = resolve_template("auto", tokenizer)
    assert template.stop_strings == ["<|im_end|>"]
    conv = Conversation([Message("user", "Xin chào"), Message("assistant", "Chào bạn!"),
                         Message("user", "Bạn khỏe không?"), Message("assistant", "Tôi khỏe.")])
    row = tokenize_conversations([conv], tokenizer, template)[0]
    assert tokenizer.decode(row.input_ids) == (
        DEFAULT_SYSTEM + "<|im_start|>user\nXin chào<|im_end|>\n<|im_start|>assistant\nChào bạn!<|im_end|>\n"
        "<|im_start|>user\nBạn khỏe không?<|im_end|>\n<|im_start|>assistant\nTôi khỏe.<|im_end|>\n")
    trained = [i for i, label in zip(row.input_ids, row.labels) if label != -100]
    assert tokenizer.decode(trained) == "Chào bạn!<|im_end|>Tôi khỏe.<|im_end|>"


@pytest.fixture(scope="module")
def lora_run(smollm2, tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "run"
    config = validate_config({
        "model": {"name_or_path": str(smollm2)},
        "method": {"type": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0}},
        "data": {"train": [{"path": str(ROOT / "data" / "alpaca_vi.jsonl"), "max_samples": 20}],
                 "val_size": 4, "max_length": 512},
        "train": {"max_steps": 6, "micro_batch_size": 1, "learning_rate": 1e-3, "output_dir": str(out),
                  "logging_steps": 1, "report_to": ["none"]},
    })
    return run_training(config, None)


@pytest.mark.slow  # its SmolLM2 run takes ~40 s; CI keeps test_gemma's and the GGUF real-model checks
def test_a_short_lora_run_lowers_the_held_out_loss(lora_run):
    s = lora_run.summary
    assert s["steps"] == 6
    assert s["eval_loss_end"] < 0.95 * s["eval_loss_start"]  # measured: 10.6% lower (2.282 -> 2.041)
    # one bin per step: the training loss of single steps is too noisy to compare; the held-out one is not
    assert (lora_run.report.rows_read, lora_run.report.rows_kept) == (20, 20)


def test_its_adapter_reloads_with_plain_peft_onto_the_converted_base(lora_run, smollm2):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    settings = json.loads((lora_run.output_dir / "adapter_config.json").read_text())
    assert settings["base_model_name_or_path"] == str(smollm2)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2), lora_run.output_dir).eval()
    ids = prompt_ids(AutoTokenizer.from_pretrained(lora_run.output_dir), "Thủ đô của Việt Nam là gì?")
    trained = lora_run.model.eval()
    assert torch.equal(logits(reloaded, ids), logits(trained, ids))


@pytest.mark.slow  # needs the ~40 s SmolLM2 run above
def test_chat_on_the_result_stops_at_im_end_and_prints_no_template_tokens(lora_run, capsys):
    from vitune.infer.chat import load_chat_model

    bot = load_chat_model(str(lora_run.output_dir))
    assert bot.stop_ids == [2]  # <|im_end|>
    assert main(["chat", str(lora_run.output_dir), "--prompt", "Thủ đô của Việt Nam là gì?",
                 "--max-new-tokens", "200"]) == 0
    answer = capsys.readouterr().out.strip()
    assert answer and "<|im" not in answer and "im_end" not in answer
    assert len(bot.tokenizer(answer).input_ids) < 150  # it stopped by itself, well before the limit


def test_the_base_model_answers_in_english_through_vitune_chat(smollm2, capsys):
    assert main(["chat", str(smollm2), "--prompt", "What is the capital of France?", "--max-new-tokens", "40"]) == 0
    assert capsys.readouterr().out == "The capital of France is Paris.\n"


@pytest.mark.slow  # CI's 20-minute budget (fresh-clone durations, 2026-12-08); make test-all runs it
def test_qlora_trains_it_in_4_bits_on_the_cpu(smollm2, tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    config = validate_config({
        "model": {"name_or_path": str(smollm2)},
        "method": {"type": "qlora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
        "data": {"train": [{"path": str(ROOT / "data" / "alpaca_vi.jsonl"), "max_samples": 8}],
                 "val_size": 2, "max_length": 256, "overflow": "truncate"},
        "train": {"max_steps": 2, "micro_batch_size": 1, "learning_rate": 1e-3, "output_dir": str(tmp_path / "run"),
                  "logging_steps": 1, "report_to": ["none"]},
    })
    result = run_training(config, None)
    linear4 = [m for m in result.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linear4) == 30 * 7  # every linear of the 30 blocks is NF4; the tied embedding is not
    assert result.summary["steps"] == 2
    assert result.summary["eval_loss_end"] < result.summary["eval_loss_start"]


def test_a_repetition_penalty_reaches_generate_only_when_asked(smollm2, monkeypatch):
    from vitune.infer.chat import load_chat_model

    bot = load_chat_model(str(smollm2))
    seen = []
    real = bot.model.generate
    monkeypatch.setattr(bot.model, "generate", lambda **kw: (seen.append(kw.get("repetition_penalty")), real(**kw))[1])
    question = [Message("user", "What is the capital of France?")]
    assert bot.answer(question, max_new_tokens=40) == "The capital of France is Paris."
    assert bot.answer(question, max_new_tokens=40, repetition_penalty=1.2) == "The capital of France is Paris."
    assert seen == [None, 1.2]
