"""Sharded training with FSDP2 (`train.fsdp`), on GPUs and on the CPU, and what each rank holds.

What the engines leave to vitune:

- The CPU. accelerate turns FSDP on only for accelerator back-ends (MULTI_GPU, ...); a
  multi-process CPU run (gloo) with an FSDP plugin quietly trains DDP, every rank holding
  the whole model and optimizer. PyTorch's `fully_shard` works on a CPU mesh over gloo, so
  `enable_fsdp_on_cpu` switches accelerate's state to FSDP (tested with 2 CPU processes).
  `process_state` is the rank/main-process view that is right on the CPU too.
- Evidence. `ShardingReport` writes `sharding.json` into the run folder after the first
  optimizer step: per rank, the parameter and optimizer-state elements it holds, next to
  the full counts. With FSDP each rank holds about 1/world_size of each.
- The end of the run. Checkpoints stay sharded (SHARDED_STATE_DICT, torch.distributed.checkpoint:
  each rank writes its part, resume reads it back; FULL_STATE_DICT is refused in sft.py);
  the final model is gathered (`gather_full_weights`, every rank takes part) and written by
  the main process as an ordinary model folder (`save_final_model`): model.safetensors for
  full fine-tuning, the adapter for LoRA.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import TrainerCallback

from vitune.models.permissions import umask_modes

SHARDING = "sharding.json"


def enable_fsdp_on_cpu(accelerator, plugin_args: dict | None) -> bool:
    """Turn FSDP on for a multi-process CPU run that asked for it; True if it did.

    `plugin_args` are TrainingArguments.fsdp_plugin_args (None when train.fsdp is not set).
    accelerate stores no FSDP plugin for MULTI_CPU; this puts the state where it would be on
    GPUs, before the model is prepared (fully_shard then runs on the CPU mesh).
    """
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if plugin_args is None or state.distributed_type != DistributedType.MULTI_CPU:
        return False
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = FullyShardedDataParallelPlugin(**plugin_args)
    return True


def _held(tensor) -> tuple[int, int]:
    """(elements this rank holds, elements of the whole tensor): a DTensor holds its local shard."""
    from torch.distributed.tensor import DTensor

    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.numel(), tensor.numel()


def held_elements(model, optimizer) -> dict[str, tuple[int, int]]:
    """What this rank holds, as (local, full) element counts: all parameters, the trainable
    ones, and the optimizer's per-parameter state tensors (AdamW: exp_avg and exp_avg_sq;
    the scalar `step` is left out)."""
    params = list(model.parameters())
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper -> torch's optimizer
    states = [value for state in optimizer.state.values() for key, value in state.items()
              if key != "step" and torch.is_tensor(value)]

    def total(tensors) -> tuple[int, int]:
        counts = [_held(t) for t in tensors]
        return sum(c[0] for c in counts), sum(c[1] for c in counts)

    return {
        "parameters": total(params),
        "trainable_parameters": total(p for p in params if p.requires_grad),
        "optimizer_state": total(states),
    }


def sharding_summary(per_rank: list[dict[str, tuple[int, int]]]) -> dict:
    """Every rank's held_elements -> sharding.json: {kind: {"full": n, "per_rank": [n0, n1, ...]}}."""
    return {
        "world_size": len(per_rank),
        **{kind: {"full": per_rank[0][kind][1], "per_rank": [rank[kind][0] for rank in per_rank]}
           for kind in per_rank[0]},
    }


class ShardingReport(TrainerCallback):
    """sharding.json in the run folder, once, after the first optimizer step of an FSDP run
    (the optimizer state exists only from then on). Every rank counts; the main process writes."""

    def __init__(self, out: Path):
        self.path = out / SHARDING
        self.done = False

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.done or not args.fsdp or args.world_size < 2:
            return
        self.done = True
        import torch.distributed as dist

        per_rank = [None] * args.world_size
        dist.all_gather_object(per_rank, held_elements(model, optimizer))
        if state.is_world_process_zero:
            self.path.write_text(json.dumps({"engine": "fsdp", **sharding_summary(per_rank)}, indent=2) + "\n",
                                 encoding="utf-8")


def gather_full_weights(trainer) -> dict | None:
    """FSDP or DeepSpeed ZeRO-3: the whole trained weights on the main process ({} or None on the
    others); None otherwise, where the model in memory is already whole. Every rank must call it
    (it is a collective).

    LoRA under FSDP gathers only the trainable (adapter) weights: the frozen base is what was loaded.
    """
    if trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3:
        return trainer.accelerator.get_state_dict(trainer.deepspeed)  # needs stage3_gather_16bit_weights_on_model_save
    if not trainer.is_fsdp_enabled:
        return None
    from peft import PeftModel
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    lora = isinstance(trainer.model, PeftModel)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=lora)
    return get_model_state_dict(trainer.model, options=options)


def save_final_model(trainer, out: Path, full_weights: dict | None) -> None:
    """The main process writes the trained model to `out` as an ordinary Hugging Face folder
    (config.json + model.safetensors, or adapter_config.json + adapter_model.safetensors)."""
    if full_weights is None:
        trainer.save_model(str(out))
    else:
        trainer._save(str(out), state_dict=full_weights)  # Trainer's writer, given the gathered weights
    umask_modes(out)  # safetensors writes 0600, here and in the checkpoints: let the umask decide


def process_state():
    """This process's place in the run (accelerate's PartialState: rank, main process, barriers).

    Without a GPU it must be created with cpu=True, as TrainingArguments(use_cpu=True) does: with
    the default, accelerate finds no accelerator back-end under `accelerate launch`, sets up no
    process group, and every rank believes it is the only (main) one.
    """
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())
