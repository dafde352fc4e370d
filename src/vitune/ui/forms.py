"""The training form: its fields are config keys, its values become the same YAML a user would
write, and that YAML goes through the CLI's own validation, estimate and advice. A problem is
reported against the field whose key the message names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import yaml

from vitune.config import LEARNING_RATES as CONFIG_RATES
from vitune.config import RunConfig, validate_config
from vitune.data.sources import looks_local, resolve_files
from vitune.errors import UserError
from vitune.ui.text import t

# every key of the form, in the order of the page; values come back from the page in this order
FIELDS = (
    "model.name_or_path", "model.template", "train.stage", "method.type",
    "method.lora.r", "method.lora.alpha", "method.lora.dropout", "method.quantization.bits",
    "data.train", "data.max_length", "data.packing", "data.val_size",
    "train.epochs", "train.max_steps", "train.learning_rate", "train.micro_batch_size",
    "train.gradient_accumulation", "train.logging_steps", "train.eval_steps", "train.save_steps",
    "train.output_dir", "train.overwrite",
)
INTEGERS = {"method.lora.r", "method.lora.alpha", "method.quantization.bits", "data.max_length",
            "train.max_steps", "train.micro_batch_size", "train.gradient_accumulation", "train.logging_steps",
            "train.eval_steps", "train.save_steps"}
ZERO_IS_UNSET = {"train.max_steps", "train.eval_steps", "train.save_steps"}
# the learning rate the form starts from for each method: the config's default for it
LEARNING_RATES = {method: rates.default for method, rates in CONFIG_RATES.items()}

DEFAULTS = {
    "model.name_or_path": "runs/smollm2-135m-instruct", "model.template": "auto", "train.stage": "sft",
    "method.type": "lora", "method.lora.r": 16, "method.lora.alpha": 32, "method.lora.dropout": 0.0,
    "method.quantization.bits": 4, "data.train": "data/alpaca_vi.jsonl\ndata/sharegpt_vi.jsonl",
    "data.max_length": 1024, "data.packing": True, "data.val_size": 20, "train.epochs": 1.0,
    "train.max_steps": 0, "train.learning_rate": LEARNING_RATES["lora"], "train.micro_batch_size": 1,
    "train.gradient_accumulation": 1, "train.logging_steps": 5, "train.eval_steps": 0, "train.save_steps": 0,
    "train.output_dir": "runs/ui-run", "train.overwrite": False,
}


@dataclass
class Checked:
    config: Optional[RunConfig]  # None when a problem was found
    field: Optional[str] = None  # the form key the problem is about
    message: str = ""
    model_config: object = None  # the model's config.json, when it could be read
    raw: Optional[dict] = None  # the config as the user would write it

    @property
    def yaml(self) -> str:
        """The YAML `vitune train` is given: the form's keys only (the rest are the defaults)."""
        return yaml.safe_dump(self.raw, sort_keys=False, allow_unicode=True) if self.config else ""


def data_paths(text) -> list[str]:
    """One path per line (or comma), as data.train[].path takes them: a file, a folder of data files,
    a glob or a Hub dataset name (data.sources reads each)."""
    text = text if isinstance(text, str) else "" if text is None else str(text)  # a page sends any type
    return [p.strip() for line in text.splitlines() for p in line.split(",") if p.strip()]


def raw_config(values: dict) -> dict:
    """Form values {key: value} -> the nested dict of a run config, as a user would write it:
    settings the chosen method does not use are left out (the config refuses them)."""
    raw: dict = {}
    for key, value in values.items():
        if key == "data.train":
            value = [{"path": p} for p in data_paths(value)]
        elif isinstance(value, float) and key in INTEGERS and value.is_integer():
            value = int(value)
        if key in ZERO_IS_UNSET and not value:
            continue
        if key == "data.val_size" and isinstance(value, float) and value.is_integer():
            value = int(value)
        node = raw
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    method = raw.get("method", {})
    if method.get("type") != "qlora":
        method.pop("quantization", None)
    if method.get("type") == "full":
        method.pop("lora", None)
    return raw


def inspection_config(model: str, template: str, files: str, max_length, packing: bool) -> dict:
    """The config the data tab inspects: the data as a run of this model would read it, bad
    rows counted and listed (on_error: skip) instead of stopping at the first."""
    return raw_config({"model.name_or_path": model, "model.template": template, "data.train": files,
                       "data.max_length": max_length, "data.packing": packing, "data.on_error": "skip"})


def field_of(message: str) -> Optional[str]:
    """The form key a config message is about: the longest one it names."""
    named = [k for k in FIELDS if k in message]
    return max(named, key=len) if named else None


def learning_rate_for(method: str, current):
    """The learning rate after the method changes: the new method's default when the box holds a
    method's default (or nothing), else the rate the user typed."""
    if current is None or current in LEARNING_RATES.values():
        return LEARNING_RATES.get(method, current)
    return current


def check(values: dict, resume: bool = False) -> Checked:
    """Validate as `vitune train` does, run its start-up checks (the output folder's rules, resume,
    train.deepspeed / fsdp, the stage's rules: `resume` checks as the Resume button starts), then
    read the model's config.json (for the estimate and the context limit); every failure is one
    line against its field."""
    from vitune.models.architecture import load_model_config
    from vitune.train.guidance import check_max_length
    from vitune.train.preflight import startup_checks

    raw = raw_config(values)
    if not raw.get("data", {}).get("train"):
        return Checked(None, "data.train", "data.train: give at least one data file or folder")
    for spec in raw["data"]["train"]:  # as training will read them (a local path that finds nothing fails)
        try:
            missing = looks_local(spec["path"]) and not resolve_files(spec["path"])
        except UserError as exc:  # e.g. a folder without data files
            return Checked(None, "data.train", f"data.train: {exc}")
        if missing:
            return Checked(None, "data.train", f"data.train: file not found: {spec['path']}")
    try:
        config = validate_config(raw, source="form")
    except UserError as exc:
        return Checked(None, field_of(str(exc)), str(exc))
    try:
        train = {"resume": "auto", "overwrite": False} if resume else {}
        startup_checks(config.model_copy(update={"train": config.train.model_copy(update=train)}))
    except UserError as exc:
        return Checked(None, field_of(str(exc)), str(exc))
    try:
        model_config = load_model_config(config.model.name_or_path, config.model.trust_remote_code)
        check_max_length(config, model_config)
    except UserError as exc:
        return Checked(None, field_of(str(exc)) or "model.name_or_path", str(exc), None)
    return Checked(config, model_config=model_config, raw=raw)


def estimate_text(checked: Checked, device: str, lang: str = "en") -> str:
    """The estimate of `vitune estimate` as a short Markdown table in the page's language, with
    the predicted speed as a range (a prediction, not a measurement)."""
    from vitune.models.estimate import estimate

    if checked.config is None or checked.model_config is None:
        return ""
    try:
        r = estimate(checked.config, checked.model_config, device)
    except UserError as exc:
        return str(exc)
    parts = [("base weights", r.base_weights), ("LoRA adapter", r.lora_params), ("gradients", r.gradients),
             ("optimizer states", r.optimizer_states), ("activations", r.activations),
             ("logits + loss", r.logits_loss)]
    lines = [f"| {t('est part', lang)} | GiB |", "|---|---:|"]
    lines += [f"| {t('est ' + name, lang)} | {value:.2f} |" for name, value in parts]
    lines.append(f"| **{t('est peak', lang, device=r.device)}** | **{r.total:.2f}** |")
    low, high = getattr(r, "tokens_per_s_range", None) or (r.predicted_tokens_per_s,) * 2
    speed = f"{low:,.0f}" if round(low) == round(high) else f"{low:,.0f}–{high:,.0f}"
    lines += ["", t("est line", lang, trainable=f"{r.trainable_params:,}", total=f"{r.total_params:,}", speed=speed)]
    return "\n".join(lines)


def advice_lines(checked: Checked) -> list[str]:
    from vitune.train.guidance import advise

    if checked.config is None:
        return []
    return [f"{a.key}: {a.text}" for a in advise(checked.config, checked.model_config)]
