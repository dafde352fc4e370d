"""Chatting with a trained run (or any model folder): load, render with the saved template,
generate token by token."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from threading import Event, Thread
from typing import Iterator, Optional

from vitune.data.records import Conversation, Message, fold_system_prompt
from vitune.data.templates import Template, resolve_template, stop_token_ids
from vitune.errors import UserError
from vitune.models.gguf import model_source
from vitune.models.loading import (
    adapter_base, check_safe_weights, damaged_files, load_pretrained, load_tokenizer, resolve_dtype,
)


def whole_character_streamer(tokenizer):
    """A TextIteratorStreamer whose last piece ends on a whole character.

    A byte-level BPE token (or a SentencePiece byte token) can hold the first bytes of a character whose
    last byte comes in the next token: Llama 3 spells " THẲNG" as " TH", the first two bytes of "Ẳ", its
    last byte, "NG". Mid-answer the streamer holds such bytes back until the character is complete; but
    when generation ends between the two tokens (the token limit, Stop) it flushes them, decoded as
    U+FFFD (" TH" + U+FFFD). The last piece drops them here; the text before them stays."""
    from transformers import TextIteratorStreamer

    class WholeCharacterStreamer(TextIteratorStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            super().on_finalized_text(text.rstrip("\ufffd") if stream_end else text, stream_end)

    return WholeCharacterStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def stop_when_set(stop: Event):
    """A StoppingCriteria that ends generate() at the next token once `stop` is set (the page's Stop button),
    so the model stops computing rather than only the page stopping to show it."""
    import torch
    from transformers import StoppingCriteria

    class StopWhenSet(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

    return StopWhenSet()


@dataclass
class ChatModel:
    model: object
    tokenizer: object
    template: Template
    stop_ids: list[int] = field(default_factory=list)

    def stream(
        self,
        messages: list[Message],
        system: Optional[str] = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 0.9,
        repetition_penalty: float = 1.0,
        stop: Optional[Event] = None,
    ) -> Iterator[str]:
        """Yield the answer's text piece by piece as it is generated; the pieces end on a whole character.
        Setting `stop` (from any thread) ends generation after the token being computed; the pieces
        yielded so far are the answer."""
        import torch
        from transformers import StoppingCriteriaList

        conv = Conversation(messages, system=system)
        if system and getattr(self.template, "system_refused", None):
            conv = fold_system_prompt(conv)  # a template that takes none (Gemma's): before the first question
        prompt = self.template.prompt(conv)
        enc = self.tokenizer(prompt, add_special_tokens=False, return_tensors="pt").to(self.model.device)
        streamer = whole_character_streamer(self.tokenizer)
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
        if repetition_penalty != 1.0:  # above 1 makes tokens already in the prompt or answer less likely
            sampling["repetition_penalty"] = repetition_penalty
        if stop is not None:
            sampling["stopping_criteria"] = StoppingCriteriaList([stop_when_set(stop)])
        kwargs = dict(
            **enc,
            max_new_tokens=max_new_tokens,
            eos_token_id=self.stop_ids,
            pad_token_id=self.tokenizer.pad_token_id,
            streamer=streamer,
            **sampling,
        )
        failed: list[BaseException] = []

        def generate() -> None:
            try:
                with torch.no_grad():
                    self.model.generate(**kwargs)
            except BaseException as exc:  # raised again below, in the caller's thread; the streamer must not wait forever
                failed.append(exc)
                streamer.end()

        worker = Thread(target=generate, daemon=True)
        worker.start()
        yield from streamer
        worker.join()
        if failed:
            raise failed[0]

    def answer(self, messages: list[Message], system: Optional[str] = None, **kwargs) -> str:
        return "".join(self.stream(messages, system=system, **kwargs)).strip()


def check_sampling(temperature: float, top_p: float, repetition_penalty: float, max_new_tokens: int,
                   name=lambda key: "--" + key.replace("_", "-")) -> None:
    """The generation settings of `vitune chat` and the page's chat tab, checked before a model loads:
    generate() would raise in its worker thread. `name` spells a setting as the user typed it
    (`--top-p` on the command line)."""
    if not temperature >= 0 or temperature == float("inf"):
        raise UserError(f"{name('temperature')} {temperature}: use 0 (greedy) or a positive number such as 0.7")
    if not 0 < top_p <= 1:
        raise UserError(f"{name('top_p')} {top_p}: use a number above 0 and at most 1, such as 0.9")
    if not 0 < repetition_penalty < float("inf"):
        raise UserError(f"{name('repetition_penalty')} {repetition_penalty}: use a positive number, 1 for none, such as 1.2")
    if max_new_tokens < 1:
        raise UserError(f"{name('max_new_tokens')} {max_new_tokens}: use at least 1")


def check_generation_config(model, path: str, vocab: int) -> None:
    """The token ids of generation_config.json, checked before generate() fails on them in its thread."""
    settings = getattr(model, "generation_config", None)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(settings, key, None)
        ids = value if isinstance(value, list) else [value]
        if value is not None and not all(type(i) is int and 0 <= i < vocab for i in ids):
            raise UserError(f"{path}: generation_config.json has {key} = {value!r}, not a token id (0 to {vocab - 1}); "
                            "fix it or delete generation_config.json")


def load_chat_model(path: str, template: str = "auto", base: Optional[str] = None,
                    allow_pickle: bool = False) -> ChatModel:
    """A run folder (adapter or full model) or any model folder / Hub id, ready to chat.
    Weights are read from safetensors only, unless `allow_pickle` (models/loading.py)."""
    import torch
    from transformers import AutoModelForCausalLM

    path = model_source(path)  # a .gguf file: its converted folder (models/gguf.py)
    run = Path(path)
    if run.is_dir() and (run / "config.yaml").is_file() and not (run / "summary.json").is_file():
        raise UserError(f"{path} is an unfinished run (no summary.json): training did not complete; train again")
    if not run.exists() and path.startswith((".", "/", "runs")):
        raise UserError(f"run folder not found: {path}")
    tokenizer = load_tokenizer(path)
    chosen = resolve_template(template, tokenizer)
    dtype = resolve_dtype("auto")
    adapter = run / "adapter_config.json"
    if adapter.is_file():
        from peft import PeftModel

        check_safe_weights(run, allow_pickle)  # the adapter's own weights, before the base is loaded
        base_name = base or adapter_base(adapter)
        try:
            model = load_pretrained(AutoModelForCausalLM, base_name, allow_pickle, dtype=dtype)
        except UserError:
            raise
        except OSError as exc:
            raise UserError(f"cannot load the base model {base_name!r} of the adapter in {path}: {str(exc).splitlines()[0]}; pass --base") from None
        except Exception as exc:
            raise damaged_files(base_name, "base model", exc, "its config.json or weights") from None
        try:
            model = PeftModel.from_pretrained(model, str(run))
        except Exception as exc:
            raise damaged_files(path, "adapter", exc, "its adapter_config.json or adapter_model.safetensors") from None
    else:
        try:
            model = load_pretrained(AutoModelForCausalLM, path, allow_pickle, dtype=dtype)
        except UserError:
            raise
        except OSError as exc:
            raise UserError(f"cannot load a model from {path}: {str(exc).splitlines()[0]}") from None
        except Exception as exc:
            raise damaged_files(path, "model", exc, "its config.json or model weights") from None
    check_generation_config(model, path, len(tokenizer))
    if torch.cuda.is_available():
        model = model.to("cuda")
    model.eval()
    return ChatModel(model, tokenizer, chosen, stop_token_ids(tokenizer, chosen))
