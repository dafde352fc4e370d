"""vitune vs plain transformers + PEFT on one GPU: real tokens/s and peak memory.

The workload (issue 4): a Llama-3-8B shape with random weights in bf16, LoRA r=16 on every
linear layer, SFT rows with log-normal lengths (median 350 tokens, sigma 0.8, clipped to
32..2048) and loss on the answer only (a random 20-60% prompt carries no labels).

  peft          transformers Trainer + PEFT as most scripts write it: rows padded to the
                longest of a micro-batch of 8, activation checkpointing, SDPA
  vitune        vitune's defaults (vitune.train.runner.fit, the runner's own training step):
                packing (4 bins of 2,048 tokens per micro-batch), Liger kernels when
                installed, flash-attn varlen when installed (else row-wise SDPA), activation
                checkpointing `auto` (as few layers as the GPU's memory needs)
  vitune-ckpt   the same with train.gradient_checkpointing: true (every layer), for the
                smallest memory

Every stack runs in its own process (Liger patches transformers' modules in place, and each
peak memory is then its own) on the same rows; throughput = real tokens / seconds from the
end of optimizer step 1 to the end of the last step.

    python benchmarks/gpu_vs_peft.py --out gpu.json                 # H100 / H200, ~4-5 minutes
    python benchmarks/gpu_vs_peft.py --tiny --steps 4 --out t.json  # tiny shape, runs on a CPU
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from common import StepClock, environment, environment_line, rate_from_metrics  # noqa: E402

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)
TINY = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=4096, max_position_embeddings=2048, rope_theta=500000.0)
PEFT_MICRO_BATCH = 8
LORA = dict(r=16, alpha=32, dropout=0.05)
LR = 2e-4


def synthetic_rows(n: int, vocab: int, max_length: int, seed: int):
    """SFT-shaped token rows: log-normal lengths, the first 20-60% (the prompt) unlabelled."""
    from vitune.data.tokenize import IGNORE, TokenizedRow

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        length = int(min(max(rng.lognormvariate(math.log(350), 0.8), 32), max_length))
        ids = [rng.randrange(10, vocab) for _ in range(length)]
        prompt = int(length * rng.uniform(0.2, 0.6))
        rows.append(TokenizedRow(ids, [IGNORE] * prompt + ids[prompt:]))
    return rows


def build_model(shape: dict, attn: str, dtype):
    """The model with random weights, created directly on the GPU (an 8B model on the CPU first
    would take minutes)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**shape, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)


# ---------------------------------------------------------------- stacks (each in its own process)


def run_peft(args, rows, out: Path) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    gpu = torch.cuda.is_available()
    model = build_model(args.shape, "sdpa", torch.bfloat16 if gpu else torch.float32)
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                             target_modules="all-linear", task_type="CAUSAL_LM"))

    def pad(batch):  # the usual right padding; labels -100 where padded
        longest = max(len(b["input_ids"]) for b in batch)
        ids = torch.zeros(len(batch), longest, dtype=torch.long)
        labels = torch.full((len(batch), longest), -100)
        mask = torch.zeros(len(batch), longest, dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(b["input_ids"]), torch.tensor(b["labels"]), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    training = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=PEFT_MICRO_BATCH, max_steps=args.steps, learning_rate=LR,
        warmup_steps=0.03, logging_steps=1, bf16=gpu, activation_checkpointing=True, report_to="none",
        save_strategy="no", disable_tqdm=True, remove_unused_columns=False, use_cpu=not gpu, dataloader_num_workers=0,
        seed=42,
    )
    clock = StepClock(model)
    trainer = Trainer(model=model, args=training, data_collator=pad, callbacks=[clock.callback],
                      train_dataset=[{"input_ids": r.input_ids, "labels": r.labels} for r in rows])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {**clock.rate(), "steps": args.steps, "final_loss": losses[-1],
            "setup": f"padded micro-batch {PEFT_MICRO_BATCH}, activation checkpointing, SDPA", "model": model}


def run_vitune(args, rows, out: Path, overrides: list[str]) -> dict:
    from rich.console import Console

    from vitune.config import apply_override, validate_config
    from vitune.models.loading import adapt_model, resolve_attention, resolve_dtype
    from vitune.data.pipeline import DataReport
    from vitune.models.optimizers import resolve_optimizer
    from vitune.train.arguments import plan_speed, resolve_scale_out
    from vitune.train.runner import fit
    from vitune.train.stage import PreparedRun
    from vitune.train.stages import STAGES

    raw = {
        "model": {"name_or_path": "synthetic-llama"},
        "method": {"type": "lora", "lora": {"r": LORA["r"], "alpha": LORA["alpha"], "dropout": LORA["dropout"]}},
        "data": {"train": [{"path": "synthetic"}], "max_length": args.max_length},
        "train": {"max_steps": args.steps, "learning_rate": LR, "output_dir": str(out), "overwrite": True,
                  "logging_steps": 1, "report_to": ["none"]},
    }
    for item in overrides:
        apply_override(raw, item)
    config = validate_config(raw)
    # vitune's load_model, minus the folder: the same dtype and attention choices
    model = build_model(args.shape, resolve_attention(config.model.attn_implementation), resolve_dtype(config.model.dtype))
    plan = plan_speed(config, model)
    model = adapt_model(model, config.method, plan.checkpoint_every > 0)
    # the runner's prepared run, of rows made in memory (no tokenizer: pad id 0)
    run = PreparedRun(STAGES["sft"], None, None, rows, [], DataReport(), scale_out=resolve_scale_out(config),
                      optimizer=resolve_optimizer(config.train.optimizer)[0], pad_token_id=0)
    trainer, summary = fit(config, model, run, out, plan, Console(quiet=True))
    return {**rate_from_metrics(out / "metrics.jsonl"), "steps": args.steps, "final_loss": summary["final_loss"],
            "setup": summary["speed"] + f", micro-batch {config.train.micro_batch_size} x {args.max_length} tokens",
            "model": model, "summary": summary}


def worker(args) -> None:
    """One stack: train, then write its result as JSON to args.result."""
    import torch

    from vitune.cli import quiet_libraries
    from vitune.train.telemetry import flops_model, peak_flops

    quiet_libraries()
    rows = synthetic_rows(args.rows, args.shape["vocab_size"], args.max_length, seed=0)
    out = Path(args.work) / args.stack
    if args.stack == "peft":
        r = run_peft(args, rows, out)
    elif args.stack == "vitune":
        r = run_vitune(args, rows, out, args.vitune_set)
    elif args.stack == "vitune-ckpt":
        r = run_vitune(args, rows, out, [*args.vitune_set, "train.gradient_checkpointing=true"])
    else:
        raise SystemExit(f"unknown stack {args.stack}")
    model = r.pop("model")
    flops = flops_model(model).per_token  # 4 N: frozen base weights
    r["tflops"] = r["tokens_per_s"] * flops / 1e12
    peak = peak_flops()
    r["mfu"] = r["tflops"] * 1e12 / peak if peak else None
    r["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    Path(args.result).write_text(json.dumps(r, default=str))


# ---------------------------------------------------------------- main


def run_stack(args, stack: str, work: Path, vitune_set: list[str]) -> dict | None:
    """Run one stack in a fresh process; its result, or None when it failed."""
    result_file = work / f"{stack}.json"
    result_file.unlink(missing_ok=True)
    command = [sys.executable, __file__, "--stack", stack, "--result", str(result_file), "--work", str(work),
               "--out", str(args.out), "--steps", str(args.steps), "--rows", str(args.rows)]
    command += ["--tiny"] if args.tiny else []
    command += [f"--vitune-set={item}" for item in vitune_set]
    done = subprocess.run(command, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if done.returncode != 0 or not result_file.exists():
        return None
    r = json.loads(result_file.read_text())
    r["overrides"] = vitune_set if stack.startswith("vitune") else []
    return r


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="write the results as JSON here")
    parser.add_argument("--tiny", action="store_true", help="a tiny Llama shape (runs on a CPU) instead of Llama-3-8B")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per stack")
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--stacks", default="peft,vitune,vitune-ckpt")
    parser.add_argument("--vitune-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a vitune config override for the vitune stacks, e.g. train.liger_kernel=false")
    parser.add_argument("--stack", help=argparse.SUPPRESS)  # internal: run one stack in this process
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.shape = TINY if args.tiny else LLAMA3_8B
    args.max_length = 1024 if args.tiny else 2048
    if args.stack:
        return worker(args)

    info = environment()
    print(environment_line(info))
    shape = "tiny Llama (hidden 256, 4 layers, 4k vocab)" if args.tiny else "Llama-3-8B shape (random weights)"
    print(f"workload: {shape}, LoRA r={LORA['r']} all-linear, {args.rows} rows (log-normal lengths, median 350, "
          f"clipped to 32..{args.max_length}), {args.steps} steps per stack\n", flush=True)
    work = Path(tempfile.mkdtemp(prefix="vitune-gpu-bench-"))
    results = {}
    for stack in args.stacks.split(","):
        started = time.perf_counter()
        r = run_stack(args, stack, work, args.vitune_set)
        if r is None and stack.startswith("vitune") and not any("liger" in item for item in args.vitune_set):
            # Liger patches transformers' internals and is the likeliest part to break with a new
            # transformers release; one failed GPU call should still give vitune's numbers.
            print(f"{stack}: failed; once more with train.liger_kernel=false", flush=True)
            r = run_stack(args, stack, work, [*args.vitune_set, "train.liger_kernel=false"])
        if r is None:
            results[stack] = {"error": "failed, see the output above"}
            continue
        results[stack] = r
        peak = f"{r['peak_gib']:.1f} GiB" if r["peak_gib"] is not None else "n/a (CPU)"
        mfu = f", MFU {r['mfu']:.1%}" if r.get("mfu") else ""
        print(f"{stack:12s} {r['tokens_per_s']:9,.0f} real tokens/s  peak {peak:>10s}  {r['tflops']:7.2f} TFLOP/s{mfu}  "
              f"({r['tokens']:,} tokens in {r['seconds']:.1f} s; wall {time.perf_counter() - started:.0f} s)\n"
              f"{'':12s} {r['setup']}", flush=True)

    ratios = {}
    base = results.get("peft", {}).get("tokens_per_s")
    for stack in ("vitune", "vitune-ckpt"):
        if base and "tokens_per_s" in results.get(stack, {}):
            ratios[f"{stack}/peft"] = results[stack]["tokens_per_s"] / base
            print(f"{stack} / peft: {ratios[f'{stack}/peft']:.2f}x real tokens/s")
    args.out.write_text(json.dumps({"info": info, "workload": {"shape": args.shape, "steps": args.steps, "rows": args.rows,
                                                               "max_length": args.max_length, "lora": LORA},
                                    "results": results, "ratios": ratios}, indent=2, default=str))
    print(f"results written to {args.out}")


if __name__ == "__main__":
    main()
