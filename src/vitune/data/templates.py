"""Chat templates: a registry of small declarative entries, plus the tokenizer's own Jinja.

A template turns a `Conversation` into one string and the character spans of the parts
the model learns (each assistant turn with its end-of-turn marker). Built-in templates
render in Python (fast, spans known while writing) and export an equivalent Jinja
`chat_template` that is saved with the trained tokenizer, so inference renders exactly
what training saw. A tokenizer's own Jinja template (`template: auto`) is rendered with
`apply_chat_template` and its answers are located in the rendering (`jinja_template.py`),
so masks are right for any template, not only ours.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional, Protocol

from vitune.data.jinja_template import JinjaTemplate, Rendered, Span, TemplateRefused  # noqa: F401 (re-exported)
from vitune.data.records import Conversation, Message
from vitune.errors import ConfigError

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
        # Gemma 2 and 3: no system turn (Gemma 3's template puts the system prompt at the start of
        # the first user turn, Gemma 2's refuses one); the assistant is called "model"
        ChatTemplate(
            name="gemma",
            prefix="<bos>",
            user="<start_of_turn>user\n{content}<end_of_turn>\n",
            assistant_prompt="<start_of_turn>model\n",
            assistant="{content}<end_of_turn>",
            assistant_suffix="\n",
            stop=("<end_of_turn>",),
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
    if not isinstance(source, str):
        raise ConfigError(
            f"the tokenizer's chat_template is {type(source).__name__} {source!r:.60}, not Jinja text; fix chat_template "
            f"in tokenizer_config.json or set model.template to one of {', '.join(TEMPLATES)}"
        )
    for template in TEMPLATES.values():
        if template.jinja() == source:
            return template
    return JinjaTemplate(tokenizer=tokenizer, source=source).check(builtin_names=TEMPLATES)


def stop_token_ids(tokenizer, template) -> list[int]:
    """The token ids that end an answer: the template's end-of-turn markers and the tokenizer's EOS
    (as `vitune chat` stops)."""
    ids = []
    for text in template.stop_strings:
        token = tokenizer.convert_tokens_to_ids(text)
        if isinstance(token, int) and token != tokenizer.unk_token_id and token not in ids:
            ids.append(token)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids
