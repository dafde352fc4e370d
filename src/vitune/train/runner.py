"""The stage runner: every training stage (sft, pt, rm, dpo, rl) runs through it, top to bottom:

    config -> tokenizer + template -> data (the stage's records -> tokens) -> model (load -> plan -> adapt)
           -> the stage's batches -> the stage's Trainer (telemetry, atomic checkpoints, exact resume,
              signals) -> run folder -> summary

A stage (one file in vitune/train/stages/, on the contract of vitune.train.stage) brings only
what is its own: how its rows are read and tokenised, its model head, its collator, its loss (a
Trainer subclass), its metrics, what it saves beside the weights and what it prints at the end. Everything else -- the output folder and its lock, the resume check, the
speed plan, TrainingArguments, metrics.jsonl and the progress bar, checkpoints that survive a
full disk, SIGINT/SIGTERM, the final save and summary.json -- is here, once.

What is resolved from the config (the DeepSpeed / FSDP settings, the optimizer, the data's cache
key, the checkpoint to resume from, the config's YAML) is resolved once in `prepare_run` and travels
in the `PreparedRun`; the speed plan (vitune.train.arguments.plan_speed: packing, attention kernel,
Liger kernels, activation checkpointing) is decided once, when the model is loaded, and printed.

With an `eval:` section, vitune eval's tasks score the model while it trains (train/evaluation.py):
their files are read and checked with the data, and their figures go into metrics.jsonl and the summary.

The run folder holds config.yaml (resolved), data_report.json, metrics.jsonl, progress.json,
tensorboard/, then at the end the adapter (or full model), the tokenizer with the chat template
used in training, and summary.json. summary.json is written last: a folder without it is an
unfinished run. Everything that can fail on the user's input (config, paths, data) fails before
the run folder is created. Only progress.json comes earlier, once the start-up checks
(train/preflight.py) have passed, so a watcher sees the data being prepared and the model
loading; a start that fails takes it away again (train/progress.py says how).

The trackers of train.report_to (TensorBoard, W&B, MLflow) get every log that metrics.jsonl gets,
then summary.json's numbers; the W&B and MLflow runs are opened around training, with the run's
name and config, and closed once the summary is in (train/trackers.py).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from transformers import set_seed
from transformers.trainer_callback import PrinterCallback

from vitune.config import LEARNING_RATES, RunConfig, dump_config
from vitune.data.cache import cache_key
from vitune.data.templates import resolve_template
from vitune.models.architecture import load_model_config
from vitune.models.attention import packed_attention
from vitune.models.card import write_run_card
from vitune.models.loading import load_tokenizer
from vitune.models.optimizers import resolve_optimizer
from vitune.train.arguments import SpeedPlan, plan_speed
from vitune.train.checkpoint import StopOnSignal, check_fingerprint, checkpoint_step, final_save, fingerprint
from vitune.train.evaluation import TrainingEvaluation, prepare_evaluation
from vitune.train.guidance import advise, check_max_length, rate
from vitune.train.preflight import Startup, startup_checks
from vitune.train.progress import PROGRESS, ProgressFile
from vitune.train.run_lock import output_dir_lock
from vitune.train.sharding import ShardingReport, gather_full_weights, process_state, save_final_model
from vitune.train.stage import PreparedRun
from vitune.train.stages import stage_for
from vitune.train.telemetry import peak_memory_gib
from vitune.train.trackers import log_summary, tracker_runs
from vitune.train.trainer import LoggingSchedule, MetricsFile, RichProgress

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


# ---------------------------------------------------------------- before the model: config, tokenizer, data


def prepare_run(config: RunConfig, console: Console, startup: Startup | None = None) -> PreparedRun:
    """Check the output folder, load the tokenizer, prepare (or reuse) the stage's data, print the
    data counts and the guidance. Raises UserError for anything wrong with the user's input.
    `startup`: what `startup_checks(config)` returned, where the caller ran them (None: run them here)."""
    # the output folder, train.resume, train.deepspeed / fsdp and the stage's rules: the web page's Check runs them too
    if startup is None:
        startup = startup_checks(config)
    resume_from, scale_out = startup.resume_from, startup.scale_out
    stage = stage_for(config)
    state = process_state()  # one process, or one rank of `accelerate launch`
    # The tokenizer and template come first: the data is rendered and tokenised with them.
    tokenizer = load_tokenizer(config.model.name_or_path, config.model.trust_remote_code)
    # pt renders no conversations: no template (the tokenizer's own chat template is kept as it is)
    template = resolve_template(config.model.template, tokenizer) if stage.uses_template else None
    for notice in template.notices if template else ():
        console.print(f"[yellow]notice[/] template: {notice}", highlight=False)
    model_config = load_model_config(config.model.name_or_path, config.model.trust_remote_code)
    check_max_length(config, model_config)
    # the data's cache key (it hashes every data file): the sft cache and the resume fingerprint both use it
    data_key = cache_key(config.data, tokenizer, template, config.train.seed)
    with state.main_process_first():  # rank 0 fills the cache, the others read it
        train_rows, eval_rows, report = stage.prepare_data(config, tokenizer, template, data_key, resume_from)
    evaluation = None
    if config.eval is not None:  # evaluation while training: a bad file fails here, before the model loads
        evaluation = prepare_evaluation(config, tokenizer, template, scale_out.zero_stage)
        console.print("eval: " + ", ".join(f"{f.name} ({len(f.rows.items)} {f.rows.task} rows)" for f in evaluation.files)
                      + (f" every {config.train.eval_steps} steps," if config.train.eval_steps else "")
                      + " before training and at the end")
    if report.from_cache:
        console.print(f"data: reusing prepared data from the cache ({escape(str(report.cached_at))})")
    console.print(stage.data_line(report, train_rows, eval_rows, template))
    if "learning_rate" not in config.train.model_fields_set:  # unset: the method's default (vitune.config)
        console.print(f"learning rate: {rate(config.train.learning_rate)}, the default for "
                      f"{LEARNING_RATES[config.method.type].label} (train.learning_rate)")
    for advice in advise(config, model_config):
        console.print(f"[yellow]advice[/] {advice.key}: {advice.text}")
    optimizer, notice = resolve_optimizer(config.train.optimizer, bool(config.train.fsdp))
    if notice:
        console.print(f"[yellow]notice[/] {notice}")

    run_fingerprint = fingerprint(config, f"{config.train.stage}:{data_key}")
    if resume_from is not None:
        check_fingerprint(resume_from, run_fingerprint, config.train.resume_strict)
        console.print(f"resuming from {escape(str(resume_from))}")
    return PreparedRun(stage, tokenizer, template, train_rows, eval_rows, report, scale_out=scale_out,
                       optimizer=optimizer, model_config=model_config, data_key=data_key, fingerprint=run_fingerprint,
                       config_yaml=dump_config(config), resume_from=resume_from, evaluation=evaluation)


# ---------------------------------------------------------------- the run


def run_training(config: RunConfig, console: Console | None = None) -> TrainResult:
    """Train `config.model` on `config.data` with the stage `config.train.stage`; returns the run
    folder and its summary.

    The output folder is held for the whole run (train/run_lock.py): a second run into it
    is refused before anything is written."""
    with output_dir_lock(Path(config.train.output_dir), process_state().is_main_process):
        return _run(config, console or Console())


def _run(config: RunConfig, console: Console) -> TrainResult:
    state = process_state()
    out = Path(config.train.output_dir)
    startup = startup_checks(config)  # before anything is written, progress.json included
    progress = ProgressFile(out / PROGRESS, enabled=state.is_main_process)
    try:
        return _train(config, console, startup, progress)
    except BaseException as exc:
        progress.failed(exc)  # before the run folder: the start undone; after it: written as the end
        raise


def _train(config: RunConfig, console: Console, startup: Startup, progress: ProgressFile) -> TrainResult:
    state = process_state()
    out = Path(config.train.output_dir)
    progress.start("preparing data")  # the one file written before the run folder (train/progress.py)
    run = prepare_run(config, console, startup)
    stage, tokenizer, template, report = run.stage, run.tokenizer, run.template, run.report

    progress.phase("loading model")
    set_seed(config.train.seed)  # LoRA initialisation and dropout follow the seed
    model = stage.load_model(config, tokenizer)
    plan = plan_speed(config, model, stage)
    model = stage.adapt_model(model, config, plan.checkpoint_every > 0)
    console.print(f"speed: {plan.describe()}")

    # The W&B / MLflow runs of train.report_to open before the run folder is made (one that cannot
    # start, e.g. W&B not logged in, is one line and leaves no folder) and close once the summary is
    # in: failed if training fails or stops.
    with tracker_runs(config, state.is_main_process):
        # From here on the run folder exists; summary.json at the end marks it complete.
        # Only the main process writes files; every rank trains.
        if state.is_main_process:
            if out.exists() and config.train.overwrite and run.resume_from is None:
                shutil.rmtree(out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.yaml").write_text(run.config_yaml, encoding="utf-8")
            if not stage.report_after_training(config):
                write_data_report(out, report)
        progress.run_folder_made()
        state.wait_for_everyone()
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(out / "tensorboard")

        trainer, summary = fit(config, model, run, out, plan, console, progress)
        log_summary(trainer, summary)
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
        if stage.report_after_training(config):
            write_data_report(out, report, stage.report_extras(trainer))
        summary["stage"] = config.train.stage
        summary["template"] = template.name if template else None
        write_run_card(out, config, summary)  # README.md, over the blank card PEFT saved with the adapter
        (out / SUMMARY).write_text(json.dumps(summary, indent=2), encoding="utf-8")
    progress.end("finished")
    return TrainResult(out, summary, report, trainer.model)


def write_data_report(out: Path, report, extras: dict | None = None) -> None:
    """data_report.json (and rejects.jsonl with data.on_error: skip): what the stage read of the data."""
    (out / "data_report.json").write_text(json.dumps({**report.summary(), **(extras or {})}, indent=2),
                                          encoding="utf-8")
    if report.rejections:
        with open(out / "rejects.jsonl", "w", encoding="utf-8") as fh:
            for r in report.rejections:
                fh.write(json.dumps({"source": r.source, "reason": r.reason, "detail": r.detail, "row": r.row},
                                    ensure_ascii=False, default=str) + "\n")


# ---------------------------------------------------------------- training


def fit(config: RunConfig, model, run: PreparedRun, out: Path, plan: SpeedPlan, console: Console,
        progress: ProgressFile | None = None):
    """Train `model` on the prepared run's rows (packed or padded, as planned) -> (trainer, summary).

    Writes metrics.jsonl, progress.json (and tensorboard) into `out`; saves nothing else; leaves
    progress.json at the phase "saving" (or "stopped"). `progress`: the run's (None: a new one).
    Benchmarks call this directly with a model built in memory and a PreparedRun of their rows.
    """
    stage = run.stage
    progress = progress or ProgressFile(out / PROGRESS, enabled=process_state().is_main_process)
    batches = stage.batches(config, plan, run.train_rows, run.eval_rows, run.pad_id, console)
    resume_step = checkpoint_step(run.resume_from) if run.resume_from else None
    metrics = MetricsFile(out / "metrics.jsonl", resume_step=resume_step, keys=stage.metrics_of(config))
    stop = StopOnSignal()
    trainer = stage.make_trainer(
        config,
        run,
        model=model,
        args=stage.training_arguments(config, run, out, plan, has_eval=bool(run.eval_rows)),
        train_dataset=batches.train,
        eval_dataset=batches.eval or None,
        data_collator=batches.collator,
        processing_class=run.tokenizer,
        callbacks=[LoggingSchedule(config.train.logging_steps), metrics, RichProgress(console, stage.progress_fields),
                   stop, ShardingReport(out), progress],
        checkpoint_marker=(run.fingerprint, run.config_yaml) if run.fingerprint else None,
    )
    trainer.remove_callback(PrinterCallback)  # the rich progress bar replaces printed dicts
    if run.evaluation is not None:
        TrainingEvaluation(config.eval, run.evaluation, run.tokenizer, config.train.eval_steps).attach(trainer)
    packed = plan.packing and stage.packed_forward
    started = time.perf_counter()
    stop.install()
    try:
        with packed_attention(model) if packed else nullcontext():
            trainer.train(resume_from_checkpoint=str(run.resume_from) if run.resume_from else None)
    finally:
        stop.uninstall()
    seconds = time.perf_counter() - started - metrics.eval_seconds - trainer.seconds_not_training
    if batches.eval and not stop.received and (not metrics.evals or metrics.evals[-1][0] != trainer.state.global_step):
        # eval_strategy "epoch" misses the end of a run cut short by max_steps; the end is what counts
        progress.phase("measuring held-out loss")
        with packed_attention(model) if packed else nullcontext():
            trainer.evaluate()
    summary = summarize(trainer, metrics, stage, config, batches.fill, plan, seconds)
    if stop.received:
        summary["stopped_by"] = stop.received
        progress.end("stopped")
    else:
        progress.phase("saving")
    return trainer, summary


def summarize(trainer, metrics: MetricsFile, stage, config: RunConfig, fill: float | None, plan: SpeedPlan,
              seconds: float) -> dict:
    """summary.json's figures: speed, first and last losses, the held-out figures at the start and end."""
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
        "packing_efficiency": round(fill if fill is not None else 1 - run["padding_fraction"], 4),
        "padding_fraction": run["padding_fraction"],
        "tflops": run["tflops"],
        "mfu": run.get("mfu"),
        "peak_memory_gib": peak_memory_gib(),
        "speed": plan.describe(),
    }
    for key in stage.metrics_of(config):  # the stage's held-out metrics (accuracy, margin, ...) at the start and end
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
    return summary
