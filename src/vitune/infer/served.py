"""What `vitune serve` serves: one model (a run, model folder, Hub id or .gguf) and the LoRA adapters
put on its base, each under the name a request's `model` field asks for."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from vitune.data.templates import resolve_template, stop_token_ids
from vitune.errors import UserError
from vitune.infer.batching import BASE
from vitune.infer.chat import load_chat_model
from vitune.models.gguf import model_source
from vitune.models.loading import adapter_base, check_adapter_base, load_tokenizer


@dataclass
class ServedModel:
    """One name a request's `model` can ask for: its adapter on the shared base, its template and stop ids."""

    name: str
    adapter: str
    template: object
    stop_ids: list[int]


@dataclass
class Loaded:
    model: object
    tokenizer: object
    models: list[ServedModel]
    uses_adapters: bool
    context: int


def load_served_models(path: str, adapters: list[tuple[str, str]], name: Optional[str] = None,
                       template: str = "auto", allow_pickle: bool = False) -> Loaded:
    """RUN_OR_MODEL (loaded as `vitune chat` loads it) plus NAME=RUN_DIR LoRA adapters on its base, as one
    model whose forward takes `adapter_names`; each served name keeps its own run's template."""
    bot = load_chat_model(path, template=template, allow_pickle=allow_pickle)
    main_adapter = Path(model_source(path)) / "adapter_config.json"
    base = adapter_base(main_adapter) if main_adapter.is_file() else path
    main_name = name or Path(path.rstrip("/")).name or path
    served = [ServedModel(main_name, "default" if main_adapter.is_file() else BASE, bot.template, bot.stop_ids)]
    model = bot.model
    for key, folder in adapters:
        if key in {m.name for m in served}:
            raise UserError(f"--adapter {key}={folder}: the name {key!r} is already served; choose another NAME")
        run = check_adapter_base(folder, base, allow_pickle, label=f"--adapter {key}={folder}",
                                 base_label=f"the served base {base}", fix="serve that base instead")
        tokenizer = load_tokenizer(str(run))
        if len(tokenizer) != len(bot.tokenizer):
            raise UserError(f"--adapter {key}={folder}: its tokenizer has {len(tokenizer)} tokens, the served model's "
                            f"{len(bot.tokenizer)}; adapters that extend the vocabulary cannot share a base")
        chosen = resolve_template(template, tokenizer)
        if hasattr(model, "load_adapter") and hasattr(model, "peft_config"):
            model.load_adapter(str(run), adapter_name=key)
        else:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(run), adapter_name=key)
        served.append(ServedModel(key, key, chosen, stop_token_ids(tokenizer, chosen)))
    model.eval()
    config = getattr(model, "config", None)
    context = getattr(config, "max_position_embeddings", None) or getattr(bot.tokenizer, "model_max_length", 2048)
    return Loaded(model, bot.tokenizer, served, uses_adapters=hasattr(model, "peft_config"), context=int(min(context, 10**7)))
