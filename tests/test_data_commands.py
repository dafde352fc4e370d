"""`vitune data inspect` and `vitune data convert`."""

from __future__ import annotations

import json

from vitune.cli import main

from conftest import write_config, write_jsonl

ROWS = [
    {"instruction": "Thủ đô của Việt Nam là gì?", "input": "", "output": "Hà Nội."},
    {"instruction": "Dịch sang tiếng Anh.", "input": "Xin chào", "output": "Hello"},
    {"instruction": "thiếu câu trả lời"},
]


def inspect_config(tmp_path, model, rows, **data):
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    return write_config(tmp_path / "run.yaml", model={"name_or_path": str(model)},
                        data={"train": [{"path": str(path)}], **data}), path


def test_inspect_json_counts(tiny_llama, tmp_path, capsys):
    config, path = inspect_config(tmp_path, tiny_llama, ROWS, on_error="skip")
    assert main(["data", "inspect", str(config), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert {k: stats[k] for k in ("rows_read", "rows_kept", "rows_rejected", "rejected_by_reason", "rows_truncated")} == {
        "rows_read": 3, "rows_kept": 2, "rows_rejected": 1, "rejected_by_reason": {"missing field": 1}, "rows_truncated": 0,
    }
    assert stats["template"] == "llama3"
    assert 0 < stats["trained_token_fraction"] < 1
    assert set(stats["length_percentiles"]) == {"p50", "p90", "p99", "min", "max"}
    assert stats["first_rejections"][0].startswith(f"{path}:3: alpaca row: missing field 'output'")


def test_inspect_shows_rows_and_the_trained_tokens(tiny_llama, tmp_path, capsys):
    config, _ = inspect_config(tmp_path, tiny_llama, ROWS[:1])
    assert main(["data", "inspect", str(config), "-n", "1"]) == 0
    out = capsys.readouterr().out
    assert "row 1 of 1:" in out
    assert "Thủ đô của Việt Nam là gì?" in out and "Hà Nội.<|eot_id|>" in out
    assert "rows read / kept / rejected" in out


def test_token_pieces_mark_exactly_the_answer(tiny_llama):
    from transformers import AutoTokenizer

    from vitune.data.inspect import token_pieces
    from vitune.data.records import Conversation, Message
    from vitune.data.templates import get_template
    from vitune.data.tokenize import tokenize_conversations

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    conv = Conversation([Message("user", "Hỏi"), Message("assistant", "Đáp án đúng")])
    (row,) = tokenize_conversations([conv], tok, get_template("chatml"))
    pieces = token_pieces(tok, row)
    assert "".join(p for p, _ in pieces) == "<|im_start|>user\nHỏi<|im_end|>\n<|im_start|>assistant\nĐáp án đúng<|im_end|>\n"
    assert "".join(p for p, trained in pieces if trained) == "Đáp án đúng<|im_end|>"


def test_convert_alpaca_to_sharegpt_needs_force_when_input_would_merge(tmp_path, capsys):
    src = write_jsonl(tmp_path / "a.jsonl", ROWS[:2])
    dst = tmp_path / "out.jsonl"
    assert main(["data", "convert", str(src), str(dst), "--to", "sharegpt"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {src}:2: converting to sharegpt would lose the separate 'input' field (it is joined to the "
        "instruction); pass --force to convert anyway"
    )
    assert not dst.exists()
    assert main(["data", "convert", str(src), str(dst), "--to", "sharegpt", "--force"]) == 0
    rows = [json.loads(line) for line in dst.read_text(encoding="utf-8").splitlines()]
    assert rows == [
        {"conversations": [{"from": "human", "value": "Thủ đô của Việt Nam là gì?"}, {"from": "gpt", "value": "Hà Nội."}]},
        {"conversations": [{"from": "human", "value": "Dịch sang tiếng Anh.\n\nXin chào"}, {"from": "gpt", "value": "Hello"}]},
    ]


def test_convert_multi_turn_sharegpt_to_alpaca_keeps_history_and_system(tmp_path):
    conv = {"conversations": [
        {"from": "system", "value": "Ngắn gọn."},
        {"from": "human", "value": "1+1?"}, {"from": "gpt", "value": "2"},
        {"from": "human", "value": "Nhân 3?"}, {"from": "gpt", "value": "6"},
    ]}
    src = write_jsonl(tmp_path / "s.jsonl", [conv])
    dst = tmp_path / "out.json"
    assert main(["data", "convert", str(src), str(dst), "--to", "alpaca"]) == 0
    assert json.loads(dst.read_text(encoding="utf-8")) == [
        {"instruction": "Nhân 3?", "input": "", "output": "6", "system": "Ngắn gọn.", "history": [["1+1?", "2"]]}
    ]
    # and back: the same conversation
    back = tmp_path / "back.jsonl"
    assert main(["data", "convert", str(dst), str(back), "--to", "sharegpt"]) == 0
    assert json.loads(back.read_text(encoding="utf-8")) == conv


def test_convert_to_messages_and_bad_rows(tmp_path, capsys):
    src = write_jsonl(tmp_path / "a.jsonl", ROWS[:1])
    dst = tmp_path / "m.jsonl"
    assert main(["data", "convert", str(src), str(dst), "--to", "messages"]) == 0
    assert json.loads(dst.read_text(encoding="utf-8")) == {"messages": [
        {"role": "user", "content": "Thủ đô của Việt Nam là gì?"}, {"role": "assistant", "content": "Hà Nội."}]}
    bad = write_jsonl(tmp_path / "bad.jsonl", ROWS)
    assert main(["data", "convert", str(bad), str(dst), "--to", "messages"]) == 2
    assert capsys.readouterr().err.startswith(f"error: 1 bad row(s): {bad}:3: alpaca row: missing field 'output'")
    assert main(["data", "convert", str(src), str(tmp_path / "x.txt"), "--to", "messages"]) == 2
    assert main(["data", "convert", str(src), str(dst), "--to", "chatml"]) == 2
