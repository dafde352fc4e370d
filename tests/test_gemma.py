"""Gemma 3: the tiny random model of its architecture, the `gemma` chat template on the real
Gemma-3-270M tokenizer (exact ids and masks), the preset, and a base model without a chat template
that SFT turns into one that ends its answers with <end_of_turn>."""

from __future__ import annotations

import json
import shutil

import pytest
from transformers import AutoConfig, AutoTokenizer

from test_real_tokenizers import labelled_runs, trained_texts
from test_templates import A1, A2, REFERENCE, jinja_render
from vitune.cli import main
from vitune.data.records import Conversation
from vitune.data.templates import get_template, resolve_template, stop_token_ids
from vitune.data.tokenize import tokenize_conversations
from vitune.models.architecture import read_architecture
from vitune.models.tiny import GEMMA3_LAYERS

from conftest import write_config, write_jsonl


def test_tiny_gemma3_has_the_real_attention_layout(tiny_models):
    config = AutoConfig.from_pretrained(tiny_models["gemma3"])
    assert config.model_type == "gemma3_text" and config.architectures == ["Gemma3ForCausalLM"]
    assert config.layer_types == GEMMA3_LAYERS == ["sliding_attention"] * 3 + ["full_attention"]
    assert (config.sliding_window, config.tie_word_embeddings, config.head_dim) == (32, True, 64)
    tok = AutoTokenizer.from_pretrained(tiny_models["gemma3"])
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<bos>", "<eos>", "<pad>")
    assert tok.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>"]) == [14, 15]
    assert tok.chat_template == get_template("gemma").jinja()
    # the other families' tokenizers keep their ids: Gemma's tokens come after the shared ones
    assert len(AutoTokenizer.from_pretrained(tiny_models["llama"])) == len(tok) == 4096
    assert AutoTokenizer.from_pretrained(tiny_models["llama"]).convert_tokens_to_ids("<|eot_id|>") == 8


def test_sliding_window_option(tmp_path):
    assert main(["init-model", "--arch", "mistral", "--sliding-window", "8", "--out", str(tmp_path / "m")]) == 0
    assert json.loads((tmp_path / "m" / "config.json").read_text())["sliding_window"] == 8


@pytest.mark.parametrize("args, message", [
    (["--arch", "llama", "--sliding-window", "8"],
     "error: --sliding-window 8: llama has no sliding-window attention; use it with --arch mistral or gemma3"),
    (["--arch", "gemma3", "--sliding-window", "0"], "error: --sliding-window 0: give a number of tokens of at least 1"),
    (["--preset", "gemma3-270m", "--sliding-window", "8"],
     "error: give --sliding-window (a tiny random model) or --preset (a real model), not both"),
])
def test_sliding_window_refusals(tmp_path, capsys, args, message):
    assert main(["init-model", *args, "--out", str(tmp_path / "m")]) == 2
    assert capsys.readouterr().err.strip() == message
    assert not (tmp_path / "m").exists()


# ---------------------------------------------------------------- the real Gemma-3-270M


def test_gemma3_270m_is_the_model_the_preset_describes(gemma3):
    config = AutoConfig.from_pretrained(gemma3)
    assert read_architecture(config).total_params == 268_098_176
    assert (config.vocab_size, config.sliding_window, config.layer_types.count("full_attention")) == (262_144, 512, 3)
    assert AutoTokenizer.from_pretrained(gemma3).chat_template is None  # a base model: no chat template


def test_gemma_template_ids_and_masks_on_the_real_tokenizer(gemma3):
    tok = AutoTokenizer.from_pretrained(gemma3)
    template = get_template("gemma")
    (row,) = tokenize_conversations([REFERENCE], tok, template)
    assert row.input_ids == tok(template.render(REFERENCE, [True] * 4).text, add_special_tokens=False).input_ids
    # <bos> <start_of_turn> user \n ... : one <bos>, and the markers are single special tokens
    assert row.input_ids[:4] == [2, 105, 2364, 107] and row.input_ids.count(2) == 1
    assert labelled_runs(row.labels) == [(27, 38), (53, 66)]
    assert trained_texts(tok, row) == [f"{A1}<end_of_turn>", f"{A2}<end_of_turn>"]
    assert row.input_ids[27:38] == [1214, 237417, 79162, 5042, 33154, 11774, 3244, 58132, 64875, 236761, 106]
    # the "\n" after <end_of_turn> and the next "<start_of_turn>model\n" are not trained
    assert row.input_ids[38:42] == [107, 105, 2364, 107]
    assert stop_token_ids(tok, template) == [106, 1]  # <end_of_turn>, then <eos>


def test_gemma_template_renders_as_googles_own(sdist_chat_templates):
    """Without a system prompt (Gemma 2's template refuses one) vitune's `gemma` is Gemma 2's Jinja."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    google = _compile_jinja_template(sdist_chat_templates["google-gemma-2-2b-it"])
    conv = Conversation(REFERENCE.messages)
    messages = [{"role": m.role, "content": m.content} for m in conv.messages]
    ours = get_template("gemma")
    assert google.render(messages=messages, bos_token="<bos>") == ours.render(conv, [True] * 4).text
    assert google.render(messages=messages[:3], bos_token="<bos>", add_generation_prompt=True) == \
        ours.prompt(Conversation(conv.messages[:3]))
    assert jinja_render(ours, REFERENCE) == ours.render(REFERENCE, [True] * 4).text


def test_sft_writes_the_template_into_a_base_models_tokenizer(tiny_models, tmp_path):
    """A base model has no chat template: `template: gemma` trains one in, and the run's tokenizer
    carries it, so chat, serve and export render and stop as training did."""
    base = tmp_path / "base"
    shutil.copytree(tiny_models["gemma3"], base)
    spec = json.loads((base / "tokenizer_config.json").read_text())
    spec.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(spec))
    assert AutoTokenizer.from_pretrained(base).chat_template is None
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": f"Câu hỏi {i}?", "output": f"Trả lời {i}."} for i in range(8)])
    cfg = write_config(tmp_path / "run.yaml", model={"name_or_path": str(base), "template": "gemma"},
                       data={"train": [{"path": str(data)}], "max_length": 64},
                       train={"max_steps": 1, "output_dir": str(tmp_path / "run"), "report_to": ["none"]})
    assert main(["train", str(cfg)]) == 0
    tok = AutoTokenizer.from_pretrained(tmp_path / "run")
    assert tok.chat_template == get_template("gemma").jinja()
    template = resolve_template("auto", tok)
    assert template.name == "gemma" and stop_token_ids(tok, template) == [15, 13]  # <end_of_turn>, <eos>
