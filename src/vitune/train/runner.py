"""The stage runner: every training stage (sft, rm, dpo, rl) runs through it, top to bottom:

    config -> tokenizer + template -> data (the stage's records -> tokens) -> model (load -> plan -> adapt)
           -> the stage's batches -> the stage's Trainer (telemetry, atomic checkpoints, exact resume,
              signals) -> run folder -> summary

A stage (vitune.train.stages) brings only what is its own: how its rows are read and tokenised,
its model head, its collator, its loss (a Trainer subclass), its metrics and what it saves
beside the weights. Everything else -- the output folder and its lock, the resume check, the
speed plan, TrainingArguments, metrics.jsonl and the progress bar, checkpoints that survive a
full disk, SIGINT/SIGTERM, the final save and summary.json -- is here, once.

The speed plan (`plan_speed`) is decided once, before anything is written: packing (rows laid
end to end, attention kept within each row), attention kernel, Liger kernels and activation
checkpointing (on a GPU) -- and printed.

With an `eval:` section, vitune eval's tasks score the model while it trains (train/evaluation.py):
their files are read and checked with the data, and their figures go into metrics.jsonl and the summary.

The run folder holds config.yaml (resolved), data_report.json, metrics.jsonl, tensorboard/, then
at the end the adapter (or full model), the tokenizer with the chat template used in training,
and summary.json. summary.json is written last: a folder without it is an unfinished run.
Everything that can fail on the user's input (config, paths, data) fails before the run folder
is created.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from vitune.config import RunConfig, dump_config
from vitune.data.templates import resolve_template
from vitune.errors import UserError
from vitune.models.architecture import load_model_config
from vitune.models.loading import load_tokenizer
from vitune.models.optimizers import resolve_optimizer

SUMMARY = "summary.json"


@dataclass
class TrainResult:
    output_dir: Path
    summary: dict
    report: object  # the stage's data report (vitune.data.pipeline.DataReport)
    model: object = None  # the trained model in memory (adapter attached for LoRA)


class RunInterrupted(Exception):
    """SIGINT/SIGTERM stopped training after saving a checkpoint."""

    def __init__(self, signal_name: str, out: Path, step: int):
        self.exit_code = 130 if signal_name == "SIGINT" else 143
        super().__init__(
            f"stopped by {signal_name} at step {step}; checkpoint saved in {out}/checkpoint-{step}. "
            "Resume with: vitune train CONFIG --set train.resume=auto"
        )


def check_output_dir(path: Path, overwrite: bool, resuming: bool = False) -> None:
    if path.exists() and not path.is_dir():
        raise UserError(f"train.output_dir {path} is a file; choose a folder")
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            extra = " and holds no complete checkpoint to resume from" if resuming else ""
            raise UserError(
                f"train.output_dir {path} already exists and is not empty{extra}; choose another folder "
                "or set train.overwrite: true (e.g. --set train.overwrite=true)"
            )


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
    """Packing, attention, Liger and checkpointing for this model on this device."""
    from vitune.models.attention import supports_packing
    from vitune.train.gpu import checkpointing_plan, use_liger

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
    # Liger patches the causal LM's loss; stages with a loss of their own (rm, dpo) keep transformers' forward
    liger = use_liger(config.train.liger_kernel, model) and (stage is None or stage.name == "sft")
    tokens = config.train.micro_batch_size * config.data.max_length
    every = checkpointing_plan(config.train.gradient_checkpointing, model, tokens, liger, config.method.type == "full")
    return SpeedPlan(packing, attention, liger, every)


def training_arguments(config: RunConfig, output_dir: Path, has_eval: bool, plan: SpeedPlan,
                       resuming: bool = False, args_class=None, **extra):
    """TrainingArguments of a run (or `args_class`, a subclass such as TRL's GRPOConfig, with the
    stage's own `extra` fields)."""
    import torch
    from transformers import TrainingArguments

    from vitune.train.gpu import use_tf32
    from vitune.models.optimizers import resolve_optimizer

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
        optim=resolve_optimizer(t.optimizer, bool(t.fsdp))[0],
        activation_checkpointing=plan.checkpoint_every > 0,
        activation_checkpointing_kwargs={"every_n_layers": plan.checkpoint_every} if plan.checkpoint_every > 1 else None,
        use_liger_kernel=plan.liger,
        bf16=bf16,
        tf32=use_tf32(),
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        save_total_limit=t.save_total_limit,
        eval_strategy="steps" if has_eval and t.eval_steps else ("epoch" if has_eval else "no"),
        eval_steps=t.eval_steps,
        # the held-out loss before any training, to compare the end against (not again on resume)
        eval_on_start=has_eval and not resuming,
        report_to=[r for r in t.report_to if r != "none"] or "none",
        disable_tqdm=True,
        remove_unused_columns=False,
        prediction_loss_only=True,  # evaluation reports the loss; packed batches keep only trained logits
        use_cpu=not on_gpu,
        dataloader_num_workers=0,
        **scale_out_arguments(config),
        **extra,
    )


def deepspeed_settings(path: str) -> dict:
    """The DeepSpeed config JSON of train.deepspeed; a missing or unreadable file is one line."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"train.deepspeed = {path}: file not found (see examples/deepspeed/)")
    try:
        settings = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"train.deepspeed = {path}: not a JSON file ({exc}); see examples/deepspeed/zero2.json") from None
    if not isinstance(settings, dict) or not isinstance(settings.get("zero_optimization", {}), dict):
        raise UserError(f"train.deepspeed = {path}: expected a JSON object with zero_optimization: {{stage: ...}} "
                        "(see examples/deepspeed/zero2.json)")
    return settings


def scale_out_arguments(config: RunConfig) -> dict:
    """train.deepspeed / train.fsdp as TrainingArguments take them (the engines do the work)."""
    import yaml

    from vitune.models.optimizers import BITSANDBYTES_OPTIMIZERS

    t = config.train
    if t.deepspeed:
        path = Path(t.deepspeed)
        stage = deepspeed_settings(t.deepspeed).get("zero_optimization", {}).get("stage")
        if config.method.type == "qlora" and stage == 3:
            raise UserError(
                f"train.deepspeed = {t.deepspeed}: QLoRA with ZeRO-3 shards 4-bit weights, which needs "
                "bitsandbytes' quant storage set to the compute dtype; use ZeRO-2 (examples/deepspeed/zero2.json) "
                "for QLoRA, or method.type: lora with ZeRO-3"
            )
        return {"deepspeed": str(path)}
    if t.fsdp:
        path = Path(t.fsdp)
        if not path.is_file():
            raise UserError(f"train.fsdp = {t.fsdp}: file not found (see examples/fsdp/)")
        settings = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(settings, dict) or "fsdp" not in settings:
            raise UserError(f"train.fsdp = {t.fsdp}: expected a YAML mapping with fsdp: and fsdp_config: (see examples/fsdp/fsdp2.yaml)")
        if config.method.type == "qlora":
            raise UserError("train.fsdp with method.type: qlora is not supported yet; use method.type: lora, or DeepSpeed ZeRO-2")
        if (settings.get("fsdp_config") or {}).get("state_dict_type") == "FULL_STATE_DICT":
            # measured on 2 CPU processes (torch 2.13, accelerate 1.15, FSDP2): saving such a checkpoint fails, resuming
            # from one hangs (rank 0 broadcasts the weights, the other ranks never join)
            raise UserError(f"train.fsdp = {t.fsdp}: fsdp_config.state_dict_type FULL_STATE_DICT checkpoints cannot "
                            "be resumed; use SHARDED_STATE_DICT (examples/fsdp/fsdp2.yaml): the final model folder "
                            "is whole either way")
        if t.optimizer in BITSANDBYTES_OPTIMIZERS:
            raise UserError(f"train.optimizer = {t.optimizer} cannot update FSDP's sharded parameters (bitsandbytes "
                            "optimizers take plain tensors); use train.optimizer: adamw_torch (or auto) with train.fsdp")
        return {"fsdp": settings["fsdp"], "fsdp_config": settings.get("fsdp_config", {})}
    return {}


@dataclass
class PreparedRun:
    """Everything decided and prepared before a model is loaded (what --dry-run shows)."""

    stage: object  # the Stage (vitune.train.stages)
    tokenizer: object
    template: object
    train_rows: list
    eval_rows: list
    report: object
    model_config: object
    fingerprint: dict
    resume_from: Path | None
    evaluation: object = None  # the eval section's files, read and checked (train/evaluation.py EvalPlan)


def prepare_run(config: RunConfig, console: Console) -> PreparedRun:
    """Check the output folder, load the tokenizer, prepare (or reuse) the stage's data, print the
    data counts and the guidance. Raises UserError for anything wrong with the user's input."""
    from vitune.data.cache import cache_key
    from vitune.train.checkpoint import check_fingerprint, find_resume_checkpoint, fingerprint
    from vitune.train.guidance import advise, check_max_length
    from vitune.train.sharding import process_state
    from vitune.train.stages import stage_for

    stage = stage_for(config)
    state = process_state()  # one process, or one rank of `accelerate launch`
    out = Path(config.train.output_dir)
    resume_from = find_resume_checkpoint(out, config.train.resume, config.model.allow_pickle)
    if resume_from is None:
        check_output_dir(out, config.train.overwrite, resuming=config.train.resume == "auto")

    scale_out_arguments(config)  # a missing or wrong train.deepspeed / train.fsdp file fails here, before the data
    stage.check(config)  # what the stage needs of the rest of the config (its sections, model.adapter, ...)
    # The tokenizer and template come first: the data is rendered and tokenised with them.
    tokenizer = load_tokenizer(config.model.name_or_path, config.model.trust_remote_code)
    # pt renders no conversations: no template (the tokenizer's own chat template is kept as it is)
    template = resolve_template(config.model.template, tokenizer) if stage.uses_template else None
    for notice in template.notices if template else ():
        console.print(f"[yellow]notice[/] template: {notice}", highlight=False)
    model_config = load_model_config(config.model.name_or_path, config.model.trust_remote_code)
    check_max_length(config, model_config)
    with state.main_process_first():  # rank 0 fills the cache, the others read it
        train_rows, eval_rows, report = stage.prepare_data(config, tokenizer, template)
    evaluation = None
    if config.eval is not None:  # evaluation while training: a bad file fails here, before the model loads
        from vitune.train.evaluation import prepare_evaluation

        evaluation = prepare_evaluation(config, tokenizer, template)
        console.print("eval: " + ", ".join(f"{f.name} ({len(f.rows.items)} {f.rows.task} rows)" for f in evaluation.files)
                      + (f" every {config.train.eval_steps} steps," if config.train.eval_steps else "")
                      + " before training and at the end")
    if report.from_cache:
        console.print(f"data: reusing prepared data from the cache ({escape(str(report.cached_at))})")
    console.print(stage.data_line(report, train_rows, eval_rows, template))
    for advice in advise(config, model_config):
        console.print(f"[yellow]advice[/] {advice.key}: {advice.text}")
    optimizer, notice = resolve_optimizer(config.train.optimizer, bool(config.train.fsdp))
    if notice:
        console.print(f"[yellow]notice[/] {notice}")

    data_key = cache_key(config.data, tokenizer, template, config.train.seed)
    run_fingerprint = fingerprint(config, f"{config.train.stage}:{data_key}")
    if resume_from is not None:
        check_fingerprint(resume_from, run_fingerprint, config.train.resume_strict)
        console.print(f"resuming from {escape(str(resume_from))}")
    return PreparedRun(stage, tokenizer, template, train_rows, eval_rows, report, model_config, run_fingerprint,
                       resume_from, evaluation)


def run_training(config: RunConfig, console: Console | None = None) -> TrainResult:
    """Train `config.model` on `config.data` with the stage `config.train.stage`; returns the run
    folder and its summary.

    The output folder is held for the whole run (train/run_lock.py): a second run into it
    is refused before anything is written."""
    from vitune.train.run_lock import output_dir_lock
    from vitune.train.sharding import process_state

    with output_dir_lock(Path(config.train.output_dir), process_state().is_main_process):
        return _run(config, console)


def _run(config: RunConfig, console: Console | None = None) -> TrainResult:
    from transformers import set_seed

    from vitune.train.checkpoint import final_save
    from vitune.train.sharding import gather_full_weights, process_state, save_final_model

    console = console or Console()
    state = process_state()
    out = Path(config.train.output_dir)
    prepared = prepare_run(config, console)
    stage, tokenizer, template, report = prepared.stage, prepared.tokenizer, prepared.template, prepared.report
    resume_from, run_fingerprint = prepared.resume_from, prepared.fingerprint

    set_seed(config.train.seed)  # LoRA initialisation and dropout follow the seed
    model = stage.load_model(config, tokenizer)
    plan = plan_speed(config, model, stage)
    model = stage.adapt_model(model, config, plan.checkpoint_every > 0)
    console.print(f"speed: {plan.describe()}")

    # From here on the run folder exists; summary.json at the end marks it complete.
    # Only the main process writes files; every rank trains.
    if state.is_main_process:
        if out.exists() and config.train.overwrite and resume_from is None:
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump_config(config), encoding="utf-8")
        (out / "data_report.json").write_text(json.dumps(report.summary(), indent=2), encoding="utf-8")
        if report.rejections:
            with open(out / "rejects.jsonl", "w", encoding="utf-8") as fh:
                for r in report.rejections:
                    fh.write(json.dumps({"source": r.source, "reason": r.reason, "detail": r.detail, "row": r.row},
                                        ensure_ascii=False, default=str) + "\n")
    state.wait_for_everyone()
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(out / "tensorboard")

    trainer, summary = fit(config, model, prepared.train_rows, prepared.eval_rows, out, plan, console, tokenizer,
                           resume_from=resume_from, checkpoint_marker=(run_fingerprint, dump_config(config)),
                           stage=stage, template=template, evaluation=prepared.evaluation)
    if summary.get("stopped_by"):
        raise RunInterrupted(summary["stopped_by"], out, trainer.state.global_step)
    full_weights = gather_full_weights(trainer)  # FSDP: every rank joins the gather; None otherwise
    if not state.is_main_process:
        return TrainResult(out, summary, report, trainer.model)

    # The template used in training travels with the tokenizer, so chat renders the same.
    if template is not None:
        tokenizer.chat_template = template.jinja()
    with final_save(out, SUMMARY):  # a full or failing disk: one line; no summary.json, checkpoints kept
        save_final_model(trainer, out, full_weights)  # an ordinary model folder, also after sharded training
        tokenizer.save_pretrained(str(out), save_jinja_files=False)
        # Trainer also saved the tokenizer, with the template in chat_template.jinja; keep one copy,
        # in tokenizer_config.json, where every tool (old and new) looks for it.
        (out / "chat_template.jinja").unlink(missing_ok=True)
        stage.save_extras(trainer, out, config)
        summary["stage"] = config.train.stage
        summary["template"] = template.name if template else None
        (out / SUMMARY).write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return TrainResult(out, summary, report, trainer.model)


def fit(config: RunConfig, model, train_rows, eval_rows, out: Path, plan: SpeedPlan, console: Console,
        tokenizer=None, pad_token_id: int | None = None, resume_from: Path | None = None,
        checkpoint_marker: tuple | None = None, stage=None, template=None, evaluation=None):
    """Train `model` on the stage's tokenised rows (packed or padded, as planned) -> (trainer, summary).

    Writes metrics.jsonl (and tensorboard) into `out`; saves nothing else. Benchmarks call
    this directly with a model built in memory (the stage defaults to sft). `evaluation`
    (train/evaluation.py prepare_evaluation of config.eval) is scored while training.
    """
    from contextlib import nullcontext

    from transformers.trainer_callback import PrinterCallback

    from vitune.models.attention import packed_attention
    from vitune.train.checkpoint import StopOnSignal, checkpoint_step
    from vitune.train.progress import ProgressFile
    from vitune.train.sharding import ShardingReport
    from vitune.train.stages import stage_for
    from vitune.train.telemetry import peak_memory_gib
    from vitune.train.trainer import MetricsFile, RichProgress

    stage = stage or stage_for(config)
    pad = pad_token_id if pad_token_id is not None else tokenizer.pad_token_id
    batches = stage.batches(config, plan, train_rows, eval_rows, pad, console)
    resume_step = checkpoint_step(resume_from) if resume_from else None
    metrics = MetricsFile(out / "metrics.jsonl", resume_step=resume_step, keys=stage.metric_keys)
    stop = StopOnSignal()
    trainer = stage.make_trainer(
        config,
        model=model,
        args=stage.training_arguments(config, out, bool(eval_rows), plan, resuming=resume_from is not None),
        train_dataset=batches.train,
        eval_dataset=batches.eval or None,
        data_collator=batches.collator,
        processing_class=tokenizer,
        callbacks=[metrics, RichProgress(console, stage.progress_fields), stop, ShardingReport(out),
                   ProgressFile(out / "progress.json")],
        checkpoint_marker=checkpoint_marker,
        template=template,
    )
    trainer.remove_callback(PrinterCallback)  # the rich progress bar replaces printed dicts
    if evaluation is not None:
        from vitune.train.evaluation import TrainingEvaluation

        TrainingEvaluation(config.eval, evaluation, tokenizer, config.train.eval_steps).attach(trainer)
    packed = plan.packing and stage.packed_forward
    started = time.perf_counter()
    stop.install()
    try:
        with packed_attention(model) if packed else nullcontext():
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    finally:
        stop.uninstall()
    seconds = time.perf_counter() - started - metrics.eval_seconds - trainer.seconds_not_training
    if batches.eval and not stop.received and (not metrics.evals or metrics.evals[-1][0] != trainer.state.global_step):
        # eval_strategy "epoch" misses the end of a run cut short by max_steps; the end is what counts
        with packed_attention(model) if packed else nullcontext():
            trainer.evaluate()

    run = trainer.throughput(trainer.real_tokens, trainer.token_slots, trainer.model_flops, seconds)
    summary = {
        "steps": trainer.state.global_step,
        "seconds": round(seconds, 2),
        "real_tokens": trainer.real_tokens,
        "tokens_per_s": run["tokens_per_s"],
        "first_loss": metrics.losses[0][1] if metrics.losses else None,
        "final_loss": metrics.losses[-1][1] if metrics.losses else None,
        # held-out loss on data.eval / data.val_size rows, before training and at the end
        "eval_loss_start": metrics.evals[0][1] if stage.held_out_loss and metrics.evals and metrics.evals[0][0] == 0
        else None,
        "eval_loss_end": metrics.evals[-1][1] if stage.held_out_loss and metrics.evals else None,
        # bins filled (packing) or token slots used (padding): real tokens / slots either way
        "packing_efficiency": round(batches.fill if batches.fill is not None else 1 - run["padding_fraction"], 4),
        "padding_fraction": run["padding_fraction"],
        "tflops": run["tflops"],
        "mfu": run.get("mfu"),
        "peak_memory_gib": peak_memory_gib(),
        "speed": plan.describe(),
    }
    for key in stage.metric_keys:  # the stage's held-out metrics (accuracy, margin, ...) at the start and end
        start, end = metrics.eval_value(f"eval_{key}", first=True), metrics.eval_value(f"eval_{key}")
        if end is not None:
            summary[f"eval_{key.replace('/', '_')}_start"] = start
            summary[f"eval_{key.replace('/', '_')}_end"] = end
    for key in stage.summary_keys:  # e.g. rl's mean reward at the first and the last logged step
        logged = [r[key] for r in metrics.train_records if key in r]
        if logged:
            summary[f"{key.replace('/', '_')}_first"], summary[f"{key.replace('/', '_')}_last"] = logged[0], logged[-1]
    if metrics.task_records:  # evaluations while training: each figure's first and last value
        summary["evaluation"] = metrics.task_summary()
    if stop.received:
        summary["stopped_by"] = stop.received
    return trainer, summary


def items(rows) -> list[dict]:
    """Tokenised rows (dataclasses) -> the dicts the collators take."""
    return [{k: v for k, v in vars(r).items() if k != "truncated"} for r in rows]
