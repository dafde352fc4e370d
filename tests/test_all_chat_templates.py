"""Every chat template shipped in llama.cpp's models/templates/ (the llama-cpp-python sdist the
other tests use), with `template: auto`, with and without a system prompt, on Llama 3's real
128k vocabulary with the templates' markers added as special tokens (as the models have them).

Each template either trains every answer plus a marker chat stops on, or is refused in one
line: at start-up (a template that cannot render a plain conversation) or per row (a
system prompt the template refuses or leaves out, with the fix named).
"""

from __future__ import annotations

import re
from collections import Counter

import pytest

from real_assets import new_tokenizer, with_chat_template, _or_skip
from test_real_tokenizers import trained_texts
from test_templates import A1, A2, Q1, REFERENCE, SYSTEM
from vitune.data import byte_bpe
from vitune.data.records import Conversation, Message
from vitune.data.templates import TemplateRefused, resolve_template
from vitune.data.tokenize import tokenize_conversations
from vitune.errors import ConfigError

# What vitune does with each template: trained (its own end-of-turn marker), eos (it writes
# nothing after an answer: the tokenizer's EOS is added and trained), refused (at start-up),
# and ", no system" where rows with a system prompt are refused with the data.system_prompt fix.
EXPECTED = {
    "Apertus-8B-Instruct": "eos",
    "Apriel-1.6-15b-Thinker-fixed": "eos",
    "Bielik-11B-v3.0-Instruct": "trained",
    "ByteDance-Seed-OSS": "trained",
    "Cohere2MoE": "trained",
    "CohereForAI-c4ai-command-r-plus-tool_use": "refused",
    "CohereForAI-c4ai-command-r7b-12-2024-tool_use": "trained",
    "GLM-4.6": "eos",
    "GLM-4.7-Flash": "eos",
    "GigaChat3-10B-A1.8B": "trained",
    "GigaChat3.1-10B-A1.8B": "trained",
    "HuggingFaceTB-SmolLM3-3B": "trained",
    "Kimi-K2-Instruct": "trained",
    "Kimi-K2-Thinking": "trained",
    "Kimi-K3": "trained",
    "LFM2-8B-A1B": "trained",
    "LFM2.5-8B-A1B": "trained",
    "LFM2.5-Instruct": "trained",
    "MiMo-VL": "trained",
    "MiniMax-M1": "trained",
    "MiniMax-M2": "trained",
    "MiniMax-M3": "trained",
    "Mistral-Small-3.2-24B-Instruct-2506": "trained",
    "NVIDIA-Nemotron-3-Nano-30B-A3B-BF16": "trained",
    "NVIDIA-Nemotron-Nano-v2": "trained",
    "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use": "refused",
    "NousResearch-Hermes-3-Llama-3.1-8B-tool_use": "refused",
    "Qwen-QwQ-32B": "trained",
    "Qwen-Qwen2.5-7B-Instruct": "trained",
    "Qwen-Qwen3-0.6B": "trained",
    "Qwen3-Coder": "trained",
    "Qwen3.5-4B": "trained",
    "Reka-Edge": "trained",
    "Spark2.5": "trained",
    "StepFun3.5-Flash": "trained",
    "deepseek-ai-DeepSeek-R1-Distill-Llama-8B": "trained",
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B": "trained",
    "deepseek-ai-DeepSeek-V3.1": "trained",
    "deepseek-ai-DeepSeek-V3.2": "trained",
    "deepseek-ai-DeepSeek-V4-Flash-0731": "trained",
    "deepseek-ai-DeepSeek-V4": "trained",
    "fireworks-ai-llama-3-firefunction-v2": "refused",
    "google-gemma-2-2b-it": "trained, no system",
    "google-gemma-4-31B-it-interleaved": "trained",
    "google-gemma-4-31B-it": "trained",
    "ibm-granite-granite-3.3-2B-Instruct": "trained",
    "ibm-granite-granite-4.0": "trained",
    "ibm-granite-granite-4.1": "trained",
    "inclusionai-ling-3.0-flash": "trained",
    "llama-cpp-deepseek-r1": "trained",
    "llama-cpp-rwkv-world": "eos",
    "meetkai-functionary-medium-v3.1": "trained",
    "meetkai-functionary-medium-v3.2": "trained",
    "meta-llama-Llama-3.1-8B-Instruct": "trained",
    "meta-llama-Llama-3.2-3B-Instruct": "trained",
    "meta-llama-Llama-3.3-70B-Instruct": "trained",
    "microsoft-Phi-3.5-mini-instruct": "trained",
    "mistralai-Ministral-3-14B-Reasoning-2512": "trained",
    "mistralai-Mistral-Nemo-Instruct-2407": "trained, no system",
    "moonshotai-Kimi-K2": "trained",
    "muse-glimmer": "trained",
    "openai-gpt-oss-120b": "eos",
    "openbmb-MiniCPM5-1B": "trained",
    "poolside-Laguna-S-2.1": "trained",
    "poolside-Laguna-XS-2.1": "trained",
    "poolside-Laguna-XS.2": "trained",
    "tencent-Hy3": "eos",
    "unsloth-Apriel-1.5": "trained",
    "unsloth-mistral-Devstral-Small-2507": "trained",
    "upstage-Solar-Open-100B": "trained",}

# <|im_end|>, <｜end▁of▁sentence｜>, <end_of_turn>, </assistant>, [INST], Gemma 4's <|turn> <turn|>, MiniMax's ]~b] [e~[
MARKER = re.compile(r"<\|[^<>|\s]{1,40}\|>|<｜[^｜]{1,40}｜>|</?[A-Za-z_][\w:.-]{0,30}>|\[/?INST\]|<\|[a-z_]+>|<[a-z_]+\|>"
                    r"|\][~!][a-z]\]|\[[a-z][~!]\[")


@pytest.fixture(scope="module")
def marker_tokenizer(sdist_chat_templates):
    markers = sorted({m for source in sdist_chat_templates.values() for m in MARKER.findall(source)})
    tok = _or_skip(new_tokenizer, "llama-bpe", tuple(markers))
    byte_bpe.encoder_for(tok)  # set up once; the per-template copies share it
    return tok


def test_every_template_of_the_sdist_is_tried(sdist_chat_templates):
    assert sorted(sdist_chat_templates) == sorted(EXPECTED)
    kinds = Counter(kind.split(",")[0] for kind in EXPECTED.values())
    assert dict(kinds) == {"trained": 59, "eos": 7, "refused": 4}
    assert sum("no system" in kind for kind in EXPECTED.values()) == 2


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_template_trains_every_answer_with_a_stop_marker_or_is_refused_in_one_line(
    name, sdist_chat_templates, marker_tokenizer
):
    kind = EXPECTED[name]
    tok = with_chat_template(marker_tokenizer, sdist_chat_templates[name])
    if kind == "refused":
        with pytest.raises(ConfigError) as info:
            resolve_template("auto", tok)
        message = str(info.value)
        assert "\n" not in message
        assert message.startswith("the tokenizer's chat template cannot render a plain user/assistant conversation: ")
        assert message.endswith("choose a built-in template with model.template "
                                "(llama2, llama3, mistral, chatml, vistral, vinallama, vicuna, vietcuna, gemma, alpaca)")
        return
    template = resolve_template("auto", tok)
    for system in (None, SYSTEM):
        conv = Conversation(REFERENCE.messages, system=system)
        (row,) = tokenize_conversations([conv], tok, template, keep_refusals=True)
        if system and "no system" in kind:
            assert isinstance(row, TemplateRefused) and row.reason == "template refused"
            assert "\n" not in row.detail
            assert row.detail.endswith("it takes no system prompt: set data.system_prompt: fold (into the first user turn) or drop")
            # data.system_prompt: fold
            conv = Conversation([Message("user", f"{SYSTEM}\n\n{Q1}"), *REFERENCE.messages[1:]])
            (row,) = tokenize_conversations([conv], tok, template)
        texts = trained_texts(tok, row)
        assert len(texts) == 2, texts
        for text, answer in zip(texts, (A1, A2)):
            _, found, after = text.partition(answer)
            assert found == answer, (text, answer)
            assert any(stop in after for stop in template.stop_strings), (after, template.stop_strings)
            if kind.startswith("eos"):
                assert after in (tok.eos_token, "<|return|>")  # gpt-oss writes <|return|> after the last answer
    eos_notice = any("writes no end-of-turn marker" in n for n in template.notices)
    system_notice = any("takes no system prompt" in n for n in template.notices)
    assert (eos_notice, system_notice) == (kind.startswith("eos"), "no system" in kind)
