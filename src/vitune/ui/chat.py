"""The chat tab: a run (or any model folder) answers, optionally beside its base model.

The models are loaded once per folder and kept (vitune.infer.chat, as `vitune chat` loads them).
Each answer is generated in a thread of its own, so the fine-tuned and the base panels stream at
the same time. Stop sets the session's stop event, which ends generate() at the next token (a
StoppingCriteria in ChatModel.stream); the answering event then ends on its own, its last update
showing all that was generated and giving Send back. (Gradio's `cancels=` is not used: cancelling
the event cuts its stream anywhere, so the page could miss the last pieces or get one after Stop's
own update.)
"""

from __future__ import annotations

import threading
from pathlib import Path
from queue import Queue

import gradio as gr

from vitune.errors import UserError
from vitune.ui.text import error_md, one_line, t

SAMPLING = dict(temperature=0.7, top_p=0.9)  # the page's defaults: greedy decoding makes small models loop
_DONE = object()  # a side's thread has finished


class ChatSessions:
    """The chat models this server has loaded, by folder, and the chat handlers of the page."""

    def __init__(self):
        self.models: dict[str, object] = {}
        self.loading = threading.Lock()  # two sessions asking for one folder load it once
        self.running: dict[str, threading.Event] = {}  # the stop event of each browser session's answers

    def model(self, path: str):
        from vitune.infer.chat import load_chat_model

        with self.loading:
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

    def respond(self, message, history, base_history, path, system, temperature, top_p, repetition_penalty,
                max_new_tokens, with_base, lang, request: gr.Request):
        """Yields (answer panel, base panel, message box, error, Send, Stop) as the answers grow; both
        panels' answers are generated at once, each in its own thread."""
        history, base_history = list(history or []), list(base_history or [])
        if not message or not message.strip():
            yield history, base_history, "", "", gr.update(interactive=True), gr.update(interactive=False)
            return
        stop = threading.Event()
        self.running[request.session_hash] = stop  # a Stop while the models load is heard too
        try:
            yield from self._answer(stop, message, history, base_history, path, system, temperature, top_p,
                                    repetition_penalty, max_new_tokens, with_base, lang)
        finally:  # also when the generator is closed early (the page went away): the models stop computing
            stop.set()
            if self.running.get(request.session_hash) is stop:
                del self.running[request.session_hash]

    def _answer(self, stop: threading.Event, message, history, base_history, path, system, temperature, top_p,
                repetition_penalty, max_new_tokens, with_base, lang):
        from vitune.data.records import Message
        from vitune.infer.chat import check_sampling

        busy, idle = (gr.update(interactive=False), gr.update(interactive=True)), \
            (gr.update(interactive=True), gr.update(interactive=False))
        try:
            if not path:
                raise UserError("choose a run or model folder to chat with")
            if None in (temperature, top_p, repetition_penalty, max_new_tokens):
                raise UserError("fill in temperature, top p, repetition penalty and the longest answer")
            check_sampling(float(temperature), float(top_p), float(repetition_penalty), int(max_new_tokens),
                           name=lambda key: key.replace("_", " "))
            yield history, base_history, message, "", *busy  # Send disabled while the models load
            sides = [(self.model(path), history)]
            base = self.base_of(path) if with_base else None
            if with_base and base is None:
                raise UserError(f"{path} names no base model (not a run folder); untick the base model")
            if base:
                sides.append((self.model(base), base_history))
        except Exception as exc:
            yield history, base_history, message, error_md(one_line(exc), lang), *idle
            return
        if stop.is_set():  # stopped while the models loaded
            yield history, base_history, message, "", *idle
            return
        settings = dict(system=system or None, max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                        top_p=float(top_p), repetition_penalty=float(repetition_penalty))
        arrived: Queue = Queue()  # a side's thread puts None per piece, its exception, then _DONE

        def answer(bot, asked: list, turn: dict) -> None:
            try:
                for piece in bot.stream(asked, stop=stop, **settings):
                    turn["content"] += piece
                    arrived.put(None)
            except Exception as exc:
                arrived.put(exc)
            finally:
                arrived.put(_DONE)

        threads = []
        for bot, turns in sides:
            asked = [Message(m["role"], m["content"]) for m in turns] + [Message("user", message)]
            turns += [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
            threads.append(threading.Thread(target=answer, args=(bot, asked, turns[-1]), daemon=True))
        for thread in threads:
            thread.start()
        left, error = len(threads), ""
        while left:
            items = [arrived.get()]
            while not arrived.empty():  # pieces that came together are shown together
                items.append(arrived.get())
            for item in items:
                left -= item is _DONE
                if isinstance(item, Exception) and not error:
                    error = error_md(one_line(item), lang)
            yield history, base_history, "", error, gr.update(), gr.update()
        for _, turns in sides:
            turns[-1]["content"] = turns[-1]["content"].strip()
        yield history, base_history, "", error, *idle

    def stop(self, request: gr.Request) -> None:
        """Stop this session's answers: generate() ends at its next token, and `respond` ends with what was
        generated so far and gives Send back."""
        stop = self.running.get(request.session_hash)
        if stop is not None:
            stop.set()


def chat_tab(chat: ChatSessions, L, lang: str, lang_state, models_here: list[str]):
    """The tab's components and events, inside the page's open Tab. `L` registers a component's
    words for the language switch. Returns the model picker and its refresh button (the page
    refreshes the other tabs' pickers with it)."""
    with gr.Row():
        c_run = L(gr.Dropdown(models_here, value=models_here[0] if models_here else None, allow_custom_value=True,
                              label=t("chat_run", lang), elem_id="chat-run"), "chat_run")
        c_refresh = L(gr.Button(t("refresh", lang), scale=0), "refresh", "value")
        c_base = L(gr.Checkbox(False, label=t("with_base", lang), elem_id="chat-with-base"), "with_base")
    with gr.Row():
        c_temp = L(gr.Number(SAMPLING["temperature"], label=t("temperature", lang), min_width=120,
                             elem_id="chat-temperature"), "temperature")
        c_greedy = L(gr.Checkbox(False, label=t("greedy", lang), elem_id="chat-greedy"), "greedy")
        c_top_p = L(gr.Number(SAMPLING["top_p"], label=t("top_p", lang), min_width=120, elem_id="chat-top-p"), "top_p")
        c_penalty = L(gr.Number(1.0, label=t("repetition_penalty", lang), min_width=120,
                                elem_id="chat-repetition-penalty"), "repetition_penalty")
        c_max = L(gr.Number(128, precision=0, label=t("max_new_tokens", lang), min_width=120,
                            elem_id="chat-max-new-tokens"), "max_new_tokens")
    c_system = L(gr.Textbox("", label=t("system", lang)), "system")
    with gr.Row():
        c_box = L(gr.Chatbot(label=t("chat_model", lang), elem_id="chat-model", height=360), "chat_model")
        c_box_base = L(gr.Chatbot(label=t("chat_base", lang), elem_id="chat-base", height=360, visible=False),
                       "chat_base")
    with gr.Row():
        c_msg = L(gr.Textbox(label=t("message", lang), elem_id="chat-message", scale=4), "message")
        c_send = L(gr.Button(t("send", lang), variant="primary", elem_id="chat-send", scale=0), "send", "value")
        c_stop = L(gr.Button(t("stop_answer", lang), variant="stop", interactive=False, elem_id="chat-stop", scale=0),
                   "stop_answer", "value")
        c_clear = L(gr.Button(t("clear", lang), elem_id="chat-clear", scale=0), "clear", "value")
    c_error = gr.Markdown(elem_classes="vitune-error", elem_id="chat-error")
    chat_in = [c_msg, c_box, c_box_base, c_run, c_system, c_temp, c_top_p, c_penalty, c_max, c_base, lang_state]
    gr.on([c_send.click, c_msg.submit], chat.respond, chat_in,
                      [c_box, c_box_base, c_msg, c_error, c_send, c_stop])
    c_stop.click(chat.stop, None, None, queue=False)
    c_clear.click(lambda: ([], [], ""), None, [c_box, c_box_base, c_error])
    c_base.change(lambda on: gr.update(visible=on), c_base, c_box_base)
    # Greedy is temperature 0: the checkbox sets the number, typing a number sets the checkbox
    c_greedy.input(lambda on: 0.0 if on else SAMPLING["temperature"], c_greedy, c_temp)
    c_temp.input(lambda value: value == 0, c_temp, c_greedy)
    return c_run, c_refresh
