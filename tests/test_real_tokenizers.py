"""Token ids and loss masks with real tokenizers and real models' chat templates.

Vocabularies (tests/real_assets.py, from llama.cpp's test files): Llama-2's 32k SentencePiece,
set up as transformers 5 does (`llama-spm`) and as Llama-2's own tokenizer.json does
(`llama-spm-legacy`), Llama-3's 128k and Qwen2's 152k byte-level BPE. Templates: vitune's
built-ins, and the Jinja templates of Llama 3.1, Qwen2.5 and Mistral-Nemo (`template: auto`).
"""

from __future__ import annotations

import os
import re
import unicodedata

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from tokenizers import processors

from real_assets import TOKENIZERS, reference_ids, with_chat_template
from test_templates import A1, A2, Q1, Q2, REFERENCE, SYSTEM, TRAINED
from vitune.data.records import Conversation, Message
from vitune.data.templates import TEMPLATES, JinjaTemplate, get_template, resolve_template
from vitune.data.tokenize import IGNORE, tokenize_conversations, trained_turns
from vitune.errors import ConfigError


def labelled_runs(labels: list[int]) -> list[tuple[int, int]]:
    """(start, end) token indices of each stretch of labelled tokens."""
    runs, start = [], None
    for i, label in enumerate([*labels, IGNORE]):
        if label != IGNORE and start is None:
            start = i
        elif label == IGNORE and start is not None:
            runs.append((start, i))
            start = None
    return runs


def text_of(tok, ids: list[int], start: int, end: int) -> str:
    """The text of ids[start:end] as it reads inside the whole row (decoding a fragment alone
    would drop the leading space that SentencePiece's decoder strips from a text's start)."""
    before = tok.decode(ids[:start], clean_up_tokenization_spaces=False)
    upto = tok.decode(ids[:end], clean_up_tokenization_spaces=False)
    assert upto.startswith(before)
    return upto[len(before) :]


def trained_texts(tok, row) -> list[str]:
    assert all(label in (IGNORE, tid) for label, tid in zip(row.labels, row.input_ids))
    return [text_of(tok, row.input_ids, a, b) for a, b in labelled_runs(row.labels)]


# ---------------------------------------------------------------- built-in templates

# each built-in template with a vocabulary whose special tokens it uses
PAIRS = [
    ("llama2", "llama-spm"), ("llama2", "llama-spm-legacy"), ("mistral", "llama-spm"),
    ("mistral", "llama-spm-legacy"), ("llama3", "llama-bpe"), ("chatml", "qwen2"),
]


@pytest.mark.parametrize("template_name, tokenizer_name", PAIRS)
def test_row_ids_are_the_tokenizers_ids_of_the_rendering(real_tokenizer, template_name, tokenizer_name):
    tok, template = real_tokenizer(tokenizer_name), get_template(template_name)
    (row,) = tokenize_conversations([REFERENCE], tok, template)
    assert row.input_ids == tok(template.render(REFERENCE, [True] * 4).text, add_special_tokens=False).input_ids


@pytest.mark.parametrize("template_name, tokenizer_name", PAIRS)
def test_trained_tokens_are_the_answers_with_their_end_of_turn(real_tokenizer, template_name, tokenizer_name):
    tok = real_tokenizer(tokenizer_name)
    (row,) = tokenize_conversations([REFERENCE], tok, get_template(template_name))
    assert trained_texts(tok, row) == [TRAINED[template_name].format(a=a) for a in (A1, A2)]


# ids of the first answer's trained tokens ("Thủ đô của Việt Nam là Hà Nội." + end of turn);
# llama2's answer starts with a space, so its first token is "▁Th" (498), mistral's "Th" (1349)
SPM_ANSWER = [31556, 29871, 30128, 30069, 274, 31556, 29874, 10630, 30529, 29873, 13041, 18916, 379, 30001, 405, 30902, 29875, 29889]
FIRST_ANSWER_IDS = {
    ("llama2", "llama-spm"): [498, *SPM_ANSWER, 29871, 2],
    ("llama2", "llama-spm-legacy"): [498, *SPM_ANSWER, 29871, 2],
    ("mistral", "llama-spm"): [1349, *SPM_ANSWER, 2],
    ("mistral", "llama-spm-legacy"): [1349, *SPM_ANSWER, 2],
    ("llama3", "llama-bpe"): [1016, 43604, 109701, 60835, 101798, 31074, 39015, 103888, 105006, 13, 128009],
    ("chatml", "qwen2"): [1001, 42504, 130287, 59735, 128324, 29974, 37915, 128521, 128685, 13, 151645],
}


@pytest.mark.parametrize("template_name, tokenizer_name", PAIRS)
def test_first_answer_trained_ids(real_tokenizer, template_name, tokenizer_name):
    (row,) = tokenize_conversations([REFERENCE], real_tokenizer(tokenizer_name), get_template(template_name))
    start, end = labelled_runs(row.labels)[0]
    assert row.input_ids[start:end] == FIRST_ANSWER_IDS[template_name, tokenizer_name]


def test_end_of_turn_tokens_are_the_models_own(llama_spm, llama_bpe, qwen2):
    for template, tok, end_id in [("llama2", llama_spm, 2), ("llama3", llama_bpe, 128009), ("chatml", qwen2, 151645)]:
        (row,) = tokenize_conversations([REFERENCE], tok, get_template(template))
        assert [row.input_ids[b - 1] for _, b in labelled_runs(row.labels)] == [end_id, end_id]
    assert llama_bpe.convert_ids_to_tokens([128009, 128001]) == ["<|eot_id|>", "<|end_of_text|>"]


def test_whitespace_tokens_with_trimmed_offsets_are_trained(real_tokenizer):
    # byte-level tokenizers that trim offsets (GPT-2's post-processor does) give a lone space
    # an empty range at its end; it still falls inside the answer that starts with it
    tok = real_tokenizer("qwen2", special_tokens=("</s>",), new=True)
    tok.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    enc = tok("ASSISTANT: 42 </s>", add_special_tokens=False, return_offsets_mapping=True)
    assert [span for span in enc.offset_mapping if span[0] == span[1]] == [(11, 11), (14, 14)]  # the two spaces
    conv = Conversation([Message("user", "Bao nhiêu?"), Message("assistant", "42 .")])
    for name, expected in [("vicuna", " 42 .</s>"), ("llama2", " 42 . </s>"), ("vietcuna", " 42 .</s>")]:
        (row,) = tokenize_conversations([conv], tok, get_template(name))
        assert trained_texts(tok, row) == [expected]


# ---------------------------------------------------------------- the tokenizers themselves


@pytest.mark.parametrize("name", ["llama-spm-legacy", "llama-bpe", "qwen2"])
def test_tokenizers_reproduce_the_original_tokenizers_ids(real_tokenizer, name):
    tok = real_tokenizer(name)
    cases = reference_ids(TOKENIZERS[name])
    assert len(cases) == 47
    assert [tok(text, add_special_tokens=False).input_ids for text, _ in cases] == [ids for _, ids in cases]


def test_transformers_llama_setup_differs_only_for_text_starting_with_a_space(llama_spm):
    differ = [text for text, ids in reference_ids("llama-spm") if llama_spm(text, add_special_tokens=False).input_ids != ids]
    assert len(differ) == 15 and all(text.startswith(" ") for text in differ)


def test_inst_after_bos(real_tokenizer):
    # Llama-2's own tokenizer puts "▁" before a text that follows a special token; transformers 5 does not
    text = "<s>[INST] Chào [/INST]"
    assert real_tokenizer("llama-spm-legacy")(text, add_special_tokens=False).input_ids[:4] == [1, 518, 25580, 29962]
    assert real_tokenizer("llama-spm")(text, add_special_tokens=False).input_ids[:4] == [1, 29961, 25580, 29962]


SENTENCE = f"{A1} {A2}"  # 18 syllables


@pytest.mark.parametrize("name, nfc, nfd", [("llama-spm", 44, 64), ("llama-bpe", 21, 56), ("qwen2", 21, 21)])
def test_decomposed_vietnamese_costs_more_tokens_except_with_qwen2(real_tokenizer, name, nfc, nfd):
    tok = real_tokenizer(name)
    count = lambda text: len(tok(text, add_special_tokens=False).input_ids)  # noqa: E731
    assert (count(SENTENCE), count(unicodedata.normalize("NFD", SENTENCE))) == (nfc, nfd)


def test_old_and_new_tone_mark_placement_tokenize_differently(llama_spm, llama_bpe):
    assert unicodedata.normalize("NFC", "hoà") != "hòa"  # NFC does not unify them
    assert llama_bpe.tokenize(" hòa") == ["ĠhÃ²a"] and len(llama_bpe.tokenize(" hoà")) == 2
    assert llama_spm.tokenize(" hòa") == ["▁h", "ò", "a"] and llama_spm.tokenize(" hoà") == ["▁ho", "à"]


# ---------------------------------------------------------------- template: auto (real Jinja)

AUTO = [  # (model's template, vocabulary, end of an assistant turn)
    ("llama3.1", "llama-bpe", "<|eot_id|>"),
    ("qwen2.5", "qwen2", "<|im_end|>"),
    ("mistral-nemo", "llama-spm", "</s>"),
    ("mistral-nemo", "llama-spm-legacy", "</s>"),
]


def auto_tokenizer(real_tokenizer, real_chat_template, template_name, tokenizer_name):
    return with_chat_template(real_tokenizer(tokenizer_name), real_chat_template(template_name))


@pytest.mark.parametrize("template_name, tokenizer_name, end", AUTO)
def test_auto_template_trains_the_answers_with_their_end_of_turn(
    real_tokenizer, real_chat_template, template_name, tokenizer_name, end
):
    tok = auto_tokenizer(real_tokenizer, real_chat_template, template_name, tokenizer_name)
    template = resolve_template("auto", tok)
    assert isinstance(template, JinjaTemplate)
    # Mistral-Nemo's template leaves a system prompt out of a conversation that ends with an answer
    conv = REFERENCE if template_name != "mistral-nemo" else Conversation(REFERENCE.messages)
    (row,) = tokenize_conversations([conv], tok, template)
    assert trained_texts(tok, row) == [A1 + end, A2 + end]
    messages = [{"role": "system", "content": conv.system}] if conv.system else []
    messages += [{"role": m.role, "content": m.content} for m in conv.messages]
    assert row.input_ids == tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]


def test_llama31_dates_the_system_turn_and_the_answers_are_still_found(llama_bpe, real_chat_template):
    tok = with_chat_template(llama_bpe, real_chat_template("llama3.1"))
    rendered = resolve_template("auto", tok).render(REFERENCE, [False, True, False, True])
    assert rendered.text.startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        f"Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n{SYSTEM}<|eot_id|>"
    )
    assert [rendered.text[a:b] for a, b in rendered.spans] == [A1 + "<|eot_id|>", A2 + "<|eot_id|>"]


def test_mistral_nemo_leaves_system_prompts_out_so_such_rows_are_refused_with_the_fix(llama_spm, real_chat_template):
    # Mistral-Nemo writes the system prompt only before the last user turn of a conversation
    # that ends there: training on answers would silently lose it
    tok = with_chat_template(llama_spm, real_chat_template("mistral-nemo"))
    template = resolve_template("auto", tok)
    assert template.notices == [
        "the chat template takes no system prompt: the chat template leaves the system prompt out unless the "
        "conversation ends with a user turn (as Mistral-Nemo's does); rows with one are rejected as 'template "
        "refused' unless data.system_prompt is fold (into the first user turn) or drop"
    ]
    (refusal,) = tokenize_conversations([REFERENCE], tok, template, keep_refusals=True)
    assert (refusal.reason, refusal.detail) == ("template refused", (
        "the chat template leaves the system prompt out unless the conversation ends with a user turn (as "
        "Mistral-Nemo's does); it takes no system prompt: set data.system_prompt: fold (into the first user turn) or drop"))
    # its prefixes render differently, so the answers are found in the whole rendering by their text
    rendered = template.render(Conversation(REFERENCE.messages), [False, True, False, True])
    assert rendered.text == f"<s>[INST]{Q1}[/INST]{A1}</s>[INST]{Q2}[/INST]{A2}</s>"
    assert [rendered.text[a:b] for a, b in rendered.spans] == [A1 + "</s>", A2 + "</s>"]


# ---------------------------------------------------------------- any conversation (property)

WORDS = (
    "Thủ đô của Việt Nam là Hà Nội thành phố lớn nhất Hồ Chí Minh Ở đâu được không ạ phở bánh mì "
    "khỏe khoẻ hòa hoà nghiêng ngửa Nguyễn Trường Tộ The capital of Vietnam is Hanoi don't it's "
    "2024 3,14 (vâng) [INST] ** # - > `code` 😀"
).split()
LETTERS = "aăâbcdđeêghiklmnoôơpqrstuưvxyàáảãạằắẳẵặầấẩẫậèéẻẽẹềếểễệìíỉĩịòóỏõọồốổỗộờớởỡợùúủũụừứửữựỳýỷỹỵĐÂƯ"
ALPHABET = LETTERS + "ABCXYZ0123456789.,;:!?()[]*#-'\"/"
SEPARATORS = [" ", " ", " ", ", ", ". ", "\n", "\n\n", "\r\n", "  ", "\t", "\u00a0"]
EDGES = ["", "", " ", "  ", "\n", " \n "]


@st.composite
def contents(draw) -> str:
    word = st.sampled_from(WORDS) | st.text(ALPHABET, min_size=1, max_size=8)
    parts = [draw(word)]
    for _ in range(draw(st.integers(0, 12))):
        parts += [draw(st.sampled_from(SEPARATORS)), draw(word)]
    body = " ".join(["".join(parts)] * draw(st.sampled_from([1, 1, 1, 30])))  # some long turns
    text = draw(st.sampled_from(EDGES)) + body + draw(st.sampled_from(EDGES))
    # the data pipeline composes text (NFC) unless data.normalize says none
    text = unicodedata.normalize(draw(st.sampled_from(["NFC", "NFC", "NFD"])), text)
    return text if text.strip() else "ạ"


@st.composite
def conversations(draw, system: bool = True) -> Conversation:
    messages = []
    for _ in range(draw(st.integers(1, 3))):
        messages += [Message("user", draw(contents())), Message("assistant", draw(contents()))]
    sys_prompt = draw(st.none() | st.just("") | contents()) if system else None
    return Conversation(messages, system=sys_prompt)


def template_markers() -> tuple[str, ...]:
    fields = " ".join(str(v) for t in TEMPLATES.values() for v in t.__dict__.values())
    return tuple(sorted(set(re.findall(r"<\|[a-z_]+\|>|</?s>", fields))))


def check_row(tok, template, conv: Conversation, expected: list[str]) -> None:
    """The trained tokens of `conv` are exactly `expected` (one string per assistant turn)."""
    rendered = template.render(conv, trained_turns(conv, False, False))
    _, row = tokenize_conversations([Conversation(REFERENCE.messages), conv], tok, template)  # in a batch
    ids = tok(rendered.text, add_special_tokens=False).input_ids
    assert row.input_ids == ids
    assert [rendered.text[a:b] for a, b in rendered.spans] == expected
    runs = labelled_runs(row.labels)
    assert len(runs) == len(rendered.spans)
    nfc = lambda text: unicodedata.normalize("NFC", text)  # noqa: E731 (Qwen2 composes what it reads)
    for (a, b), (start, end) in zip(rendered.spans, runs):
        before = tok(rendered.text[:a], add_special_tokens=False).input_ids
        upto = tok(rendered.text[:b], add_special_tokens=False).input_ids
        if ids[: len(before)] == before and ids[: len(upto)] == upto:
            # the span starts and ends between tokens: its tokens are trained, no others
            assert (start, end) == (len(before), len(upto))
            assert nfc(text_of(tok, ids, start, end)) == nfc(rendered.text[a:b])
        else:
            # a token straddles the span's edge: it is trained, so no character of the span is missed
            event("a token straddles a span edge")
            assert nfc(rendered.text[a:b]) in nfc(tok.decode(ids[start:end], clean_up_tokenization_spaces=False))


# 12 examples per case keep the file under a minute; raise it for a deeper search
PROPERTY = settings(
    max_examples=int(os.environ.get("VITUNE_PROPERTY_EXAMPLES", "12")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.mark.parametrize("tokenizer_name", sorted(TOKENIZERS))
@pytest.mark.parametrize("template_name", sorted(TEMPLATES))
@PROPERTY
@given(data=st.data())
def test_any_conversation_trains_exactly_its_answers(real_tokenizer, template_name, tokenizer_name, data):
    # the template's markers are special tokens, as in the models that use it (extended if needed)
    tok = real_tokenizer(tokenizer_name, special_tokens=template_markers())
    conv = data.draw(conversations())
    template = get_template(template_name)
    expected = [TRAINED[template_name].format(a=m.content.strip()) for m in conv.messages if m.role == "assistant"]
    check_row(tok, template, conv, expected)


@pytest.mark.parametrize("template_name, tokenizer_name, end", AUTO)
@PROPERTY
@given(data=st.data())
def test_any_conversation_trains_exactly_its_answers_with_auto(
    real_tokenizer, real_chat_template, template_name, tokenizer_name, end, data
):
    tok = auto_tokenizer(real_tokenizer, real_chat_template, template_name, tokenizer_name)
    conv = data.draw(conversations(system=template_name != "mistral-nemo"))
    trim = template_name == "llama3.1"  # Llama 3.1's template strips contents, the others keep them
    expected = [(m.content.strip() if trim else m.content) + end for m in conv.messages if m.role == "assistant"]
    check_row(tok, resolve_template("auto", tok), conv, expected)
