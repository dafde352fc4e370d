"""The chat tab: a run (or any model folder) answers, optionally beside its base model.

The models are loaded once per folder and kept (vitune.infer.chat, as `vitune chat` loads them);
the page streams each answer as it is generated.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from vitune.errors import UserError
from vitune.ui.text import error_md, one_line, t


class ChatSessions:
    """The chat models this server has loaded, by folder, and the chat handler of the page."""

    def __init__(self):
        self.models: dict[str, object] = {}

    def model(self, path: str):
        from vitune.infer.chat import load_chat_model

        if path not in self.models:
            self.models[path] = load_chat_model(path)
        return self.models[path]

    @staticmethod
    def base_of(path: str) -> str | None:
        from vitune.config import load_run_config

        if (Path(path) / "config.yaml").is_file():
            try:
                return load_run_config(path).model.name_or_path
            except Exception:
                return None
        return None

    def respond(self, message, history, base_history, path, system, temperature, max_new_tokens, with_base, lang):
        from vitune.data.records import Message

        history, base_history = list(history or []), list(base_history or [])
        if not message or not message.strip():
            yield history, base_history, "", ""
            return
        try:
            if not path:
                raise UserError("choose a run or model folder to chat with")
            if not 0 <= float(temperature) < float("inf"):
                raise UserError(f"temperature {temperature}: use 0 (greedy) or a positive number such as 0.7")
            sides = [(self.model(path), history)]
            base = self.base_of(path) if with_base else None
            if with_base and base is None:
                raise UserError(f"{path} names no base model (not a run folder); untick the base model")
            if base:
                sides.append((self.model(base), base_history))
        except Exception as exc:
            yield history, base_history, message, error_md(one_line(exc), lang)
            return
        settings = dict(system=system or None, max_new_tokens=int(max_new_tokens), temperature=float(temperature))
        for bot, turns in sides:
            asked = [Message(m["role"], m["content"]) for m in turns] + [Message("user", message)]
            turns += [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
            try:
                for piece in bot.stream(asked, **settings):
                    turns[-1]["content"] += piece
                    yield history, base_history, "", ""
            except Exception as exc:
                turns[-1]["content"] = turns[-1]["content"].strip()
                yield history, base_history, "", error_md(one_line(exc), lang)
                return
            turns[-1]["content"] = turns[-1]["content"].strip()
        yield history, base_history, "", ""


def chat_tab(chat: ChatSessions, L, lang: str, lang_state, models_here: list[str]):
    """The tab's components and events, inside the page's open Tab. `L` registers a component's
    words for the language switch. Returns the model picker and its refresh button (the page
    refreshes the other tabs' pickers with it)."""
    with gr.Row():
        c_run = L(gr.Dropdown(models_here, value=models_here[0] if models_here else None, allow_custom_value=True,
                              label=t("chat_run", lang), elem_id="chat-run"), "chat_run")
        c_refresh = L(gr.Button(t("refresh", lang), scale=0), "refresh", "value")
        c_temp = L(gr.Number(0.0, label=t("temperature", lang), min_width=120), "temperature")
        c_max = L(gr.Number(128, precision=0, label=t("max_new_tokens", lang), min_width=120), "max_new_tokens")
        c_base = L(gr.Checkbox(False, label=t("with_base", lang), elem_id="chat-with-base"), "with_base")
    c_system = L(gr.Textbox("", label=t("system", lang)), "system")
    with gr.Row():
        c_box = L(gr.Chatbot(label=t("chat_model", lang), elem_id="chat-model", height=360), "chat_model")
        c_box_base = L(gr.Chatbot(label=t("chat_base", lang), elem_id="chat-base", height=360), "chat_base")
    with gr.Row():
        c_msg = L(gr.Textbox(label=t("message", lang), elem_id="chat-message", scale=4), "message")
        c_send = L(gr.Button(t("send", lang), variant="primary", elem_id="chat-send", scale=0), "send", "value")
        c_clear = L(gr.Button(t("clear", lang), scale=0), "clear", "value")
    c_error = gr.Markdown(elem_classes="vitune-error", elem_id="chat-error")
    chat_in = [c_msg, c_box, c_box_base, c_run, c_system, c_temp, c_max, c_base, lang_state]
    c_send.click(chat.respond, chat_in, [c_box, c_box_base, c_msg, c_error])
    c_msg.submit(chat.respond, chat_in, [c_box, c_box_base, c_msg, c_error])
    c_clear.click(lambda: ([], [], ""), None, [c_box, c_box_base, c_error])
    return c_run, c_refresh
