"""Row formats: one function per format turns a raw row into a `Conversation`.

Each parser raises `RowProblem(reason, detail)` for a row it cannot use; the caller adds
the file and row. `reason` is a short countable label, `detail` says what to do.
"""

from __future__ import annotations

from typing import Callable, Optional

from vitune.data.records import Conversation, Message, Preference, Text

ROLE_NAMES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
}


class RowProblem(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _field(row: dict, name: str, columns: dict[str, str], fmt: str, required: bool = True):
    key = columns.get(name, name)
    if key not in row or row[key] is None:
        if not required:
            return None
        mapped = f" (mapped from {name!r} by columns)" if name in columns else ""
        present = ", ".join(sorted(map(str, row))) or "none"
        raise RowProblem(
            "missing field",
            f"missing field {key!r}{mapped}: {fmt} rows need it; the row has {present} "
            f"(map renamed fields with columns: {{{name}: your_field}})",
        )
    return row[key]


def _text(value, field: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise RowProblem("wrong type", f"field {field!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RowProblem("empty content", f"field {field!r} is empty")
    return value


def parse_alpaca(row: dict, columns: dict[str, str]) -> Conversation:
    instruction = _text(_field(row, "instruction", columns, "alpaca"), columns.get("instruction", "instruction"))
    raw_input = _field(row, "input", columns, "alpaca", required=False)
    inp = _text(raw_input, columns.get("input", "input"), allow_empty=True) if raw_input is not None else ""
    output = _text(_field(row, "output", columns, "alpaca"), columns.get("output", "output"))
    system = _field(row, "system", columns, "alpaca", required=False)
    messages: list[Message] = []
    history = _field(row, "history", columns, "alpaca", required=False) or []
    if not isinstance(history, list):
        raise RowProblem("wrong type", "field 'history' must be a list of [prompt, response] pairs")
    for n, pair in enumerate(history, start=1):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise RowProblem("wrong type", f"history item {n} must be a [prompt, response] pair")
        messages.append(Message("user", _text(pair[0], f"history[{n}][0]")))
        messages.append(Message("assistant", _text(pair[1], f"history[{n}][1]")))
    messages.append(Message("user", instruction, input=inp.strip() or None))
    messages.append(Message("assistant", output))
    return Conversation(messages, system=_text(system, "system", allow_empty=True) if system is not None else None)


def _turns(turns, field: str, role_key: str, content_key: str, system: Optional[str]) -> Conversation:
    if not isinstance(turns, list):
        raise RowProblem("wrong type", f"field {field!r} must be a list of messages, got {type(turns).__name__}")
    if not turns:
        raise RowProblem("empty content", f"field {field!r} has no messages")
    messages: list[Message] = []
    for n, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            raise RowProblem("wrong type", f"{field}[{n}] must be an object with {role_key!r} and {content_key!r}")
        if role_key not in turn or content_key not in turn:
            missing = role_key if role_key not in turn else content_key
            raise RowProblem("missing field", f"{field}[{n}] has no {missing!r}")
        raw_role = turn[role_key]
        role = (ROLE_NAMES.get(raw_role) if type(raw_role) is str else None) or ROLE_NAMES.get(str(raw_role).lower())
        if role is None:
            raise RowProblem(
                "unknown role",
                f"{field}[{n}] has role {raw_role!r}; use human/user, gpt/assistant or system",
            )
        content = turn[content_key]
        if type(content) is not str or not (content.strip() or role == "system"):
            # the usual case skips building the field name: it is only needed for the message
            _text(content, f"{field}[{n}].{content_key}", allow_empty=(role == "system"))
        if role == "system":
            if messages:
                raise RowProblem("roles out of order", f"{field}[{n}] is a system message after the first turn")
            system = content
            continue
        expected = "user" if len(messages) % 2 == 0 else "assistant"
        if role != expected:
            raise RowProblem(
                "roles out of order",
                f"{field}[{n}] is from the {role} but the {expected} should speak here (turns alternate user, assistant)",
            )
        train = turn.get("train")
        if train is not None and not isinstance(train, bool):
            raise RowProblem("wrong type", f"{field}[{n}].train must be true or false")
        messages.append(Message(role, content, train=train))
    if not messages:
        raise RowProblem("empty content", f"field {field!r} has only a system message")
    if messages[-1].role != "assistant":
        raise RowProblem("roles out of order", f"the last turn of {field!r} is from the user; nothing to learn from it")
    return Conversation(messages, system=system)


def parse_sharegpt(row: dict, columns: dict[str, str]) -> Conversation:
    key = columns.get("conversations", "conversations")
    system = _field(row, "system", columns, "sharegpt", required=False)
    if system is not None:
        system = _text(system, columns.get("system", "system"), allow_empty=True)
    turns = _field(row, "conversations", columns, "sharegpt")
    role_key = columns.get("from", "from")
    content_key = columns.get("value", "value")
    if isinstance(turns, list) and turns and isinstance(turns[0], dict) and "role" in turns[0] and role_key not in turns[0]:
        role_key, content_key = "role", "content"  # OpenAI-style turns in a conversations column
    return _turns(turns, key, role_key, content_key, system)


def parse_messages(row: dict, columns: dict[str, str]) -> Conversation:
    key = columns.get("messages", "messages")
    return _turns(_field(row, "messages", columns, "messages"), key, "role", "content", None)


def parse_text(row: dict, columns: dict[str, str]) -> Text:
    key = columns.get("text", "text")
    return Text(_text(_field(row, "text", columns, "text"), key))


def _answer(value, field: str, role_key: str = "role", content_key: str = "content") -> Message:
    """A chosen/rejected answer: a string, one message, or a list ending with the assistant's message."""
    if isinstance(value, list):
        if not value:
            raise RowProblem("empty content", f"field {field!r} has no messages")
        value = value[-1]
    if isinstance(value, dict):
        role_key = role_key if role_key in value else "from"
        content_key = content_key if content_key in value else "value"
        role = ROLE_NAMES.get(str(value.get(role_key, "assistant")).lower())
        if role != "assistant":
            raise RowProblem("roles out of order", f"field {field!r} must be the assistant's answer, got role {value.get(role_key)!r}")
        value = value.get(content_key)
    return Message("assistant", _text(value, field))


def parse_preference(row: dict, columns: dict[str, str]) -> Preference:
    """Alpaca style (instruction, input, chosen, rejected), ShareGPT style (conversations +
    chosen/rejected messages) or prompt/chosen/rejected (prompt a string or a message list)."""
    chosen_key, rejected_key = columns.get("chosen", "chosen"), columns.get("rejected", "rejected")
    chosen = _answer(_field(row, "chosen", columns, "preference"), chosen_key)
    rejected = _answer(_field(row, "rejected", columns, "preference"), rejected_key)
    system = _field(row, "system", columns, "preference", required=False)
    if columns.get("conversations", "conversations") in row:
        turns = _field(row, "conversations", columns, "preference")
        if not isinstance(turns, list):
            raise RowProblem("wrong type", f"field {columns.get('conversations', 'conversations')!r} must be a list of "
                             f"messages, got {type(turns).__name__}")
        role_key = "role" if turns and isinstance(turns[0], dict) and "role" in turns[0] else "from"
        content_key = "content" if role_key == "role" else "value"
        conv = _turns(turns + [{role_key: "assistant", content_key: chosen.content}],
                      columns.get("conversations", "conversations"), role_key, content_key, system)
        prompt, system = conv.messages[:-1], conv.system
    elif columns.get("instruction", "instruction") in row:
        instruction = _text(_field(row, "instruction", columns, "preference"), columns.get("instruction", "instruction"))
        extra = _field(row, "input", columns, "preference", required=False) or ""
        prompt = [Message("user", instruction, input=_text(extra, "input", allow_empty=True).strip() or None)]
    else:
        prompt, system = _prompt(_field(row, "prompt", columns, "preference"), columns.get("prompt", "prompt"), system)
    if system is not None:
        system = _text(system, columns.get("system", "system"), allow_empty=True)
    margin = _field(row, "margin", columns, "preference", required=False)
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float)) or margin != margin
                               or margin in (float("inf"), float("-inf"))):
        raise RowProblem("wrong type", f"field 'margin' must be a finite number, got {margin!r}")
    return Preference(prompt, chosen, rejected, system=system, margin=float(margin) if margin is not None else None)


def _prompt(raw, field: str, system) -> tuple[list[Message], Optional[str]]:
    """A prompt: a string (one user turn) or a message list ending with the user's turn."""
    if isinstance(raw, list):
        conv = _turns(raw + [{"role": "assistant", "content": "-"}], field, "role", "content", system)
        return conv.messages[:-1], conv.system
    return [Message("user", _text(raw, field))], system


def parse_unpaired(row: dict, columns: dict[str, str]) -> Preference:
    """KTO's unpaired rows: prompt, completion and label (true: desirable, false: undesirable);
    the completion becomes `chosen` or `rejected`, the other side stays None."""
    prompt, system = _prompt(_field(row, "prompt", columns, "unpaired"), columns.get("prompt", "prompt"),
                             _field(row, "system", columns, "unpaired", required=False))
    completion = _answer(_field(row, "completion", columns, "unpaired"), columns.get("completion", "completion"))
    label = _field(row, "label", columns, "unpaired")
    if not isinstance(label, bool):
        raise RowProblem("wrong type", f"field {columns.get('label', 'label')!r} must be true (desirable) or false "
                         f"(undesirable), got {label!r}")
    return Preference(prompt, completion if label else None, None if label else completion, system=system)


PARSERS: dict[str, Callable[[dict, dict[str, str]], Conversation]] = {
    "alpaca": parse_alpaca,
    "sharegpt": parse_sharegpt,
    "messages": parse_messages,
}
OTHER_PARSERS = {"text": parse_text, "preference": parse_preference, "unpaired": parse_unpaired}


def detect_format(row: dict, columns: dict[str, str]) -> Optional[str]:
    """The format a row looks like, from its keys (after column mapping)."""
    keys = set(row)
    if columns.get("chosen", "chosen") in keys and columns.get("rejected", "rejected") in keys:
        return "preference"
    if columns.get("completion", "completion") in keys and columns.get("label", "label") in keys:
        return "unpaired"
    if columns.get("conversations", "conversations") in keys:
        return "sharegpt"
    if columns.get("messages", "messages") in keys:
        return "messages"
    if columns.get("instruction", "instruction") in keys:
        return "alpaca"
    if columns.get("text", "text") in keys:
        return "text"
    return None
