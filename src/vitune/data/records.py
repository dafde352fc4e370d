"""Canonical records: every data format becomes one of these before tokenisation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class Message:
    role: str  # "user" or "assistant"
    content: str
    # Alpaca's optional `input` stays separate so the alpaca template can render its own
    # "### Input:" block; every other template sees `text` (instruction + blank line + input).
    input: Optional[str] = None
    # None = follow the data settings; False = never train this turn; True = always.
    train: Optional[bool] = None

    @property
    def text(self) -> str:
        return f"{self.content}\n\n{self.input}" if self.input else self.content


@dataclass
class Conversation:
    messages: list[Message]
    system: Optional[str] = None
    source: str = ""  # file and line/row, for messages


def fold_system_prompt(conv: Conversation) -> Conversation:
    """The conversation with its system prompt put before the first user turn, a blank line
    after it (`data.system_prompt: fold`, and chat with a template that takes no system prompt)."""
    if conv.system is None:
        return conv
    messages = [Message(m.role, m.content, m.input, m.train) for m in conv.messages]
    first = next((m for m in messages if m.role == "user"), None)
    if first is not None and conv.system.strip():
        first.content = f"{conv.system}\n\n{first.content}"
    return Conversation(messages, system=None, source=conv.source)


@dataclass
class Text:
    """Raw text for continued pretraining."""

    text: str
    source: str = ""


@dataclass
class Preference:
    """A prompt with a preferred and a rejected answer (reward modelling, DPO). An unpaired row
    (KTO) has only one of the two; the other is None."""

    prompt_messages: list[Message]
    chosen: Optional[Message]
    rejected: Optional[Message]
    system: Optional[str] = None
    source: str = ""
    margin: Optional[float] = None  # reward modelling: how much better chosen is (Llama 2's margin loss)

    def conversation(self, answer: Message) -> Conversation:
        """The prompt followed by one of the answers, as SFT would render it."""
        messages = [Message(m.role, m.content, m.input, m.train) for m in self.prompt_messages]
        return Conversation(messages + [Message("assistant", answer.content)], system=self.system, source=self.source)


@dataclass
class Rejection:
    source: str
    reason: str  # short, countable: "missing field", "invalid JSON", ...
    detail: str  # what exactly and what to do
    row: object = field(default=None, repr=False)

    def line(self) -> str:
        return f"{self.source}: {self.detail}"
