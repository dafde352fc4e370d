"""Chat templates: a registry of small declarative entries, plus the tokenizer's own Jinja.

A template turns a `Conversation` into one string and the character spans of the parts
the model learns (each assistant turn with its end-of-turn marker). Built-in templates
render in Python (fast, spans known while writing) and export an equivalent Jinja
`chat_template` that is saved with the trained tokenizer, so inference renders exactly
what training saw. A tokenizer's own Jinja template (`template: auto`) is rendered with
`apply_chat_template`, and its assistant spans are found from the renderings of
conversation prefixes, so masks are right for any template, not only ours.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from typing import Optional, Protocol

from vitune.data.records import Conversation, Message
from vitune.errors import ConfigError, DataError

Span = tuple[int, int]


@dataclass(frozen=True)
class Rendered:
    text: str
    spans: list[Span]  # character ranges whose tokens carry labels


class Template(Protocol):
    name: str

    def render(self, conv: Conversation, trained: list[bool]) -> Rendered: ...

    def prompt(self, conv: Conversation) -> str: ...

    @property
    def stop_strings(self) -> list[str]: ...

    def jinja(self) -> Optional[str]: ...

    notices: list[str]  # what vitune found out about the template and does about it


@dataclass(frozen=True)
class ChatTemplate:
    """One declarative chat format. `{content}` (and `{system}`, `{input}`) are filled in."""

    name: str
    user: str
    assistant: str  # the trained part, with its end-of-turn marker
    assistant_prompt: str = ""  # untrained text that opens an assistant turn (the generation prompt)
    assistant_suffix: str = ""  # untrained text after the end-of-turn marker
    prefix: str = ""  # once, at the very start (e.g. BOS)
    system: Optional[str] = None  # a system turn; None = fold the system into the first user turn
    system_in_user: str = "{system}\n\n{content}"
    user_with_input: Optional[str] = None  # alpaca: instruction and input rendered apart
    turn_separator: str = ""  # before a user turn that follows an assistant turn
    default_system: Optional[str] = None
    default_system_with_input: Optional[str] = None
    strip: bool = True  # strip message contents, as the official templates do
    stop: tuple[str, ...] = ()  # strings that end an assistant turn at inference

    @property
    def stop_strings(self) -> list[str]:
        return list(self.stop)

    @property
    def notices(self) -> list[str]:
        return []  # a built-in template needs no explaining

    # ------------------------------------------------------------ rendering

    def _system_for(self, conv: Conversation) -> Optional[str]:
        if conv.system is not None:
            return conv.system
        first = next((m for m in conv.messages if m.role == "user"), None)
        if first is not None and first.input and self.default_system_with_input is not None:
            return self.default_system_with_input
        return self.default_system

    def _clean(self, text: str) -> str:
        return text.strip() if self.strip else text

    def _user_text(self, msg: Message, system: Optional[str], first: bool) -> str:
        if self.user_with_input and msg.input:
            text = _fill(self.user_with_input, content=self._clean(msg.content), input=self._clean(msg.input))
        else:
            text = _fill(self.user, content=self._clean(msg.text))
        if first and system and self.system is None:
            # fold the system prompt into the first user turn, keeping the turn's own wrapping
            inner = _fill(self.system_in_user, system=self._clean(system), content=self._clean(msg.text))
            text = _fill(self.user, content=inner)
        return text

    def _pieces(self, conv: Conversation, trained: list[bool], add_generation_prompt: bool):
        system = self._system_for(conv)
        yield self.prefix, False
        if system and self.system is not None:
            yield _fill(self.system, content=self._clean(system)), False
        first_user = True
        previous = None
        for msg, train in zip(conv.messages, trained):
            if msg.role == "user":
                if previous == "assistant":
                    yield self.turn_separator, False
                yield self._user_text(msg, system, first_user), False
                first_user = False
            else:
                yield self.assistant_prompt, False
                yield _fill(self.assistant, content=self._clean(msg.content)), train
                yield self.assistant_suffix, False
            previous = msg.role
        if add_generation_prompt:
            if previous == "assistant":
                yield self.turn_separator, False
            yield self.assistant_prompt, False

    def render(self, conv: Conversation, trained: list[bool]) -> Rendered:
        out: list[str] = []
        spans: list[Span] = []
        pos = 0
        for text, train in self._pieces(conv, trained, add_generation_prompt=False):
            if train and text:
                spans.append((pos, pos + len(text)))
            out.append(text)
            pos += len(text)
        return Rendered("".join(out), spans)

    def prompt(self, conv: Conversation) -> str:
        """The text that asks for the next assistant turn (conversation ends with a user turn)."""
        return "".join(t for t, _ in self._pieces(conv, [False] * len(conv.messages), add_generation_prompt=True))

    # ------------------------------------------------------------ Jinja export

    def jinja(self) -> str:
        """An equivalent Jinja chat template for `tokenizer.chat_template`.

        It takes HF-style messages (`role`, `content`, and for alpaca an optional `input`).
        """
        q = _jinja_literal
        content = "(message['content'] | trim)" if self.strip else "message['content']"
        full = f"({content} ~ (('\\n\\n' ~ message['input']) if message['input'] is defined and message['input'] else ''))"
        sys_expr = "(system | trim)" if self.strip else "system"

        def expr(fmt: str, **values: str) -> str:
            return _jinja_expr(fmt, values)

        user_plain = expr(self.user, content=full)
        user_folded = expr(self.user, content=expr(self.system_in_user, system=sys_expr, content=full))
        if self.user_with_input:
            input_expr = "(message['input'] | trim)" if self.strip else "message['input']"
            user_input = expr(self.user_with_input, content=content, input=input_expr)
            user_plain = (
                f"({user_input} if message['input'] is defined and message['input'] else {user_plain})"
            )
        default = q(self.default_system) if self.default_system is not None else "none"
        default_input = q(self.default_system_with_input) if self.default_system_with_input is not None else default
        lines = [
            "{%- if messages[0]['role'] == 'system' -%}",
            "{%- set system = messages[0]['content'] -%}{%- set loop_messages = messages[1:] -%}",
            "{%- else -%}{%- set loop_messages = messages -%}",
            "{%- if loop_messages and loop_messages[0]['input'] is defined and loop_messages[0]['input'] -%}",
            f"{{%- set system = {default_input} -%}}",
            f"{{%- else -%}}{{%- set system = {default} -%}}{{%- endif -%}}",
            "{%- endif -%}",
            f"{{{{- {q(self.prefix)} -}}}}",
        ]
        if self.system is not None:
            lines.append(f"{{%- if system -%}}{{{{- {expr(self.system, content=sys_expr)} -}}}}{{%- endif -%}}")
        lines += [
            "{%- for message in loop_messages -%}",
            "{%- if message['role'] == 'user' -%}",
            f"{{%- if not loop.first -%}}{{{{- {q(self.turn_separator)} -}}}}{{%- endif -%}}",
        ]
        if self.system is None:
            lines.append(
                f"{{%- if loop.first and system -%}}{{{{- {user_folded} -}}}}"
                f"{{%- else -%}}{{{{- {user_plain} -}}}}{{%- endif -%}}"
            )
        else:
            lines.append(f"{{{{- {user_plain} -}}}}")
        assistant_content = "(message['content'] | trim)" if self.strip else "message['content']"
        lines += [
            "{%- elif message['role'] == 'assistant' -%}",
            f"{{{{- {q(self.assistant_prompt)} -}}}}",
            "{% generation %}" + f"{{{{- {expr(self.assistant, content=assistant_content)} -}}}}" + "{% endgeneration %}",
            f"{{{{- {q(self.assistant_suffix)} -}}}}",
            "{%- else -%}{{- raise_exception('unknown role: ' ~ message['role']) -}}",
            "{%- endif -%}",
            "{%- endfor -%}",
            "{%- if add_generation_prompt -%}",
            "{%- if loop_messages and loop_messages[-1]['role'] == 'assistant' -%}"
            f"{{{{- {q(self.turn_separator)} -}}}}{{%- endif -%}}",
            f"{{{{- {q(self.assistant_prompt)} -}}}}",
            "{%- endif -%}",
        ]
        return "".join(lines)


def _fill(fmt: str, **values: str) -> str:
    # str.replace, not str.format: contents may hold braces
    for key, value in values.items():
        fmt = fmt.replace("{" + key + "}", value)
    return fmt


def _jinja_literal(text: str) -> str:
    # JSON string syntax (ASCII-escaped) is also a valid Jinja string literal
    return json.dumps(text, ensure_ascii=True)


def _jinja_expr(fmt: str, values: dict[str, str]) -> str:
    """'<s>[INST] {content} [/INST]' -> '("<s>[INST] " ~ expr ~ " [/INST]")'."""
    parts: list[str] = []
    rest = fmt
    while rest:
        cut = min(((rest.find("{" + k + "}"), k) for k in values if "{" + k + "}" in rest), default=None)
        if cut is None:
            parts.append(_jinja_literal(rest))
            break
        index, key = cut
        if index:
            parts.append(_jinja_literal(rest[:index]))
        parts.append(values[key])
        rest = rest[index + len(key) + 2 :]
    return "(" + " ~ ".join(parts or ['""']) + ")"


# ---------------------------------------------------------------- the registry

LLAMA2 = ChatTemplate(
    name="llama2",
    user="<s>[INST] {content} [/INST]",
    assistant=" {content} </s>",
    system_in_user="<<SYS>>\n{system}\n<</SYS>>\n\n{content}",
    stop=("</s>",),
)
VISTRAL_SYSTEM = (
    "Bạn là một trợ lí Tiếng Việt nhiệt tình và trung thực. Hãy luôn trả lời một cách hữu ích nhất "
    "có thể, đồng thời giữ an toàn."
)
CHATML = ChatTemplate(
    name="chatml",
    system="<|im_start|>system\n{content}<|im_end|>\n",
    user="<|im_start|>user\n{content}<|im_end|>\n",
    assistant_prompt="<|im_start|>assistant\n",
    assistant="{content}<|im_end|>",
    assistant_suffix="\n",
    stop=("<|im_end|>",),
)
ALPACA_SYSTEM = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
ALPACA_SYSTEM_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)

TEMPLATES: dict[str, ChatTemplate] = {
    t.name: t
    for t in [
        LLAMA2,
        ChatTemplate(
            name="llama3",
            prefix="<|begin_of_text|>",
            system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
            user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
            assistant_prompt="<|start_header_id|>assistant<|end_header_id|>\n\n",
            assistant="{content}<|eot_id|>",
            stop=("<|eot_id|>",),
        ),
        ChatTemplate(
            name="mistral",
            prefix="<s>",
            user="[INST] {content} [/INST]",
            assistant="{content}</s>",
            system_in_user="{system}\n\n{content}",
            stop=("</s>",),
        ),
        CHATML,
        ChatTemplate(**{**LLAMA2.__dict__, "name": "vistral", "default_system": VISTRAL_SYSTEM}),
        ChatTemplate(
            **{
                **CHATML.__dict__,
                "name": "vinallama",
                "default_system": "Bạn là một trợ lí AI hữu ích. Hãy trả lời người dùng một cách chính xác.",
            }
        ),
        ChatTemplate(
            name="vicuna",
            system="{content} ",
            user="USER: {content} ",
            assistant_prompt="ASSISTANT:",
            assistant=" {content}</s>",
            default_system=(
                "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                "helpful, detailed, and polite answers to the user's questions."
            ),
            stop=("</s>",),
        ),
        ChatTemplate(
            name="vietcuna",
            system="{content}\n\n",
            user="### Human: {content}",
            assistant_prompt="\n\n### Assistant:",
            assistant=" {content}</s>",
            turn_separator="\n\n",
            default_system=(
                "Một cuộc trò chuyện giữa một người dùng tò mò và một trợ lý trí tuệ nhân tạo. Trợ lý đưa ra "
                "các câu trả lời hữu ích, chi tiết và lịch sự cho các câu hỏi của người dùng."
            ),
            stop=("</s>",),
        ),
        ChatTemplate(
            name="alpaca",
            system="{content}\n\n",
            user="### Instruction:\n{content}",
            user_with_input="### Instruction:\n{content}\n\n### Input:\n{input}",
            assistant_prompt="\n\n### Response:\n",
            assistant="{content}</s>",
            turn_separator="\n\n",
            default_system=ALPACA_SYSTEM,
            default_system_with_input=ALPACA_SYSTEM_INPUT,
            stop=("</s>",),
        ),
    ]
}


def get_template(name: str) -> ChatTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ConfigError(
            f"model.template = {name!r} is not a known template; use auto or one of {', '.join(TEMPLATES)}"
        ) from None


# ---------------------------------------------------------------- any Jinja template


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

    def check(self) -> "JinjaTemplate":
        """Try the template on a short conversation, without and with a system prompt:
        raise ConfigError if it cannot be used at all, note what vitune does about the rest."""
        conv = Conversation(list(PROBE))
        try:
            _, found = self._locate(conv)
        except TemplateRefused as exc:
            if exc.reason == "template refused":
                raise ConfigError(
                    f"the tokenizer's chat template cannot render a plain user/assistant conversation: {exc.detail.split(': ', 1)[-1]} "
                    "(a tool-use or otherwise special template?); fix chat_template in tokenizer_config.json or "
                    f"choose a built-in template with model.template ({', '.join(TEMPLATES)})"
                ) from None
            raise ConfigError(
                "the tokenizer's chat template does not render conversations turn by turn (an answer's text "
                f"does not appear in its rendering), so assistant turns cannot be located; choose a built-in "
                f"template with model.template ({', '.join(TEMPLATES)})"
            ) from None
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
            self._locate(Conversation(list(PROBE), system=PROBE_SYSTEM))
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


def resolve_template(name: str, tokenizer) -> Template:
    """The template a run uses: a built-in by name, or (auto) the tokenizer's own, checked
    once on a short conversation (`JinjaTemplate.check`; its notices say what it found).

    With `auto`, a tokenizer whose chat_template is exactly a built-in's export (such as a
    model vitune trained) is rendered by that built-in, which is faster and gives the same text.
    """
    if name != "auto":
        return get_template(name)
    source = getattr(tokenizer, "chat_template", None)
    if not source:
        raise ConfigError(
            "model.template is auto but the tokenizer has no chat_template; "
            f"set model.template to one of {', '.join(TEMPLATES)}"
        )
    if isinstance(source, dict):
        source = source.get("default") or next(iter(source.values()))
    for template in TEMPLATES.values():
        if template.jinja() == source:
            return template
    return JinjaTemplate(tokenizer=tokenizer, source=source).check()
