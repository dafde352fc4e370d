"""Row formats beyond SFT: raw text and preference pairs, parsed into their canonical records."""

from __future__ import annotations

import pytest

from vitune.data.formats import RowProblem, detect_format, parse_preference, parse_sharegpt, parse_text
from vitune.data.records import Message, Preference, Text


def test_text_rows():
    assert parse_text({"text": "Hà Nội là thủ đô."}, {}) == Text("Hà Nội là thủ đô.")
    assert parse_text({"body": "x"}, {"text": "body"}) == Text("x")
    with pytest.raises(RowProblem, match="missing field 'text'"):
        parse_text({"content": "x"}, {})


def test_alpaca_style_preference():
    row = {"instruction": "Dịch", "input": "Xin chào", "chosen": "Hello", "rejected": "Bye"}
    assert detect_format(row, {}) == "preference"
    assert parse_preference(row, {}) == Preference(
        [Message("user", "Dịch", input="Xin chào")], Message("assistant", "Hello"), Message("assistant", "Bye"))


def test_sharegpt_style_preference_keeps_history_and_system():
    row = {
        "conversations": [{"from": "system", "value": "Ngắn gọn."}, {"from": "human", "value": "1+1?"},
                          {"from": "gpt", "value": "2"}, {"from": "human", "value": "Nhân 3?"}],
        "chosen": {"from": "gpt", "value": "6"},
        "rejected": {"from": "gpt", "value": "5"},
    }
    pref = parse_preference(row, {})
    assert pref.system == "Ngắn gọn."
    assert [(m.role, m.content) for m in pref.prompt_messages] == [("user", "1+1?"), ("assistant", "2"), ("user", "Nhân 3?")]
    assert (pref.chosen.content, pref.rejected.content) == ("6", "5")


def test_prompt_chosen_rejected_with_strings_or_messages():
    assert parse_preference({"prompt": "Chào?", "chosen": "Chào bạn", "rejected": "..."}, {}).prompt_messages == [
        Message("user", "Chào?")]
    pref = parse_preference({
        "prompt": [{"role": "user", "content": "Chào?"}],
        "chosen": [{"role": "assistant", "content": "Chào bạn"}],
        "rejected": [{"role": "assistant", "content": "Không"}],
    }, {})
    assert (pref.chosen.content, pref.rejected.content) == ("Chào bạn", "Không")


def test_bad_preference_rows():
    with pytest.raises(RowProblem, match="missing field 'rejected'"):
        parse_preference({"prompt": "a", "chosen": "b"}, {})
    with pytest.raises(RowProblem, match="field 'chosen' is empty"):
        parse_preference({"prompt": "a", "chosen": " ", "rejected": "c"}, {})
    with pytest.raises(RowProblem, match="must be the assistant's answer, got role 'user'"):
        parse_preference({"prompt": "a", "chosen": {"role": "user", "content": "b"}, "rejected": "c"}, {})


def test_text_or_preference_rows_in_an_sft_run_are_a_one_line_error(tmp_path):
    from vitune.config import DataConfig
    from vitune.data.pipeline import DataReport, load_conversations
    from vitune.errors import DataError

    from conftest import write_jsonl

    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}])
    with pytest.raises(DataError) as info:
        load_conversations(DataConfig(train=[{"path": str(path)}]), 1, DataReport())
    assert str(info.value) == (
        f"{path}:1: preference (chosen/rejected) rows cannot train stage sft; give instruction or conversation data "
        "(alpaca, sharegpt, messages), or set format: explicitly if detection chose preference"
    )


@pytest.mark.parametrize("turn, reason, detail", [
    ({"from": ["gpt"], "value": "x"}, "unknown role",
     "conversations[2] has role ['gpt']; use human/user, gpt/assistant or system"),
    ({"from": "GPT", "value": 42}, "wrong type", "field 'conversations[2].value' must be a string, got int"),
    ({"from": "gpt", "value": "  \n"}, "empty content", "field 'conversations[2].value' is empty"),
])
def test_bad_turns_name_the_turn_and_field(turn, reason, detail):
    with pytest.raises(RowProblem) as info:
        parse_sharegpt({"conversations": [{"from": "human", "value": "Chào"}, turn]}, {})
    assert (info.value.reason, info.value.detail) == (reason, detail)


def test_roles_in_any_case_and_an_empty_system_turn():
    conv = parse_sharegpt({"conversations": [{"from": "System", "value": ""}, {"from": "Human", "value": "Chào"},
                                             {"from": "GPT", "value": "Xin chào!"}]}, {})
    assert (conv.system, [(m.role, m.content) for m in conv.messages]) == ("", [("user", "Chào"), ("assistant", "Xin chào!")])
