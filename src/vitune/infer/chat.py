"""Chatting with a trained run (or any model folder): load, render with the saved template,
generate token by token."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from threading import Thread
from typing import Iterator, Optional

from vitune.data.records import Conversation, Message
from vitune.data.templates import Template, resolve_template
from vitune.errors import UserError
from vitune.models.loading import load_tokenizer, resolve_dtype


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
    ) -> Iterator[str]:
        """Yield the answer's text piece by piece as it is generated."""
        import torch
        from transformers import TextIteratorStreamer

        prompt = self.template.prompt(Conversation(messages, system=system))
        enc = self.tokenizer(prompt, add_special_tokens=False, return_tensors="pt").to(self.model.device)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
        kwargs = dict(
            **enc,
            max_new_tokens=max_new_tokens,
            eos_token_id=self.stop_ids,
            pad_token_id=self.tokenizer.pad_token_id,
            streamer=streamer,
            **sampling,
        )
        worker = Thread(target=lambda: torch.no_grad()(self.model.generate)(**kwargs), daemon=True)
        worker.start()
        yield from streamer
        worker.join()

    def answer(self, messages: list[Message], system: Optional[str] = None, **kwargs) -> str:
        return "".join(self.stream(messages, system=system, **kwargs)).strip()


def load_chat_model(path: str, template: str = "auto", base: Optional[str] = None) -> ChatModel:
    """A run folder (adapter or full model) or any model folder / Hub id, ready to chat."""
    import torch
    from transformers import AutoModelForCausalLM

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

        base_name = base or json.loads(adapter.read_text())["base_model_name_or_path"]
        try:
            model = AutoModelForCausalLM.from_pretrained(base_name, dtype=dtype)
        except OSError as exc:
            raise UserError(f"cannot load the base model {base_name!r} of the adapter in {path}: {str(exc).splitlines()[0]}; pass --base") from None
        model = PeftModel.from_pretrained(model, str(run))
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        except OSError as exc:
            raise UserError(f"cannot load a model from {path}: {str(exc).splitlines()[0]}") from None
    if torch.cuda.is_available():
        model = model.to("cuda")
    model.eval()
    stop_ids = []
    for text in chosen.stop_strings:
        ids = tokenizer.convert_tokens_to_ids(text)
        if isinstance(ids, int) and ids != tokenizer.unk_token_id:
            stop_ids.append(ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in stop_ids:
        stop_ids.append(tokenizer.eos_token_id)
    return ChatModel(model, tokenizer, chosen, stop_ids)
