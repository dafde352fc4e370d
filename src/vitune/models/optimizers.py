"""Which optimizer a run uses (`train.optimizer: auto` depends on what is installed)."""

from __future__ import annotations

# bitsandbytes' optimizers update plain tensors; FSDP2's parameters are DTensors
# ("Operator bitsandbytes.optimizer_update_32bit.default does not have a sharding strategy registered").
BITSANDBYTES_OPTIMIZERS = ("adamw_bnb_8bit", "paged_adamw_8bit", "paged_adamw_32bit")


def resolve_optimizer(name: str, fsdp: bool = False) -> tuple[str, str | None]:
    """`train.optimizer` as Trainer takes it, and a one-line notice when `auto` had to fall back.

    `fsdp`: train.fsdp is set, so auto cannot pick a bitsandbytes optimizer.
    """
    if name != "auto":
        return name, None
    if fsdp:
        return "adamw_torch", None
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is not None:
        return "adamw_bnb_8bit", None
    return "adamw_torch", (
        "train.optimizer auto: bitsandbytes is not installed, so adamw_torch (4x the optimizer memory of "
        "adamw_bnb_8bit); pip install bitsandbytes to use 8-bit AdamW"
    )
