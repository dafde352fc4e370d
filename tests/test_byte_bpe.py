"""tiktoken as the engine for byte-level BPE tokenizers: same ids and labels as `tokenizers`,
used only where it is safe, and dropped with a notice where it is not."""

from __future__ import annotations

import json
import logging
import os
import pickle
import time
import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, processors
from transformers import AddedToken, AutoTokenizer, PreTrainedTokenizerFast

from test_real_tokenizers import PROPERTY, conversations, template_markers
from test_templates import REFERENCE
from vitune.data import byte_bpe, tokenize
from vitune.data.templates import TEMPLATES, get_template
from vitune.data.tokenize import tokenize_conversations, trained_turns


@pytest.fixture
def tiny_tokenizer(tiny_llama):
    """vitune's tiny byte-level BPE (GPT-2's pattern), a fresh copy the test may change."""
    return AutoTokenizer.from_pretrained(tiny_llama)


def both_engines(tok, texts, spans):
    encoder = byte_bpe.encoder_for(tok)
    assert encoder is not None
    return tokenize._with_tiktoken(encoder, tok, texts, spans), tokenize._with_tokenizers(tok, texts, spans)


# ---------------------------------------------------------------- which tokenizers


@pytest.mark.parametrize("name", ["llama-bpe", "qwen2"])
def test_real_byte_level_vocabularies_run_on_tiktoken(real_tokenizer, name):
    encoder, why = byte_bpe.build(real_tokenizer(name))
    assert (why, encoder.nfc, encoder.trim) == ("", name == "qwen2", False)  # Qwen2 composes text (NFC)


def test_tiny_tokenizer_runs_on_tiktoken(tiny_tokenizer):
    encoder, why = byte_bpe.build(tiny_tokenizer)
    assert why == "" and encoder.encode(["Xin chào<|eot_id|>"]) == [tiny_tokenizer("Xin chào<|eot_id|>").input_ids]


def test_sentencepiece_vocabularies_stay_on_tokenizers(llama_spm):
    assert byte_bpe.build(llama_spm) == (None, "not a byte-level BPE model")


@pytest.mark.parametrize("change, why", [
    (lambda t: setattr(t.backend_tokenizer, "normalizer", normalizers.Lowercase()), "normaliser Lowercase"),
    (lambda t: setattr(t.backend_tokenizer, "pre_tokenizer", pre_tokenizers.Metaspace()), "pre-tokenizer is not ByteLevel"),
    (lambda t: setattr(t.backend_tokenizer, "pre_tokenizer", pre_tokenizers.ByteLevel(add_prefix_space=True)),
     "pre-tokenizer is not ByteLevel"),
    (lambda t: t.add_tokens([AddedToken("<tool>", lstrip=True)]), "added tokens with lstrip, rstrip or single_word"),
    (lambda t: t.add_tokens([AddedToken("<|eot_id|>x")]), "an added token inside another"),
    (lambda t: t.add_tokens([AddedToken("[<|eot_id|>]")]), "an added token inside another"),
])
def test_setups_tiktoken_cannot_match_say_why(tiny_tokenizer, change, why):
    change(tiny_tokenizer)
    assert byte_bpe.build(tiny_tokenizer) == (None, why)
    assert byte_bpe.encoder_for(tiny_tokenizer) is None


# ---------------------------------------------------------------- same rows


def test_a_large_batch_is_checked_on_a_sample_only(llama_bpe, monkeypatch):
    seen = []
    reference = tokenize._with_tokenizers
    monkeypatch.setattr(tokenize, "_with_tokenizers", lambda tok, texts, spans: seen.append(len(texts)) or reference(tok, texts, spans))
    rows = tokenize_conversations([REFERENCE] * 400, llama_bpe, get_template("llama3"))
    assert seen == [0, 200]  # no row needed tokenizers; every 2nd row compared
    assert rows[0].input_ids[:4] == [128000, 128006, 9125, 128007]  # <|begin_of_text|><|start_header_id|>system<|end_header_id|>


# byte-level vocabularies and, for each, the templates whose markers are among its special tokens
BYTE_LEVEL = ["llama-bpe", "qwen2", "tiny"]


@pytest.mark.parametrize("tokenizer_name", BYTE_LEVEL)
@pytest.mark.parametrize("template_name", sorted(TEMPLATES))
@PROPERTY
@given(data=st.data())
def test_any_conversation_gets_the_same_ids_and_labels_from_both(
    real_tokenizer, tiny_llama, template_name, tokenizer_name, data
):
    if tokenizer_name == "tiny":
        tok = AutoTokenizer.from_pretrained(tiny_llama)
        tok.add_tokens([AddedToken(m, special=True, normalized=False) for m in template_markers()
                        if m not in tok.get_added_vocab()], special_tokens=True)
    else:
        tok = real_tokenizer(tokenizer_name, special_tokens=template_markers())
    template = get_template(template_name)
    convs = [data.draw(conversations()) for _ in range(data.draw(st.integers(1, 3)))]
    rendered = [template.render(c, trained_turns(c, False, False)) for c in convs]
    fast, reference = both_engines(tok, [r.text for r in rendered], [r.spans for r in rendered])
    assert fast == reference


@pytest.mark.parametrize("name", ["llama-bpe", "qwen2", "qwen2-trimming", "tiny"])
def test_a_span_edge_anywhere_labels_the_same_tokens(real_tokenizer, tiny_llama, name):
    # every start and end position of a trained span, over text with spaces, runs of spaces,
    # newlines, punctuation and multi-byte letters; Qwen2 set up to trim spaces from offsets
    # as GPT-2's post-processor does, which narrows what a token overlaps
    if name == "tiny":
        tok = AutoTokenizer.from_pretrained(tiny_llama)
    else:
        tok = real_tokenizer(name.removesuffix("-trimming"), new=True)
        if name == "qwen2-trimming":
            tok.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    text = "Xin chào  bạn!\nGiá: 42 đồng ,  (vâng)  \n\n  Hà Nội 😀 ok "
    assert byte_bpe.encoder_for(tok).trim == (name == "qwen2-trimming")
    spans = [[(0, p)] for p in range(1, len(text) + 1)] + [[(p, len(text))] for p in range(len(text))]
    spans += [[(p, p + 3)] for p in range(len(text) - 3)]
    fast, reference = both_engines(tok, [text] * len(spans), spans)
    assert fast == reference


def test_rows_that_are_not_nfc_go_through_tokenizers_for_qwen2(qwen2, monkeypatch):
    conv = REFERENCE
    nfd = type(conv)([type(m)(m.role, unicodedata.normalize("NFD", m.content)) for m in conv.messages], system=conv.system)
    seen = []
    reference = tokenize._with_tokenizers
    monkeypatch.setattr(tokenize, "_with_tokenizers", lambda tok, texts, spans: seen.append(len(texts)) or reference(tok, texts, spans))
    template = get_template("chatml")
    rows = tokenize_conversations([conv, nfd, conv], qwen2, template)
    assert seen == [1, 2]  # the NFD row, then the two NFC rows compared
    assert rows[1] == rows[0]  # Qwen2 composes the NFD text: the same tokens


# ---------------------------------------------------------------- when they differ


def test_a_disagreement_falls_back_to_tokenizers_with_a_notice(tiny_tokenizer, monkeypatch, caplog):
    encoder = byte_bpe.encoder_for(tiny_tokenizer)
    real_encode = encoder.encode

    def one_id_off(texts):  # same length in bytes, one different id
        out = real_encode(texts)
        out[0][0], out[0][1] = out[0][1], out[0][0]
        return out

    monkeypatch.setattr(encoder, "encode", one_id_off)
    template = get_template("llama3")
    with caplog.at_level(logging.WARNING):
        rows = tokenize_conversations([REFERENCE, REFERENCE], tiny_tokenizer, template)
    assert caplog.messages == [
        "notice: tiktoken cannot stand in for this tokenizer (row 1 differs); tokenizing with tokenizers, which is slower"
    ]
    ids = tiny_tokenizer(template.render(REFERENCE, [True] * 4).text, add_special_tokens=False).input_ids
    assert [row.input_ids for row in rows] == [ids, ids]
    assert byte_bpe.encoder_for(tiny_tokenizer) is None  # not tried again for this tokenizer


def test_text_between_the_patterns_matches_is_a_piece_as_in_tokenizers(tiny_tokenizer, caplog):
    # BLOOM's Split pattern leaves out spaces and punctuation; tokenizers keeps the text between
    # two matches as a piece of its own, and so does vitune's pattern for tiktoken
    tiny_tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(" ?[^(\\s|[.,!?…。，、।۔،])]+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    texts = ["Xin chào, bạn!  Hôm nay\n\n trời đẹp... (thật) 42?<|eot_id|>"]
    fast, reference = both_engines(tiny_tokenizer, texts, [[(5, 30)]])
    assert fast == reference
    with caplog.at_level(logging.WARNING):
        rows = tokenize_conversations([REFERENCE], tiny_tokenizer, get_template("llama3"))
    assert caplog.messages == [] and byte_bpe.encoder_for(tiny_tokenizer) is not None
    rendered = get_template("llama3").render(REFERENCE, [True] * 4)
    assert rows == tokenize._with_tokenizers(tiny_tokenizer, [rendered.text], [rendered.spans])


def test_tokens_that_do_not_cover_the_text_are_caught(tiny_tokenizer, monkeypatch, caplog):
    encoder = byte_bpe.encoder_for(tiny_tokenizer)
    real_encode = encoder.encode
    monkeypatch.setattr(encoder, "encode", lambda texts: [ids[:-1] for ids in real_encode(texts)])
    with caplog.at_level(logging.WARNING):
        rows = tokenize_conversations([REFERENCE], tiny_tokenizer, get_template("llama3"))
    assert caplog.messages == ["notice: tiktoken cannot stand in for this tokenizer (tokens do not cover "
                               "the text of row 1); tokenizing with tokenizers, which is slower"]
    rendered = get_template("llama3").render(REFERENCE, [True] * 4)
    assert rows == tokenize._with_tokenizers(tiny_tokenizer, [rendered.text], [rendered.spans])


def test_merges_out_of_id_order_stay_on_tokenizers(tiny_llama):
    # BPE applies merges in list order and tiktoken by merged id: swapping two merges makes them differ
    spec = json.loads(AutoTokenizer.from_pretrained(tiny_llama).backend_tokenizer.to_str())
    merges = spec["model"]["merges"]
    merges[0], merges[1] = merges[1], merges[0]
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)))
    assert byte_bpe.build(tok) == (None, "merge order differs from id order")
    rows = tokenize_conversations([REFERENCE], tok, get_template("llama3"))
    rendered = get_template("llama3").render(REFERENCE, [True] * 4)
    assert rows == tokenize._with_tokenizers(tok, [rendered.text], [rendered.spans])


# ---------------------------------------------------------------- set-up while the data is read


def test_the_merge_check_runs_in_a_forked_process_started_early(tiny_llama):
    spec = json.loads(AutoTokenizer.from_pretrained(tiny_llama).backend_tokenizer.to_str())
    swapped = json.loads(json.dumps(spec))
    swapped["model"]["merges"][:2] = swapped["model"]["merges"][1::-1]
    for model, verdict in [(spec, ("", True)), (swapped, ("merge order differs from id order", False))]:
        tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(model)))
        byte_bpe.start_setup(tok)
        check = tok._vitune_merge_check
        assert check._process.pid != os.getpid()
        encoder, why = byte_bpe.build(tok)
        assert (why, encoder is not None) == verdict
        assert check.result() == verdict[0] and not hasattr(tok, "_vitune_merge_check")


def test_a_failed_check_process_is_checked_again_in_place(tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(byte_bpe, "_merge_check_child", lambda backend, send: os._exit(1))
    byte_bpe.start_setup(tiny_tokenizer)
    assert tiny_tokenizer._vitune_merge_check.result() is None  # the child died without a verdict
    assert byte_bpe.build(tiny_tokenizer)[1] == ""


def test_a_tokenizer_with_a_running_check_pickles_for_worker_processes(tiny_tokenizer):
    byte_bpe.start_setup(tiny_tokenizer)
    copy = pickle.loads(pickle.dumps(tiny_tokenizer))
    assert copy._vitune_merge_check.result() == ""
    assert byte_bpe.build(copy)[1] == ""


def test_start_setup_skips_what_is_not_byte_level_bpe(llama_spm, tiny_tokenizer):
    byte_bpe.start_setup(llama_spm)
    assert not hasattr(llama_spm, "_vitune_merge_check")
    byte_bpe.encoder_for(tiny_tokenizer)
    byte_bpe.start_setup(tiny_tokenizer)  # set up already
    assert not hasattr(tiny_tokenizer, "_vitune_merge_check")


def test_a_stuck_check_process_is_stopped_and_checked_in_place(tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(byte_bpe, "CHECK_TIMEOUT_S", 0.5)
    monkeypatch.setattr(byte_bpe, "_merge_check_child", lambda backend, send: time.sleep(60))
    byte_bpe.start_setup(tiny_tokenizer)
    process = tiny_tokenizer._vitune_merge_check._process
    started = time.monotonic()
    assert byte_bpe.build(tiny_tokenizer)[1] == "" and time.monotonic() - started < 10
    assert not process.is_alive()


def test_no_fork_off_linux(tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(byte_bpe.sys, "platform", "darwin")
    byte_bpe.start_setup(tiny_tokenizer)
    assert not hasattr(tiny_tokenizer, "_vitune_merge_check")
    assert byte_bpe.build(tiny_tokenizer)[1] == ""  # checked in place


def test_an_error_inside_tiktoken_falls_back_with_a_notice(tiny_tokenizer, monkeypatch, caplog):
    encoder = byte_bpe.encoder_for(tiny_tokenizer)

    def broken(texts):
        raise RuntimeError("regex backtrack limit")

    monkeypatch.setattr(encoder, "encode", broken)
    with caplog.at_level(logging.WARNING):
        rows = tokenize_conversations([REFERENCE], tiny_tokenizer, get_template("llama3"))
    assert caplog.messages == ["notice: tiktoken cannot stand in for this tokenizer (tiktoken failed: RuntimeError: "
                               "regex backtrack limit); tokenizing with tokenizers, which is slower"]
    rendered = get_template("llama3").render(REFERENCE, [True] * 4)
    assert rows == tokenize._with_tokenizers(tiny_tokenizer, [rendered.text], [rendered.spans])
