"""A tokenizer's own Jinja chat template (`template: auto`): rendered by transformers, its
answers located in the rendering, refusals turned into rejected rows, and a start-up check
that says what the template cannot do and what vitune does about it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterable, Optional

from vitune.data.records import Conversation, Message
from vitune.errors import ConfigError, DataError

Span = tuple[int, int]


@dataclass(frozen=True)
class Rendered:
    text: str
    spans: list[Span]  # character ranges whose tokens carry labels


# End-of-turn markers of common templates; used to stop generation with `auto` templates.
KNOWN_END_OF_TURN = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")

# The conversation every `auto` template is tried on at start-up, without and with a system prompt.
PROBE_SYSTEM = "Bạn là trợ lý AI hữu ích."
PROBE = (
    Message("user", "Xin chào!"),
    Message("assistant", "Chào bạn, tôi có thể giúp gì?"),
    Message("user", "Hà Nội ở đâu?"),
    Message("assistant", "Hà Nội ở miền Bắc Việt Nam."),
)


class TemplateRefused(DataError):
    """One conversation the tokenizer's chat template cannot render (it raised), or whose
    answers cannot be found in what it rendered. The data step makes it a rejected row."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail

    def __reduce__(self):  # data.num_proc: refusals come back from worker processes
        return TemplateRefused, (self.reason, self.detail)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@dataclass
class JinjaTemplate:
    """A tokenizer's own `chat_template`, rendered by transformers.

    Each answer is found in the rendering of the whole conversation: it starts where the
    rendering of the conversation before it, with the generation prompt, ends (so text the
    template puts between the prompt and the answer, such as an empty think block, is
    learned), or, where that prefix renders differently (a system prompt moved to the last
    user turn, reasoning dropped from earlier turns), at the answer's own text. It ends after
    the end-of-turn marker: the text the template writes after the answer when the
    conversation stops there, as far as the whole rendering continues the same way.

    A template that writes nothing after an answer (ChatGLM- and MiniCPM-style: a turn
    ends only when the next one opens) would train a model that never stops: the
    tokenizer's EOS is then written and trained after each such answer, and chat stops on
    it. `check()` tries the template once at start-up and explains what it found in
    `notices`.
    """

    tokenizer: object
    name: str = "auto"
    source: str = field(default="", repr=False)
    notices: list[str] = field(default_factory=list)
    system_refused: Optional[str] = None  # the template's message when it refuses system prompts
    markers: list[str] = field(default_factory=list)  # end-of-turn markers seen in the probe

    def _messages(self, conv: Conversation, upto: Optional[int] = None) -> list[dict]:
        msgs = [{"role": "system", "content": conv.system}] if conv.system is not None else []
        for m in conv.messages[:upto]:
            msgs.append({"role": m.role, "content": m.text})
        return msgs

    def _apply(self, messages: list[dict], add_generation_prompt: bool) -> str:
        # whatever a template raises (raise_exception, undefined names, type errors) is its refusal
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as exc:  # noqa: BLE001 -- a template is user code: any error is the row's problem
            raise TemplateRefused("template refused", f"the chat template refused it: {_first_line(exc)}") from None

    def _locate(self, conv: Conversation) -> tuple[str, list[tuple[int, int, int, str]]]:
        """The whole rendering and, per assistant turn, (start, answer end, marker)."""
        full = self._apply(self._messages(conv), add_generation_prompt=False)
        if conv.system and conv.system.strip() and conv.system.strip() not in full:
            raise TemplateRefused("template refused", "the chat template leaves the system prompt out unless the "
                                  "conversation ends with a user turn (as Mistral-Nemo's does)")
        found: list[tuple[int, int, int, str]] = []
        pos = 0
        for i, msg in enumerate(conv.messages):
            if msg.role != "assistant":
                continue
            content = msg.text.strip()
            prompt = self._apply(self._messages(conv, i), add_generation_prompt=True)
            start = len(prompt) if full.startswith(prompt) and len(prompt) >= pos else -1
            at = full.find(content, start if start >= 0 else pos)
            if at < 0:
                raise TemplateRefused(
                    "answer not located",
                    f"answer {len(found) + 1} does not appear in the chat template's rendering "
                    "(the template changes answers' text); choose a built-in template with model.template",
                )
            end = at + len(content)
            alone = self._apply(self._messages(conv, i + 1), add_generation_prompt=False)
            cut = alone.rfind(content)
            marker = self._common_marker(alone[cut + len(content):] if cut >= 0 else "", full[end:])
            found.append((i, start if start >= 0 else at, end, marker))
            pos = end + len(marker)
        return full, found

    def _common_marker(self, tail: str, continuation: str) -> str:
        """What the template writes after an answer: the text after it when the conversation
        stops there, as far as the whole rendering goes on the same way, ending at a whole
        marker (never at a fragment of the next turn's tag), trailing whitespace left out."""
        k = len(os.path.commonprefix([tail, continuation]))
        if k < len(tail):  # the renderings part inside the tail: back off to a boundary
            ends = [j + len(t) for t in self._special_tokens() for j in _find_all(tail[:k], t)]
            ends += [j + 1 for j, ch in enumerate(tail[:k]) if ch.isspace() or ch in ">]"]
            k = max([e for e in ends if e <= k], default=0)
        return tail[:k].rstrip()

    def _special_tokens(self) -> list[str]:
        if not hasattr(self, "_specials"):
            added = getattr(self.tokenizer, "get_added_vocab", dict)()
            self._specials = sorted({*added, *getattr(self.tokenizer, "all_special_tokens", [])}, key=len)
        return self._specials

    def _eos(self) -> str:
        eos = getattr(self.tokenizer, "eos_token", None)
        if not eos:
            raise TemplateRefused("no end of turn", "the chat template writes nothing after an answer and the "
                                  "tokenizer has no eos_token to end it; choose a built-in template with model.template")
        return eos

    def render(self, conv: Conversation, trained: list[bool]) -> Rendered:
        try:
            full, found = self._locate(conv)
        except TemplateRefused as exc:
            if conv.system is not None and self.system_refused and exc.reason == "template refused":
                exc.detail += "; it takes no system prompt: set data.system_prompt: fold (into the first user turn) or drop"
            raise
        pieces, spans, last, shift = [], [], 0, 0
        for i, start, end, marker in found:
            added = "" if marker else self._eos()  # no end-of-turn marker: EOS ends the answer
            pieces += [full[last:end], added]
            if trained[i]:
                spans.append((start + shift, end + shift + len(added) + len(marker)))
            shift += len(added)
            last = end
        pieces.append(full[last:])
        return Rendered("".join(pieces), spans)

    def prompt(self, conv: Conversation) -> str:
        text = self._apply(self._messages(conv), add_generation_prompt=True)
        if not any(m.role == "assistant" for m in conv.messages):
            return text
        # earlier answers as training saw them (with the EOS this template does not write)
        plain = self._apply(self._messages(conv), add_generation_prompt=False)
        if text.startswith(plain):
            return self.render(conv, [False] * len(conv.messages)).text + text[len(plain):]
        return text

    def check(self, builtin_names: Iterable[str]) -> "JinjaTemplate":
        """Try the template on a short conversation, without and with a system prompt:
        raise ConfigError if it cannot be used at all, note what vitune does about the rest.
        `builtin_names`: the built-in templates the error offers instead (the registry in
        templates.py, which builds on this module, passes them down)."""
        builtins = ", ".join(builtin_names)
        found: list = []
        try:
            _, found = self._locate(Conversation(list(PROBE[:2])))  # one exchange: what every template must take
            # two exchanges show the marker after an answer that is not the last; a template may
            # refuse them (then its rows with more turns are refused one by one)
            _, found = self._locate(Conversation(list(PROBE)))
        except TemplateRefused as exc:
            if found:
                return self._check_found(found)
            if exc.reason == "template refused":
                raise ConfigError(
                    f"the tokenizer's chat template cannot render a plain user/assistant conversation: {exc.detail.split(': ', 1)[-1]} "
                    "(a tool-use or otherwise special template?); fix chat_template in tokenizer_config.json or "
                    f"choose a built-in template with model.template ({builtins})"
                ) from None
            raise ConfigError(
                "the tokenizer's chat template does not render conversations turn by turn (an answer's text "
                f"does not appear in its rendering), so assistant turns cannot be located; choose a built-in "
                f"template with model.template ({builtins})"
            ) from None
        return self._check_found(found)

    def _check_found(self, found: list) -> "JinjaTemplate":
        markers = [marker for _, _, _, marker in found]
        if not all(markers):
            eos = getattr(self.tokenizer, "eos_token", None)
            if not eos:
                raise ConfigError(
                    "the tokenizer's chat template writes nothing after an answer (a turn ends only when the next "
                    "one opens) and the tokenizer has no eos_token, so a model trained with it could not stop; "
                    "set eos_token in tokenizer_config.json or choose a built-in template with model.template"
                )
            self.notices.append(
                "the chat template writes no end-of-turn marker after an answer (a turn ends only when the next "
                f"one opens): vitune writes and trains the tokenizer's EOS {eos!r} after each answer, and chat stops on it"
            )
        self.markers = sorted({t for m in markers for t in self._special_tokens() if t and t in m})
        try:
            self._locate(Conversation(list(PROBE[:2]), system=PROBE_SYSTEM))
        except TemplateRefused as exc:
            self.system_refused = exc.detail.removeprefix("the chat template refused it: ")
            self.notices.append(
                f"the chat template takes no system prompt: {self.system_refused}; rows with one are rejected "
                "as 'template refused' unless data.system_prompt is fold (into the first user turn) or drop"
            )
        return self

    @cached_property  # get_vocab() of a 128k vocabulary takes a quarter of a second
    def stop_strings(self) -> list[str]:
        vocab = self.tokenizer.get_vocab()
        found = [s for s in KNOWN_END_OF_TURN if s in vocab and s in (self.source or "")]
        found += [m for m in self.markers if m not in found]
        eos = getattr(self.tokenizer, "eos_token", None)
        if eos and eos not in found:
            found.append(eos)
        return found

    def jinja(self) -> Optional[str]:
        return self.source


def _find_all(text: str, piece: str):
    at = text.find(piece)
    while at >= 0:
        yield at
        at = text.find(piece, at + 1)


