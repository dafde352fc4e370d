"""Which optimizer a run uses (`train.optimizer: auto` depends on what is installed)."""

from __future__ import annotations


def resolve_optimizer(name: str) -> tuple[str, str | None]:
    """`train.optimizer` as Trainer takes it, and a one-line notice when `auto` had to fall back."""
    if name != "auto":
        return name, None
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is not None:
        return "adamw_bnb_8bit", None
    return "adamw_torch", (
        "train.optimizer auto: bitsandbytes is not installed, so adamw_torch (4x the optimizer memory of "
        "adamw_bnb_8bit); pip install bitsandbytes to use 8-bit AdamW"
    )
