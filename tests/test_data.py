"""Rows -> conversations -> tokens: formats, loss masks, and one-line errors for bad rows."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from vitune.config import DataConfig
from vitune.data.pipeline import prepare_sft_data
from vitune.data.records import Conversation, Message
from vitune.data.templates import get_template, resolve_template
from vitune.data.tokenize import IGNORE, tokenize_conversations
from vitune.errors import DataError

from conftest import write_jsonl

ALPACA = [
    {"instruction": "Thủ đô của Việt Nam là gì?", "input": "", "output": "Hà Nội."},
    {"instruction": "Dịch sang tiếng Anh.", "input": "Xin chào", "output": "Hello"},
]
SHAREGPT = [
    {"conversations": [
        {"from": "system", "value": "Bạn là trợ lý."},
        {"from": "human", "value": "Chào bạn"}, {"from": "gpt", "value": "Chào bạn!"},
        {"from": "human", "value": "Bạn tên gì?"}, {"from": "gpt", "value": "Tôi là trợ lý."},
    ]}
]


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return AutoTokenizer.from_pretrained(tiny_llama)


def trained_text(tokenizer, ids, labels) -> list[str]:
    """The trained stretches of a row, decoded, in order."""
    pieces, current = [], []
    for tok, lab in zip(ids, labels):
        if lab != IGNORE:
            assert lab == tok
            current.append(tok)
        elif current:
            pieces.append(tokenizer.decode(current))
            current = []
    if current:
        pieces.append(tokenizer.decode(current))
    return pieces


def data_config(*paths, **kw) -> DataConfig:
    return DataConfig(train=[{"path": str(p)} for p in paths], **kw)


def test_each_assistant_turn_is_trained_with_its_end_of_turn_token(tokenizer):
    template = resolve_template("auto", tokenizer)
    assert template.name == "llama3"  # the tiny llama ships the llama3 template
    conv = Conversation(
        [Message("user", "Chào bạn"), Message("assistant", "Chào bạn!"),
         Message("user", "Bạn tên gì?"), Message("assistant", "Tôi là trợ lý.")],
        system="Bạn là trợ lý.",
    )
    (row,) = tokenize_conversations([conv], tokenizer, template)
    assert trained_text(tokenizer, row.input_ids, row.labels) == ["Chào bạn!<|eot_id|>", "Tôi là trợ lý.<|eot_id|>"]
    # the ids are exactly what the tokenizer gives for the whole rendering
    text = template.render(conv, [True] * 4).text
    assert row.input_ids == tokenizer(text, add_special_tokens=False).input_ids


def test_mask_history_and_train_on_prompt(tokenizer):
    template = get_template("chatml")
    conv = Conversation([Message("user", "A?"), Message("assistant", "B."), Message("user", "C?"), Message("assistant", "D.")])
    (row,) = tokenize_conversations([conv], tokenizer, template, mask_history=True)
    assert trained_text(tokenizer, row.input_ids, row.labels) == ["D.<|im_end|>"]
    (row,) = tokenize_conversations([conv], tokenizer, template, train_on_prompt=True)
    assert IGNORE not in row.labels


def test_a_turn_marked_train_false_is_not_trained(tokenizer):
    conv = Conversation([Message("user", "A?"), Message("assistant", "sai", train=False),
                         Message("user", "C?"), Message("assistant", "đúng")])
    (row,) = tokenize_conversations([conv], tokenizer, get_template("chatml"))
    assert trained_text(tokenizer, row.input_ids, row.labels) == ["đúng<|im_end|>"]


def test_alpaca_and_sharegpt_files_load_with_exact_counts(tmp_path, tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", ALPACA)
    s = write_jsonl(tmp_path / "s.jsonl", SHAREGPT)
    train, evaluation, report = prepare_sft_data(data_config(a, s), tokenizer, get_template("chatml"), seed=1)
    assert (report.rows_read, report.rows_kept, report.rows_rejected) == (3, 3, 0)
    assert len(train) == 3 and evaluation == []
    texts = sorted(tokenizer.decode(r.input_ids) for r in train)
    assert texts[0] == (
        "<|im_start|>system\nBạn là trợ lý.<|im_end|>\n<|im_start|>user\nChào bạn<|im_end|>\n<|im_start|>assistant\n"
        "Chào bạn!<|im_end|>\n<|im_start|>user\nBạn tên gì?<|im_end|>\n<|im_start|>assistant\nTôi là trợ lý.<|im_end|>\n"
    )
    assert texts[1] == (
        "<|im_start|>user\nDịch sang tiếng Anh.\n\nXin chào<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
    )


def test_json_array_and_column_mapping(tmp_path, tokenizer):
    path = tmp_path / "qa.json"
    path.write_text(json.dumps([{"question": "Một cộng một?", "answer": "Hai."}], ensure_ascii=False), encoding="utf-8")
    cfg = DataConfig(train=[{"path": str(path), "format": "alpaca", "columns": {"instruction": "question", "output": "answer"}}])
    train, _, report = prepare_sft_data(cfg, tokenizer, get_template("chatml"), seed=1)
    assert report.rows_kept == 1
    assert trained_text(tokenizer, train[0].input_ids, train[0].labels) == ["Hai.<|im_end|>"]


def test_missing_field_names_file_row_field_and_fix(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", [ALPACA[0], {"instruction": "Hỏi", "input": ""}])
    with pytest.raises(DataError) as info:
        prepare_sft_data(data_config(path), tokenizer, get_template("chatml"), seed=1)
    assert str(info.value) == (
        f"1 bad row(s): {path}:2: alpaca row: missing field 'output': alpaca rows need it; the row has input, "
        "instruction (map renamed fields with columns: {output: your_field}) -- fix them, or set data.on_error: skip "
        "to train on the rest"
    )


def test_on_error_skip_keeps_the_rest_and_counts_each_reason(tmp_path, tokenizer):
    rows = [
        ALPACA[0],
        '{"instruction": "thiếu ngoặc"',
        {"instruction": "Hỏi"},
        {"conversations": [{"from": "gpt", "value": "Xin chào"}, {"from": "human", "value": "?"}]},
        {"conversations": [{"from": "robot", "value": "beep"}]},
        {"instruction": "", "output": "x"},
        {"instruction": 5, "output": "x"},
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    with open(path, "ab") as fh:
        fh.write(b'{"instruction": "\xff\xfe", "output": "x"}\n')
    train, _, report = prepare_sft_data(data_config(path, on_error="skip"), tokenizer, get_template("chatml"), seed=1)
    assert len(train) == 1
    assert report.rows_read == 8 and report.rows_kept == 1 and report.rows_rejected == 7
    assert report.rejected_by_reason == {
        "invalid JSON": 1, "missing field": 1, "roles out of order": 1, "unknown role": 1,
        "empty content": 1, "wrong type": 1, "undecodable bytes": 1,
    }
    assert [r.source for r in report.rejections] == [f"{path}:{n}" for n in (2, 3, 4, 5, 6, 7, 8)]


def test_too_long_rows_are_dropped_and_counted_or_truncated(tmp_path, tokenizer):
    long = {"instruction": "Kể chuyện.", "output": "rất dài " * 200}
    path = write_jsonl(tmp_path / "a.jsonl", [ALPACA[0], long])
    # overflow: drop is the user's choice: counted, never an error, even with on_error: raise
    train, _, report = prepare_sft_data(data_config(path, max_length=64), tokenizer, get_template("chatml"), 1)
    assert len(train) == 1 and report.rejected_by_reason == {"too long": 1}
    assert (report.rows_read, report.rows_kept, report.rows_rejected) == (2, 1, 1)
    train, _, report = prepare_sft_data(data_config(path, max_length=64, overflow="truncate"), tokenizer, get_template("chatml"), 1)
    assert len(train) == 2 and report.rows_truncated == 1 and max(len(r.input_ids) for r in train) == 64


def test_missing_and_empty_files_are_user_errors(tmp_path, tokenizer):
    with pytest.raises(DataError, match=r"^dataset file not found: .*nope.jsonl \(check data.train\[\].path"):
        prepare_sft_data(data_config(tmp_path / "nope.jsonl"), tokenizer, get_template("chatml"), 1)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(DataError) as info:
        prepare_sft_data(data_config(empty), tokenizer, get_template("chatml"), 1)
    assert str(info.value) == f"no usable training rows in {empty} (0 read, 0 rejected)"


def test_val_size_holds_rows_out(tmp_path, tokenizer):
    rows = [{"instruction": f"Câu {i}", "output": f"Đáp {i}"} for i in range(10)]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    train, evaluation, _ = prepare_sft_data(data_config(path, val_size=0.2), tokenizer, get_template("chatml"), 1)
    assert (len(train), len(evaluation)) == (8, 2)


def test_text_is_nfc_normalised(tmp_path, tokenizer):
    import unicodedata

    nfd = unicodedata.normalize("NFD", "Hà Nội")
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": nfd, "output": nfd}])
    train, _, _ = prepare_sft_data(data_config(path), tokenizer, get_template("chatml"), 1)
    assert "Hà Nội" in tokenizer.decode(train[0].input_ids)
    assert nfd not in tokenizer.decode(train[0].input_ids)


def test_prepared_data_is_cached_by_content(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", ALPACA)
    cfg = data_config(path, cache_dir=str(tmp_path / "cache"))
    template = get_template("chatml")
    first, _, report1 = prepare_sft_data(cfg, tokenizer, template, 1)
    assert not report1.from_cache and report1.cached_at.parent == tmp_path / "cache"
    second, _, report2 = prepare_sft_data(cfg, tokenizer, template, 1)
    assert report2.from_cache and report2.cached_at == report1.cached_at
    assert [r.input_ids for r in second] == [r.input_ids for r in first]
    assert [r.labels for r in second] == [r.labels for r in first]
    assert report2.summary() == report1.summary()

    # same name and size, other content: a new entry
    write_jsonl(path, [{**ALPACA[0], "output": "Hà Nộ."}, ALPACA[1]])
    _, _, report3 = prepare_sft_data(cfg, tokenizer, template, 1)
    assert not report3.from_cache and report3.cached_at != report1.cached_at
    # another template, or another setting: a new entry
    _, _, report4 = prepare_sft_data(cfg, tokenizer, get_template("llama3"), 1)
    assert not report4.from_cache
    _, _, report5 = prepare_sft_data(data_config(path, cache_dir=str(tmp_path / "cache"), max_length=100), tokenizer, template, 1)
    assert not report5.from_cache
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if ".tmp" in p.name) == []


def test_skipped_rows_survive_the_cache(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", [ALPACA[0], {"instruction": "x"}])
    cfg = data_config(path, on_error="skip", cache_dir=str(tmp_path / "cache"))
    _, _, first = prepare_sft_data(cfg, tokenizer, get_template("chatml"), 1)
    _, _, second = prepare_sft_data(cfg, tokenizer, get_template("chatml"), 1)
    assert second.from_cache
    assert second.rejected_by_reason == first.rejected_by_reason == {"missing field": 1}
    assert second.rejections[0].source == f"{path}:2"


def test_num_proc_gives_the_same_rows_in_the_same_order(tmp_path, tokenizer):
    rows = [{"instruction": f"Câu hỏi số {i}", "output": f"Câu trả lời số {i}."} for i in range(40)]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    one, _, _ = prepare_sft_data(data_config(path, cache=False), tokenizer, get_template("chatml"), 1)
    two, _, report = prepare_sft_data(data_config(path, cache=False, num_proc=2), tokenizer, get_template("chatml"), 1)
    assert [(r.input_ids, r.labels) for r in two] == [(r.input_ids, r.labels) for r in one]
    assert report.rows_kept == 40
