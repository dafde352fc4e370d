"""Loading a tokenizer and a model (local folder or Hub id, same `from_pretrained` path) and
adapting the model to the fine-tuning method (full, LoRA, QLoRA).

Weights are read from safetensors only: a pickle file (*.bin, *.pt, ...) can run any code
when it is loaded, so a model, adapter or checkpoint that has nothing else is refused
(`check_safe_weights`) unless model.allow_pickle (vitune chat: --allow-pickle) says the
user trusts it. trust_remote_code stays off unless the config turns it on.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Optional

from vitune.config import MethodConfig, ModelConfig
from vitune.errors import UserError
from vitune.models.gguf import is_gguf, model_source


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).exists() or name.count("/") > 1


def _check_model_path(name: str, needs: str = "config.json") -> str:
    """The folder or Hub id to load `name` from (a .gguf file: its converted folder), checked."""
    if is_gguf(name):
        return model_source(name)
    path = Path(os.path.expanduser(name))
    if _looks_local(name) and not path.exists():
        raise UserError(f"model not found: {name} (model.name_or_path must be a local model folder or a Hub id such as Viet-Mistral/Vistral-7B-Chat)")
    if path.is_dir() and not (path / needs).is_file():
        raise UserError(f"{name} is a folder but holds no {needs}; point model.name_or_path at a Hugging Face model folder")
    return name


def _load_error(name: str, what: str, exc: Exception) -> UserError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return UserError(f"cannot load the {what} of {name!r}: {first}")


def damaged_files(name: str, what: str, exc: Exception, files: str) -> UserError:
    """Any other library error while reading a model folder: transformers raises TypeError,
    AttributeError, ... for a damaged or hand-edited file. Names the folder, the error and the files."""
    first = (str(exc).strip().splitlines() or [""])[0]
    return UserError(
        f"cannot load the {what} of {name!r} ({type(exc).__name__}: {first}); {files} may be damaged "
        "or hand-edited: restore them from the original model"
    )


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Trainer's own state in a checkpoint (and training_args.bin beside a saved model): pickle
# format, but not weights; transformers reads the state back with torch.load(weights_only=True).
_TRAINER_FILES = re.compile(r"^(optimizer\.pt|scheduler\.pt|scaler\.pt|rng_state(_\d+)?\.pth|training_args\.bin)$")


def pickle_refused(where: str, files: list[str]) -> UserError:
    found = f" ({', '.join(files)})" if files else ""
    return UserError(
        f"{where} has no safetensors weights, only pickle files{found}; loading pickle can run arbitrary code. "
        "Use safetensors weights, or if you trust their source allow pickle: model.allow_pickle: true "
        "(vitune chat: --allow-pickle)"
    )


def check_safe_weights(name_or_path: str | Path, allow_pickle: bool) -> None:
    """Refuse a local model folder, adapter or checkpoint whose weights are pickle files only.

    Every loader calls this before reading weights. Hub ids are not looked at here:
    `load_pretrained` asks transformers for safetensors and turns its refusal into the same line.
    """
    folder = Path(os.path.expanduser(str(name_or_path)))
    if allow_pickle or not folder.is_dir():
        return
    files = [p.name for p in folder.iterdir() if p.is_file()]
    if any(name.endswith(".safetensors") for name in files):
        return
    pickles = sorted(n for n in files if n.endswith(PICKLE_SUFFIXES) and not _TRAINER_FILES.match(n))
    if pickles:
        raise pickle_refused(str(name_or_path), pickles)


def load_pretrained(auto_class, name_or_path: str, allow_pickle: bool, **kwargs):
    """`auto_class.from_pretrained(name_or_path, **kwargs)` reading the weights from safetensors
    (`use_safetensors=True`, local folder or Hub id) unless `allow_pickle`."""
    check_safe_weights(name_or_path, allow_pickle)
    if not allow_pickle:
        kwargs["use_safetensors"] = True
    try:
        return auto_class.from_pretrained(name_or_path, **kwargs)
    except OSError as exc:
        # a Hub repo with .bin weights only: "... and thus cannot be loaded with `safetensors`."
        if not allow_pickle and "cannot be loaded with `safetensors`" in str(exc):
            raise pickle_refused(name_or_path, []) from None
        raise


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    source = _check_model_path(name_or_path, needs="tokenizer_config.json")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _load_error(name_or_path, "tokenizer", exc) from None
    except Exception as exc:
        raise damaged_files(name_or_path, "tokenizer", exc, "its tokenizer.json, tokenizer_config.json or config.json") from None
    if not isinstance(tokenizer.model_max_length, int):
        raise UserError(f"{name_or_path}: model_max_length = {tokenizer.model_max_length!r} in tokenizer_config.json "
                        "must be a whole number of tokens")
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"{name_or_path}: vitune needs a fast (Rust) tokenizer to map tokens to characters; install `tokenizers` and `sentencepiece`")
    if tokenizer.pad_token is None:
        # Padding positions never carry labels, so any id will do; EOS is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def resolve_dtype(name: str):
    import torch

    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)


def resolve_attention(name: str) -> str:
    import torch

    if name != "auto":
        return name
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_model(model_cfg: ModelConfig, method: MethodConfig, reward_head_pad_id: int | None = None):
    """The base model, in the dtype and attention the config asks for, quantised for QLoRA.

    With `reward_head_pad_id` (stage rm): the model with a scalar head instead of the LM head
    (AutoModelForSequenceClassification, one label; the head starts from random numbers)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    name = _check_model_path(model_cfg.name_or_path)
    dtype = resolve_dtype(model_cfg.dtype)
    kwargs = dict(
        dtype=dtype,
        attn_implementation=resolve_attention(model_cfg.attn_implementation),
        trust_remote_code=model_cfg.trust_remote_code,
    )
    auto_class = AutoModelForCausalLM
    if reward_head_pad_id is not None:
        auto_class = AutoModelForSequenceClassification
        kwargs.update(num_labels=1, pad_token_id=reward_head_pad_id)
    if method.type == "qlora":
        kwargs["quantization_config"] = quantization_config(method, dtype)
    try:
        model = load_pretrained(auto_class, name, model_cfg.allow_pickle, **kwargs)
    except ValueError as exc:
        if "attn_implementation" in kwargs and "does not support" in str(exc) and model_cfg.attn_implementation == "auto":
            kwargs["attn_implementation"] = "eager"  # architecture without SDPA support
            model = load_pretrained(auto_class, name, model_cfg.allow_pickle, **kwargs)
        else:
            raise _load_error(name, "model", exc) from None
    except OSError as exc:
        raise _load_error(name, "model", exc) from None
    return model


def quantization_config(method: MethodConfig, dtype):
    import torch
    from transformers import BitsAndBytesConfig

    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("method.type: qlora needs bitsandbytes; install it with: pip install bitsandbytes")
    q = method.quantization
    compute = dtype if q.compute_dtype == "auto" else getattr(torch, q.compute_dtype)
    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=compute,
    )


def adapter_base(adapter: Path) -> str:
    """base_model_name_or_path of an adapter_config.json, or one line saying what is wrong with it."""
    try:
        settings = json.loads(adapter.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        settings = None
    if not isinstance(settings, dict):
        raise UserError(f"{adapter}: not a JSON object (damaged?); restore it from the run, or retrain")
    name = settings.get("base_model_name_or_path")
    if not isinstance(name, str) or not name.strip():
        raise UserError(f"{adapter}: base_model_name_or_path is {name!r}, not a model; pass --base MODEL_FOLDER_OR_HUB_ID")
    return name



def same_model(a: str, b: str) -> bool:
    pa, pb = Path(os.path.expanduser(a)), Path(os.path.expanduser(b))
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a.rstrip("/") == b.rstrip("/")


def check_adapter_base(adapter: str, name_or_path: str, allow_pickle: bool, label: Optional[str] = None,
                       base_label: Optional[str] = None, fix: Optional[str] = None) -> Path:
    """model.adapter: a LoRA adapter folder (or run folder holding one) made on model.name_or_path.

    Refused in one line when it is not one, or when it was trained on another base: its
    weights would be applied to the wrong model (and, as a DPO reference, silently wrong).
    `label`, `base_label` and `fix` word the message for another caller (vitune serve's --adapter)."""
    label = label or f"model.adapter = {adapter}"
    folder = Path(os.path.expanduser(adapter))
    if not folder.is_dir():
        raise UserError(f"{label}: folder not found (give a LoRA run folder such as runs/my-sft)")
    settings = folder / "adapter_config.json"
    if not settings.is_file():
        full = " (it is a full model: set model.name_or_path to it instead)" if (folder / "config.json").is_file() else ""
        raise UserError(f"{label}: no adapter_config.json, so not a LoRA adapter{full}")
    if (folder / "config.yaml").is_file() and not (folder / "summary.json").is_file():
        raise UserError(f"{label} is an unfinished run (no summary.json): train it to the end first")
    base = adapter_base(settings)
    if not same_model(base, name_or_path) and not same_model(model_source_name(base), model_source_name(name_or_path)):
        raise UserError(f"{label} was trained on {base}, not on {base_label or 'model.name_or_path = ' + name_or_path}; "
                        f"{fix or 'set model.name_or_path: ' + base}")
    check_safe_weights(folder, allow_pickle)
    return folder


def model_source_name(name: str) -> str:
    """The folder a model name loads from (a .gguf file: its converted folder, without converting)."""
    if is_gguf(name):
        return model_source(name)
    return name


def train_token_ids(setting, model) -> list[int] | None:
    """method.lora.train_tokens -> token ids: `new` reads the rows `vitune vocab extend` added
    from the model folder's vocab_report.json."""
    if setting is None:
        return None
    rows = model.get_input_embeddings().weight.shape[0]
    if setting == "new":
        folder = Path(getattr(model, "name_or_path", "") or ".")
        report = folder / "vocab_report.json"
        if not report.is_file():
            raise UserError(f"method.lora.train_tokens: new needs a model made by `vitune vocab extend`; {folder} has "
                            "no vocab_report.json (give a list of token ids instead)")
        ids = json.loads(report.read_text(encoding="utf-8")).get("new_token_ids") or []
        if not ids:
            raise UserError(f"method.lora.train_tokens: new: {report} lists no new token ids; extend the vocabulary "
                            "again with this vitune, or give a list of token ids")
    else:
        ids = list(setting)
    bad = [i for i in ids if not 0 <= i < rows]
    if bad:
        raise UserError(f"method.lora.train_tokens: token id {bad[0]} is outside the model's {rows} embedding rows")
    return ids


def adapt_model(model, method: MethodConfig, gradient_checkpointing: bool, task_type: str = "CAUSAL_LM",
                adapter: str | None = None, allow_pickle: bool = False):
    """full: train every weight; lora/qlora: wrap in a PEFT LoRA adapter -- a new one, or the
    adapter of an earlier run (`model.adapter`) trained further."""
    if method.type == "full":
        return model
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    if method.type == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    if adapter:
        try:
            return PeftModel.from_pretrained(model, str(Path(os.path.expanduser(adapter))), is_trainable=True)
        except Exception as exc:
            raise damaged_files(adapter, "adapter", exc, "its adapter_config.json or adapter_model.safetensors") from None
    lora = method.lora
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        modules_to_save=lora.modules_to_save,
        trainable_token_indices=train_token_ids(lora.train_tokens, model),
        task_type=task_type,
    )
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise UserError(f"method.lora: {str(exc).splitlines()[0]}") from None


def cache_keyword() -> str:
    """The forward's name for the KV cache, in and out: transformers 5.x renamed `past_key_values`
    to `cache` (the old name warns at every step and goes in 5.40)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
