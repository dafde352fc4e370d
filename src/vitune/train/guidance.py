"""Hyperparameter guidance, shown once at the start of a run and by `--dry-run`.

Advice never changes the user's values. Only a setting that cannot work (a context longer
than the model's positions) is an error.
"""

from __future__ import annotations

from dataclasses import dataclass

from vitune.config import LEARNING_RATES, RunConfig
from vitune.errors import ConfigError

COMMON_CONTEXTS = (512, 1024, 2048, 4096, 8192)


@dataclass(frozen=True)
class Advice:
    key: str
    text: str


def rate(value: float) -> str:
    """A learning rate as people write it: 0.0002 -> 2e-4, 1.5e-05 -> 1.5e-5, 0.01 -> 1e-2."""
    mantissa, exponent = f"{value:.6e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def check_max_length(config: RunConfig, model_config) -> None:
    limit = getattr(model_config, "max_position_embeddings", None) or getattr(model_config, "n_positions", None)
    if limit and config.data.max_length > limit:
        raise ConfigError(
            f"data.max_length = {config.data.max_length} is longer than the model's max_position_embeddings "
            f"({limit}); lower it to at most {limit}"
        )


def advise(config: RunConfig, model_config=None) -> list[Advice]:
    """Advice on the run's hyperparameters (empty when nothing looks unusual)."""
    out: list[Advice] = []
    lr, rates = config.train.learning_rate, LEARNING_RATES[config.method.type]
    if not rates.usual[0] <= lr <= rates.usual[1]:
        out.append(Advice(
            "train.learning_rate",
            f"{rate(lr)} is outside {rate(rates.usual[0])}..{rate(rates.usual[1])}, the usual range for "
            f"{rates.label} (the docs recommend {rate(rates.recommended[0])}..{rate(rates.recommended[1])})",
        ))
    if model_config is not None:
        limit = getattr(model_config, "max_position_embeddings", None)
        if limit and config.data.max_length not in COMMON_CONTEXTS and config.data.max_length < limit:
            out.append(Advice(
                "data.max_length",
                f"{config.data.max_length}: common context lengths are {', '.join(map(str, COMMON_CONTEXTS))} "
                f"(the model accepts up to {limit}); check `vitune data inspect` length percentiles",
            ))
    if config.method.type in ("lora", "qlora"):
        ratio = config.method.lora.alpha / config.method.lora.r
        if not 0.5 <= ratio <= 4:
            out.append(Advice(
                "method.lora.alpha",
                f"alpha/r = {ratio:g}; the update is scaled by alpha/r, and 1..2 (alpha = r or 2r) is usual",
            ))
    if config.model.dtype == "float16":
        out.append(Advice(
            "model.dtype",
            "float16 overflows more easily than bfloat16; use bfloat16 on GPUs that have it (A100, H100, RTX 30xx/40xx)",
        ))
    return out
