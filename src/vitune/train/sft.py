"""Supervised fine-tuning, read top to bottom:

    config -> tokenizer + template -> data (rows -> records -> tokens) -> model (load -> adapt)
           -> Trainer -> run folder

The run folder holds config.yaml (resolved), metrics.jsonl, tensorboard/, then at the end
the adapter (or full model), the tokenizer with the chat template used in training, and
summary.json. summary.json is written last: a folder without it is an unfinished run.
Everything that can fail on the user's input (config, paths, data) fails before the run
folder is created.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from vitune.config import RunConfig, dump_config
from vitune.data.pipeline import DataReport, prepare_sft_data
from vitune.data.templates import resolve_template
from vitune.errors import UserError
from vitune.models.loading import adapt_model, load_model, load_tokenizer

SUMMARY = "summary.json"


@dataclass
class TrainResult:
    output_dir: Path
    summary: dict
    report: DataReport
    model: object = None  # the trained model in memory (adapter attached for LoRA)


def check_output_dir(path: Path, overwrite: bool) -> None:
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise UserError(
                f"train.output_dir {path} already exists and is not empty; choose another folder "
                "or set train.overwrite: true (e.g. --set train.overwrite=true)"
            )
        if not path.is_dir():
            raise UserError(f"train.output_dir {path} is a file")


def training_arguments(config: RunConfig, output_dir: Path, has_eval: bool):
    import torch
    from transformers import TrainingArguments

    t = config.train
    dtype = config.model.dtype
    on_gpu = torch.cuda.is_available()
    bf16 = on_gpu and dtype in ("auto", "bfloat16") and torch.cuda.is_bf16_supported()
    return TrainingArguments(
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
        optim=t.optimizer,
        activation_checkpointing=t.gradient_checkpointing,
        bf16=bf16,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        save_total_limit=t.save_total_limit,
        eval_strategy="steps" if has_eval and t.eval_steps else ("epoch" if has_eval else "no"),
        eval_steps=t.eval_steps,
        report_to=[r for r in t.report_to if r != "none"] or "none",
        disable_tqdm=True,
        remove_unused_columns=False,
        use_cpu=not on_gpu,
        dataloader_num_workers=0,
    )


def run_sft(config: RunConfig, console: Console | None = None) -> TrainResult:
    """Fine-tune `config.model` on `config.data`; returns the run folder and its summary."""
    from transformers import set_seed

    console = console or Console()
    out = Path(config.train.output_dir)
    check_output_dir(out, config.train.overwrite)

    # The tokenizer and template come first: the data is rendered and tokenised with them.
    tokenizer = load_tokenizer(config.model.name_or_path, config.model.trust_remote_code)
    template = resolve_template(config.model.template, tokenizer)
    train_rows, eval_rows, report = prepare_sft_data(config.data, tokenizer, template, config.train.seed)
    if report.from_cache:
        console.print(f"data: reusing prepared data from the cache ({report.cached_at})")
    console.print(
        f"data: {report.rows_read} rows read, {report.rows_kept} kept, {report.rows_rejected} rejected"
        + (f" {report.rejected_by_reason}" if report.rows_rejected else "")
        + f", {report.rows_truncated} truncated; {report.total_tokens:,} tokens, "
        f"{report.trained_token_fraction:.0%} trained; template {template.name}"
    )

    set_seed(config.train.seed)  # LoRA initialisation and dropout follow the seed
    model = load_model(config.model, config.method)
    model = adapt_model(model, config.method, config.train.gradient_checkpointing)

    # From here on the run folder exists; summary.json at the end marks it complete.
    if out.exists() and config.train.overwrite:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_config(config), encoding="utf-8")
    (out / "data_report.json").write_text(json.dumps(report.summary(), indent=2), encoding="utf-8")
    if report.rejections:
        with open(out / "rejects.jsonl", "w", encoding="utf-8") as fh:
            for r in report.rejections:
                fh.write(json.dumps({"source": r.source, "reason": r.reason, "detail": r.detail, "row": r.row}, ensure_ascii=False, default=str) + "\n")
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(out / "tensorboard")

    from transformers.trainer_callback import PrinterCallback

    from vitune.train.trainer import MetricsFile, PadCollator, RichProgress, VituneTrainer

    metrics = MetricsFile(out / "metrics.jsonl")
    trainer = VituneTrainer(
        model=model,
        args=training_arguments(config, out, bool(eval_rows)),
        train_dataset=[{"input_ids": r.input_ids, "labels": r.labels} for r in train_rows],
        eval_dataset=[{"input_ids": r.input_ids, "labels": r.labels} for r in eval_rows] or None,
        data_collator=PadCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=[metrics, RichProgress(console)],
    )
    trainer.remove_callback(PrinterCallback)  # the rich progress bar replaces printed dicts
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started

    # The template used in training travels with the tokenizer, so chat renders the same.
    tokenizer.chat_template = template.jinja()
    trainer.save_model(str(out))
    tokenizer.save_pretrained(str(out), save_jinja_files=False)
    # Trainer also saved the tokenizer, with the template in chat_template.jinja; keep one copy,
    # in tokenizer_config.json, where every tool (old and new) looks for it.
    (out / "chat_template.jinja").unlink(missing_ok=True)
    summary = {
        "steps": trainer.state.global_step,
        "seconds": round(seconds, 2),
        "real_tokens": trainer.real_tokens,
        "tokens_per_s": round(trainer.real_tokens / seconds, 1) if seconds else 0.0,
        "first_loss": metrics.losses[0][1] if metrics.losses else None,
        "final_loss": metrics.losses[-1][1] if metrics.losses else None,
        "packing_efficiency": round(trainer.real_tokens / max(trainer.token_slots, 1), 4),
        "peak_memory_gib": _peak_memory(),
        "template": template.name,
    }
    (out / SUMMARY).write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return TrainResult(out, summary, report, trainer.model)


def _peak_memory():
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None
