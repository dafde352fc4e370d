"""Built-in chat templates render the reference conversation of shared/ref/chat_formats.md
exactly, and their exported Jinja renders the same text."""

from __future__ import annotations

import pytest
from transformers.utils.chat_template_utils import _compile_jinja_template

from vitune.data.records import Conversation, Message
from vitune.data.templates import TEMPLATES, get_template
from vitune.errors import ConfigError

SYSTEM = "Bạn là trợ lý AI hữu ích."
Q1, A1 = "Thủ đô của Việt Nam là gì?", "Thủ đô của Việt Nam là Hà Nội."
Q2, A2 = "Còn thành phố lớn nhất?", "Thành phố lớn nhất là Thành phố Hồ Chí Minh."

EXPECTED = {
    "llama2": f"<s>[INST] <<SYS>>\n{SYSTEM}\n<</SYS>>\n\n{Q1} [/INST] {A1} </s><s>[INST] {Q2} [/INST] {A2} </s>",
    "llama3": (
        f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{SYSTEM}<|eot_id|>"
        f"<|start_header_id|>user<|end_header_id|>\n\n{Q1}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n{A1}<|eot_id|>"
        f"<|start_header_id|>user<|end_header_id|>\n\n{Q2}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n{A2}<|eot_id|>"
    ),
    "mistral": f"<s>[INST] {SYSTEM}\n\n{Q1} [/INST]{A1}</s>[INST] {Q2} [/INST]{A2}</s>",
    "chatml": (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{Q1}<|im_end|>\n<|im_start|>assistant\n{A1}<|im_end|>\n"
        f"<|im_start|>user\n{Q2}<|im_end|>\n<|im_start|>assistant\n{A2}<|im_end|>\n"
    ),
    "vicuna": f"{SYSTEM} USER: {Q1} ASSISTANT: {A1}</s>USER: {Q2} ASSISTANT: {A2}</s>",
    "vietcuna": f"{SYSTEM}\n\n### Human: {Q1}\n\n### Assistant: {A1}</s>\n\n### Human: {Q2}\n\n### Assistant: {A2}</s>",
    # Gemma 3's own template puts the system prompt at the start of the first user turn
    "gemma": (
        f"<bos><start_of_turn>user\n{SYSTEM}\n\n{Q1}<end_of_turn>\n<start_of_turn>model\n{A1}<end_of_turn>\n"
        f"<start_of_turn>user\n{Q2}<end_of_turn>\n<start_of_turn>model\n{A2}<end_of_turn>\n"
    ),
}
EXPECTED["vistral"] = EXPECTED["llama2"]
EXPECTED["vinallama"] = EXPECTED["chatml"]

REFERENCE = Conversation(
    [Message("user", Q1), Message("assistant", A1), Message("user", Q2), Message("assistant", A2)], system=SYSTEM
)


def jinja_render(template, conv: Conversation, add_generation_prompt=False) -> str:
    messages = [{"role": "system", "content": conv.system}] if conv.system is not None else []
    for m in conv.messages:
        messages.append({"role": m.role, "content": m.content, **({"input": m.input} if m.input else {})})
    return _compile_jinja_template(template.jinja()).render(messages=messages, add_generation_prompt=add_generation_prompt)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_reference_conversation_renders_exactly(name):
    assert get_template(name).render(REFERENCE, [True] * 4).text == EXPECTED[name]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_exported_jinja_renders_the_same_text(name):
    template = get_template(name)
    assert jinja_render(template, REFERENCE) == template.render(REFERENCE, [True] * 4).text
    no_system = Conversation(REFERENCE.messages[:3])
    assert jinja_render(template, no_system, add_generation_prompt=True) == template.prompt(no_system)


TRAINED = {
    "llama2": " {a} </s>", "vistral": " {a} </s>", "llama3": "{a}<|eot_id|>", "mistral": "{a}</s>",
    "chatml": "{a}<|im_end|>", "vinallama": "{a}<|im_end|>", "vicuna": " {a}</s>", "vietcuna": " {a}</s>",
    "alpaca": "{a}</s>", "gemma": "{a}<end_of_turn>",
}


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_trained_spans_are_the_answers_with_their_end_of_turn(name):
    rendered = get_template(name).render(REFERENCE, [False, True, False, True])
    assert [rendered.text[a:b] for a, b in rendered.spans] == [TRAINED[name].format(a=a) for a in (A1, A2)]


def test_mask_history_leaves_earlier_answers_untrained():
    rendered = get_template("chatml").render(REFERENCE, [False, False, False, True])
    assert [rendered.text[a:b] for a, b in rendered.spans] == [f"{A2}<|im_end|>"]


def test_alpaca_renders_the_stanford_prompt_with_and_without_input():
    alpaca = get_template("alpaca")
    with_input = Conversation([Message("user", "Dịch sang tiếng Anh.", input="Xin chào"), Message("assistant", "Hello")])
    assert alpaca.render(with_input, [False, True]).text == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nDịch sang tiếng Anh.\n\n"
        "### Input:\nXin chào\n\n### Response:\nHello</s>"
    )
    plain = Conversation([Message("user", "Kể tên một loại quả."), Message("assistant", "Quả xoài.")])
    assert alpaca.render(plain, [False, True]).text == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nKể tên một loại quả.\n\n### Response:\nQuả xoài.</s>"
    )
    assert jinja_render(alpaca, with_input) == alpaca.render(with_input, [False, True]).text


def test_input_joins_the_instruction_in_other_templates():
    conv = Conversation([Message("user", "Dịch sang tiếng Anh.", input="Xin chào"), Message("assistant", "Hello")])
    assert get_template("chatml").render(conv, [False, True]).text == (
        "<|im_start|>user\nDịch sang tiếng Anh.\n\nXin chào<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
    )


def test_default_system_prompts():
    conv = Conversation([Message("user", "Chào"), Message("assistant", "Chào bạn")])
    assert get_template("vistral").render(conv, [False, True]).text == (
        "<s>[INST] <<SYS>>\nBạn là một trợ lí Tiếng Việt nhiệt tình và trung thực. Hãy luôn trả lời một cách "
        "hữu ích nhất có thể, đồng thời giữ an toàn.\n<</SYS>>\n\nChào [/INST] Chào bạn </s>"
    )
    assert get_template("vinallama").render(conv, [False, True]).text.startswith(
        "<|im_start|>system\nBạn là một trợ lí AI hữu ích. Hãy trả lời người dùng một cách chính xác.<|im_end|>\n"
    )
    assert get_template("llama2").render(conv, [False, True]).text == "<s>[INST] Chào [/INST] Chào bạn </s>"


def test_unknown_template_name_lists_the_known_ones():
    with pytest.raises(ConfigError) as info:
        get_template("zephyr")
    assert str(info.value) == (
        "model.template = 'zephyr' is not a known template; use auto or one of "
        "llama2, llama3, mistral, chatml, vistral, vinallama, vicuna, vietcuna, gemma, alpaca"
    )
