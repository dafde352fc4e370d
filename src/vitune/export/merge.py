"""`vitune merge RUN --out DIR`: a LoRA / QLoRA run folder -> one ordinary model folder.

The story: check the run (finished, a causal-LM adapter, its base the one it was trained on)
-> load the base as training saw it -> attach the adapter -> PEFT's `merge_and_unload` ->
save the weights, the run's tokenizer (it carries the chat template used in training), a
generation_config.json whose `eos_token_id` lists every id that ends an answer (the template's
end-of-turn markers and the EOS, as `vitune chat` stops) and a model card (README.md, models/card.py)
-> rename into place.

QLoRA: the adapter was trained against the 4-bit (NF4/FP4) weights, not the 16-bit ones they
were made from, so by default the base is loaded in 4 bits as in training and de-quantised
(`model.dequantize()`, bitsandbytes) before the merge: base + adapter is then exactly what the
run trained, up to the de-quantisation's rounding. `qlora_base="original"` merges into the
16-bit original instead (closer to the source model, further from what was trained).

Everything is written to a temporary folder beside `out` and renamed at the end, so a folder at
`out` is always complete. Trainable new-token rows (`method.lora.train_tokens`) and
`modules_to_save` are merged too: the result has the base's (possibly extended) vocabulary.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from vitune.config import load_run_config, makes_reward_model
from vitune.data.templates import TemplateRefused, resolve_template, stop_token_ids
from vitune.errors import ConfigError, UserError
from vitune.models.card import write_merged_card
from vitune.models.loading import check_adapter_base, load_model, load_tokenizer
from vitune.models.permissions import umask_modes

DTYPES = ("auto", "float32", "bfloat16", "float16")


def check_run(run: Path):
    """The run's config, or one line saying why this folder cannot be merged."""
    if not run.is_dir():
        raise UserError(f"{run}: folder not found (give a run folder such as runs/quickstart)")
    if not (run / "config.yaml").is_file():
        raise UserError(f"{run}: no config.yaml, so not a vitune run folder")
    if not (run / "summary.json").is_file():
        raise UserError(f"{run} is an unfinished run (no summary.json): train it to the end (or resume it) first")
    config = load_run_config(run)
    if config.method.type == "full":
        raise UserError(f"{run} is a full fine-tune: it is already a complete model folder, with nothing to merge")
    if makes_reward_model(config.train.stage):
        raise UserError(f"{run} is a reward model (train.stage: rm); merge makes causal LMs. Load it with "
                        "AutoModelForSequenceClassification + PeftModel, or score with `vitune score`")
    if not (run / "adapter_config.json").is_file():
        raise UserError(f"{run}: no adapter_config.json; the run's adapter is missing")
    return config


def merge_run(run: str | Path, out: str | Path, dtype: str = "auto", qlora_base: str = "dequantized",
              force: bool = False) -> dict:
    """Merge a LoRA / QLoRA run into its base and write the model folder `out`; returns what was done."""
    from peft import PeftModel

    run, out = Path(run), Path(out)
    config = check_run(run)
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    if qlora_base not in ("dequantized", "original"):
        raise UserError(f"--qlora-base {qlora_base}: choose dequantized or original")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise UserError(f"--out {out} already exists; choose another folder or add --force to replace it")
    check_adapter_base(str(run), config.model.name_or_path, config.model.allow_pickle)

    method = config.method
    quantized = method.type == "qlora" and qlora_base == "dequantized"
    if method.type == "qlora" and not quantized:
        method = method.model_copy(update={"type": "lora"})
    model_cfg = config.model.model_copy(update={"dtype": "float32" if quantized else config.model.dtype})
    base = load_model(model_cfg, method)
    if quantized:
        base = base.dequantize()  # the 4-bit weights the adapter was trained against, as floats
    model = PeftModel.from_pretrained(base, str(run)).merge_and_unload()
    target = _dtype(dtype, config.model.name_or_path, config.model.trust_remote_code)
    model = model.to(target)

    tokenizer = load_tokenizer(str(run))  # the run's copy: it holds the chat template used in training
    try:
        template = resolve_template("auto", tokenizer)
    except (ConfigError, TemplateRefused):
        template = None  # a pt run of a base model without a chat template
    stops = stop_token_ids(tokenizer, template) if template else [tokenizer.eos_token_id]
    model.generation_config.eos_token_id = stops  # a list: generate stops at any of them
    if tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id

    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        model.save_pretrained(str(partial), safe_serialization=True)
        tokenizer.save_pretrained(str(partial), save_jinja_files=False)
        (partial / "chat_template.jinja").unlink(missing_ok=True)
        if (Path(config.model.name_or_path) / "vocab_report.json").is_file():
            shutil.copy2(Path(config.model.name_or_path) / "vocab_report.json", partial / "vocab_report.json")
        done = {
            "run": str(run), "base": config.model.name_or_path, "method": config.method.type,
            "qlora_base": qlora_base if config.method.type == "qlora" else None,
            "dtype": str(target).replace("torch.", ""), "eos_token_id": stops,
            "template": template.name if template else None,
        }
        (partial / "vitune_merge.json").write_text(json.dumps(done, indent=2), encoding="utf-8")
        write_merged_card(partial, done, shown=str(out))  # README.md: base, run, data, figures, how to load it
        umask_modes(partial)  # mkdtemp's 0700 and safetensors' 0600 would keep other accounts out
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        partial.rename(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return done


def _dtype(name: str, base: str, trust_remote_code: bool):
    """--dtype -> a torch dtype; auto: the dtype the base model was saved in (float32 when it names none)."""
    import torch
    from transformers import AutoConfig

    if name != "auto":
        return getattr(torch, name)
    saved = getattr(AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code), "dtype", None)
    if isinstance(saved, str):
        saved = getattr(torch, saved, None)
    return saved if isinstance(saved, torch.dtype) else torch.float32
