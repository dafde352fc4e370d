"""What a run is told before it trains, decided once from the config, the model and the device:

    resolve_scale_out(config) -> ScaleOut      train.deepspeed / train.fsdp, read and checked once
    plan_speed(config, model, stage) -> SpeedPlan   packing, attention kernel, Liger, checkpointing
    training_arguments(...) -> TrainingArguments    (or a TRL config class) for the stage's Trainer

The runner (vitune.train.runner) computes each of them once and passes the result down.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from transformers import TrainingArguments

from vitune.bundled import example_hint
from vitune.config import RunConfig
from vitune.errors import UserError
from vitune.models.attention import supports_packing
from vitune.models.optimizers import BITSANDBYTES_OPTIMIZERS
from vitune.train.gpu import checkpointing_plan, use_liger, use_tf32
from vitune.train.trackers import run_name


# ---------------------------------------------------------------- speed plan


@dataclass(frozen=True)
class SpeedPlan:
    """How a run goes fast, decided once from the config, the model and the device."""

    packing: bool
    attention: str  # as the model will run it
    liger: bool
    checkpoint_every: int  # 0 = no activation checkpointing, n = every n-th layer (1 = all)

    def describe(self) -> str:
        ckpt = {0: "off", 1: "every layer"}.get(self.checkpoint_every, f"every {self.checkpoint_every} layers")
        return (f"packing {'on' if self.packing else 'off'}, attention {self.attention}, "
                f"liger {'on' if self.liger else 'off'}, activation checkpointing {ckpt}")


def plan_speed(config: RunConfig, model, stage=None) -> SpeedPlan:
    """Packing, attention, Liger and checkpointing for this model on this device. `stage` (a
    vitune.train.stage.Stage; None: sft's defaults) says whether it can pack and use Liger."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    packing = config.data.packing and (stage is None or stage.packed_forward)  # rl: TRL pads its own batches
    if packing and not supports_packing(model):
        if "packing" in config.data.model_fields_set:
            raise UserError(f"data.packing: true, but {base.config.model_type} models cannot keep packed rows apart "
                            "(their attention takes no row boundaries); set data.packing: false")
        packing = False  # the default, not the user's choice: train padded (the plan says so)
    attention = base.config._attn_implementation
    if packing and attention == "sdpa":
        attention = "sdpa (row by row)"
    # Liger patches the causal LM's loss: stages with a loss of their own (rm, dpo, rl) keep transformers' forward
    liger = use_liger(config.train.liger_kernel, model) and (stage is None or stage.liger)
    tokens = config.train.micro_batch_size * config.data.max_length
    every = checkpointing_plan(config.train.gradient_checkpointing, model, tokens, liger, config.method.type == "full")
    return SpeedPlan(packing, attention, liger, every)


# ---------------------------------------------------------------- DeepSpeed / FSDP


@dataclass(frozen=True)
class ScaleOut:
    """train.deepspeed / train.fsdp as TrainingArguments take them (the engines do the work)."""

    arguments: dict  # {} | {"deepspeed": path} | {"fsdp": ..., "fsdp_config": ...}
    zero_stage: int | None = None  # DeepSpeed's ZeRO stage (the eval section cannot run with 3)


def deepspeed_settings(path: str) -> dict:
    """The DeepSpeed config JSON of train.deepspeed; a missing or unreadable file is one line."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"train.deepspeed = {path}: file not found (an example: {example_hint('deepspeed/zero2')})")
    try:
        settings = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"train.deepspeed = {path}: not a JSON file ({exc}); see {example_hint('deepspeed/zero2')}") from None
    if not isinstance(settings, dict) or not isinstance(settings.get("zero_optimization", {}), dict):
        raise UserError(f"train.deepspeed = {path}: expected a JSON object with zero_optimization: {{stage: ...}} "
                        f"(see {example_hint('deepspeed/zero2')})")
    return settings


def resolve_scale_out(config: RunConfig) -> ScaleOut:
    """train.deepspeed / train.fsdp read and checked (a missing or wrong file is one line)."""
    t = config.train
    if t.deepspeed:
        stage = deepspeed_settings(t.deepspeed).get("zero_optimization", {}).get("stage")
        if config.method.type == "qlora" and stage == 3:
            raise UserError(
                f"train.deepspeed = {t.deepspeed}: QLoRA with ZeRO-3 shards 4-bit weights, which needs "
                f"bitsandbytes' quant storage set to the compute dtype; use ZeRO-2 ({example_hint('deepspeed/zero2')}) "
                "for QLoRA, or method.type: lora with ZeRO-3"
            )
        return ScaleOut({"deepspeed": str(Path(t.deepspeed))}, stage)
    if t.fsdp:
        path = Path(t.fsdp)
        if not path.is_file():
            raise UserError(f"train.fsdp = {t.fsdp}: file not found (an example: {example_hint('fsdp/fsdp2')})")
        settings = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(settings, dict) or "fsdp" not in settings:
            raise UserError(f"train.fsdp = {t.fsdp}: expected a YAML mapping with fsdp: and fsdp_config: "
                            f"(see {example_hint('fsdp/fsdp2')})")
        if config.method.type == "qlora":
            raise UserError("train.fsdp with method.type: qlora is not supported yet; use method.type: lora, or DeepSpeed ZeRO-2")
        if (settings.get("fsdp_config") or {}).get("state_dict_type") == "FULL_STATE_DICT":
            # measured on 2 CPU processes (torch 2.13, accelerate 1.15, FSDP2): saving such a checkpoint fails, resuming
            # from one hangs (rank 0 broadcasts the weights, the other ranks never join)
            raise UserError(f"train.fsdp = {t.fsdp}: fsdp_config.state_dict_type FULL_STATE_DICT checkpoints cannot "
                            f"be resumed; use SHARDED_STATE_DICT ({example_hint('fsdp/fsdp2')}): the final model folder "
                            "is whole either way")
        if t.optimizer in BITSANDBYTES_OPTIMIZERS:
            raise UserError(f"train.optimizer = {t.optimizer} cannot update FSDP's sharded parameters (bitsandbytes "
                            "optimizers take plain tensors); use train.optimizer: adamw_torch (or auto) with train.fsdp")
        return ScaleOut({"fsdp": settings["fsdp"], "fsdp_config": settings.get("fsdp_config", {})})
    return ScaleOut({})


# ---------------------------------------------------------------- TrainingArguments


def training_arguments(config: RunConfig, output_dir: Path, has_eval: bool, plan: SpeedPlan, scale_out: ScaleOut,
                       optimizer: str, resuming: bool = False, args_class=None, **extra):
    """TrainingArguments of a run (or `args_class`, a subclass such as TRL's GRPOConfig, with the
    stage's own `extra` fields). `optimizer` is train.optimizer resolved (models.optimizers)."""
    t = config.train
    dtype = config.model.dtype
    on_gpu = torch.cuda.is_available()
    bf16 = on_gpu and dtype in ("auto", "bfloat16") and torch.cuda.is_bf16_supported()
    return (args_class or TrainingArguments)(
        output_dir=str(output_dir),
        per_device_train_batch_size=t.micro_batch_size,
        per_device_eval_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_ratio,  # a float below 1 is a fraction of the steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=optimizer,
        activation_checkpointing=plan.checkpoint_every > 0,
        activation_checkpointing_kwargs={"every_n_layers": plan.checkpoint_every} if plan.checkpoint_every > 1 else None,
        use_liger_kernel=plan.liger,
        bf16=bf16,
        tf32=use_tf32(),
        seed=t.seed,
        data_seed=t.seed,
        # unset: the run's LoggingSchedule (train/trainer.py) sets the cadence once its steps are known
        logging_steps=t.logging_steps or 10,
        logging_first_step=True,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        save_total_limit=t.save_total_limit,
        eval_strategy="steps" if has_eval and t.eval_steps else ("epoch" if has_eval else "no"),
        eval_steps=t.eval_steps,
        # the held-out loss before any training, to compare the end against (not again on resume)
        eval_on_start=has_eval and not resuming,
        # transformers' callbacks log to them (vitune opens the W&B and MLflow runs: train/trackers.py)
        report_to=[r for r in t.report_to if r != "none"] or "none",
        run_name=run_name(config),
        disable_tqdm=True,
        remove_unused_columns=False,
        prediction_loss_only=True,  # evaluation reports the loss; packed batches keep only trained logits
        use_cpu=not on_gpu,
        dataloader_num_workers=0,
        **scale_out.arguments,
        **extra,
    )
