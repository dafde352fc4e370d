"""vitune vs TRL's SFTTrainer fine-tuning the real SmolLM2-135M-Instruct on the CPU: LoRA,
QLoRA and full fine-tuning; real (non-padding) tokens/s and peak RSS of each run.

Workload: SmolLM2-135M-Instruct (Llama architecture, 134.5 M parameters, ChatML template), every
row of the bundled data/alpaca_vi.jsonl and data/sharegpt_vi.jsonl (Vietnamese) rendered and
tokenised ONCE by vitune's pipeline (assistant tokens trained only). Same settings for both
stacks: fp32 on the CPU (TRL: bf16=False, fp16=False, use_cpu=True), SDPA, max length 1024,
micro-batch 1, lr 1e-4 (cosine, warmup 3%), gradient checkpointing off, no eval, no saving by
TRL, report_to none, the same optimizer (`--optim`, default vitune's `auto` = adamw_bnb_8bit
when bitsandbytes is installed, given to TRL too: the optimizer state is a large part of the
full fine-tuning RSS, and like must be compared with like). LoRA: r 16, alpha 32, dropout 0,
all-linear. QLoRA: NF4 with double quantisation through bitsandbytes on the CPU, fp32 compute,
peft's prepare_model_for_kbit_training (no checkpointing), then the same LoRA; as in vitune
(vitune.models.loading.load_model / quantization_config / adapt_model).

  vitune  the real runner, vitune.train.runner.run_training, with its defaults (packing on: best-fit
          bins of up to 1024 tokens, row-wise SDPA, LM head only where a token is trained)
  trl     SFTTrainer on vitune's token ids and labels as a pre-tokenised dataset, so both train
          on exactly the same token rows with the same labels; by default packing=True (BFD,
          which turns on padding_free): a micro-batch of 1 is then one bin of up to 1024 tokens,
          the closest like-for-like to vitune's packing. `--trl-packing false` trains padded
          instead: with micro-batch 1 that is one row (~250 tokens) per step, a different workload.

TRL 1.16 casts the trainable LoRA weights of a quantised model to bf16 (QLoRA paper recipe);
by default this script casts them back to fp32 before training so that both stacks compute in
fp32 (`--trl-qlora-adapters bf16` keeps TRL's own choice).

Every (stack, method) runs in its own subprocess (this script with --child), one after the
other, so that the peak RSS is that run's alone: the parent reads it from os.wait4's rusage
of that child (ru_maxrss); the child also reports its own, and vitune's at the end of training,
before run_training writes the final model. Throughput = real tokens / seconds from the end of the
first optimizer step to the end of the last (the first step pays one-time costs), from
benchmarks/common.py (StepClock for TRL, vitune's own metrics.jsonl for vitune).

    python benchmarks/smollm2_vs_trl.py --methods lora,qlora,full --steps 8 --out results.json
    python benchmarks/smollm2_vs_trl.py --methods lora --stacks vitune --steps 3
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import StepClock, environment, environment_line, maxrss_gib, rate_from_metrics, run_child  # noqa: E402

PRESET = "smollm2-135m-instruct"
MAX_LENGTH = 1024
MICRO_BATCH = 1
LR = 1e-4
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
METHODS = ("lora", "qlora", "full")
STACKS = ("trl", "vitune")


def vitune_config(model_dir: Path, work: Path, method: str, steps: int, optim: str, out: Path):
    """The vitune run config; TRL takes its hyper-parameters from the same object."""
    from vitune.config import validate_config

    return validate_config({
        "model": {"name_or_path": str(model_dir), "dtype": "float32", "attn_implementation": "sdpa"},
        "method": {"type": method, **({"lora": dict(LORA)} if method != "full" else {})},
        "data": {"train": [{"path": str(ROOT / "data" / "alpaca_vi.jsonl")},
                           {"path": str(ROOT / "data" / "sharegpt_vi.jsonl")}],
                 "max_length": MAX_LENGTH, "cache_dir": str(work / "data-cache")},  # packing: the default
        "train": {"max_steps": steps, "micro_batch_size": MICRO_BATCH, "learning_rate": LR, "optimizer": optim,
                  "gradient_checkpointing": False, "output_dir": str(out), "overwrite": True,
                  "logging_steps": 1, "report_to": ["none"]},
    })


# ---------------------------------------------------------------- children (one run each)


def child_trl(config, rows_file: Path, method: str, packing: bool, adapters: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from vitune.models.optimizers import resolve_optimizer

    t, model_dir = config.train, config.model.name_or_path
    rows = json.loads(rows_file.read_text())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    kwargs = {}
    if method == "qlora":
        q = config.method.quantization
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=q.quant_type, bnb_4bit_use_double_quant=q.double_quant,
            bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa",
                                                 use_safetensors=True, **kwargs)
    peft_config = None
    if method in ("lora", "qlora"):
        from peft import LoraConfig, prepare_model_for_kbit_training

        if method == "qlora":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        lora = config.method.lora
        peft_config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                 target_modules=lora.target_modules, task_type="CAUSAL_LM")
    # The hook goes on the decoder: PEFT calls the causal LM's forward() directly, past its hooks.
    clock = StepClock(model.model)
    args = SFTConfig(
        output_dir=t.output_dir, per_device_train_batch_size=t.micro_batch_size, max_length=config.data.max_length,
        packing=packing, max_steps=t.max_steps, learning_rate=t.learning_rate, lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_ratio, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
        optim=resolve_optimizer(t.optimizer)[0], gradient_checkpointing=False, logging_steps=t.logging_steps,
        report_to="none", use_cpu=True, bf16=False, fp16=False, save_strategy="no", eval_strategy="no",
        disable_tqdm=True, seed=t.seed, data_seed=t.seed, dataloader_num_workers=0,
    )
    dataset = Dataset.from_dict({"input_ids": rows["input_ids"], "labels": rows["labels"]})
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[clock.callback])
    cast = 0
    if method == "qlora" and adapters == "float32":  # undo TRL's bf16 cast of the adapters (before the optimizer exists)
        for p in trainer.model.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data, cast = p.data.float(), cast + 1
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    dtypes = sorted({str(p.dtype) for p in trainer.model.parameters() if p.requires_grad})
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {**clock.rate(), "steps": trainer.state.global_step, "first_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None, "trainable_params": trainable,
            "trainable_dtypes": dtypes, "adapters_cast_to_fp32": cast, "optimizer": args.optim,
            "trl_packing": packing, "trl_padding_free": trainer.padding_free}


def child_vitune(config) -> dict:
    from rich.console import Console

    import vitune.train.sharding as sharding
    from vitune.models.optimizers import resolve_optimizer
    from vitune.train.runner import run_training

    # run_training writes the final model after training (TRL saves nothing): note the peak before it
    at_save = {}
    save = sharding.save_final_model

    def noting_peak(*args, **kwargs):
        at_save["kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return save(*args, **kwargs)

    sharding.save_final_model = noting_peak
    result = run_training(config, Console(quiet=True))
    out = Path(config.train.output_dir)
    s = result.summary
    return {**rate_from_metrics(out / "metrics.jsonl"), "steps": s["steps"], "first_loss": s["first_loss"],
            "final_loss": s["final_loss"], "optimizer": resolve_optimizer(config.train.optimizer)[0],
            "speed": s["speed"], "packing_efficiency": s["packing_efficiency"],
            "data_from_parent_cache": result.report.from_cache,
            "trainable_params": sum(p.numel() for p in result.model.parameters() if p.requires_grad),
            "peak_rss_train_gib": maxrss_gib(at_save["kib"]) if at_save else None}


def child_main(args) -> None:
    from vitune.cli import quiet_libraries

    quiet_libraries()
    out = args.work / f"{args.child}-{args.method}-{args.round}"
    config = vitune_config(args.work / "smollm2", args.work, args.method, args.steps, args.optim, out)
    started = time.perf_counter()
    if args.child == "trl":
        r = child_trl(config, args.work / "rows.json", args.method, args.trl_packing == "true", args.trl_qlora_adapters)
    else:
        r = child_vitune(config)
    r["wall_s"] = time.perf_counter() - started
    r["peak_rss_self_gib"] = maxrss_gib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    (args.work / f"result-{args.child}-{args.method}-{args.round}.json").write_text(json.dumps(r, indent=2, default=str))


# ---------------------------------------------------------------- parent


def prepare(work: Path, steps: int, optim: str) -> dict:
    """The model folder, and vitune's token rows for TRL (this also fills the data cache the
    vitune runs read, so both stacks train on the rows prepared here)."""
    from vitune.data.pipeline import prepare_sft_data
    from vitune.data.templates import resolve_template
    from vitune.models.loading import load_tokenizer
    from vitune.models.presets import write_preset

    model_dir, _ = write_preset(PRESET, work / "smollm2")
    config = vitune_config(model_dir, work, "lora", steps, optim, work / "unused")
    tokenizer = load_tokenizer(str(model_dir))
    template = resolve_template(config.model.template, tokenizer)
    rows, _, report = prepare_sft_data(config.data, tokenizer, template, config.train.seed)
    (work / "rows.json").write_text(json.dumps({"input_ids": [r.input_ids for r in rows],
                                                "labels": [r.labels for r in rows]}))
    lengths = sorted(len(r.input_ids) for r in rows)
    return {"rows": len(rows), "tokens": sum(lengths), "median_length": lengths[len(lengths) // 2],
            "max_length": lengths[-1], "trained_fraction": report.trained_token_fraction, "template": template.name}




def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS), help="lora,qlora,full or a subset")
    parser.add_argument("--stacks", default=",".join(STACKS), help="trl,vitune or one of them")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run (1 bin of <=1024 tokens each)")
    parser.add_argument("--repeat", type=int, default=1, help="run everything this many times; report the fastest")
    parser.add_argument("--optim", default="auto", help="optimizer of BOTH stacks (vitune's train.optimizer values)")
    parser.add_argument("--trl-packing", choices=("true", "false"), default="true")
    parser.add_argument("--trl-qlora-adapters", choices=("float32", "bf16"), default="float32",
                        help="TRL QLoRA adapter dtype: float32 (cast back, like vitune) or bf16 (TRL's own cast)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds before a run is killed")
    parser.add_argument("--work", type=Path, help="working folder (default: a new temporary one)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--child", choices=STACKS, help=argparse.SUPPRESS)
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args)

    methods, stacks = args.methods.split(","), args.stacks.split(",")
    for m in methods:
        if m not in METHODS:
            parser.error(f"unknown method {m}")
    for s in stacks:
        if s not in STACKS:
            parser.error(f"unknown stack {s}")
    from vitune.cli import quiet_libraries
    from vitune.models.optimizers import resolve_optimizer

    quiet_libraries()
    work = args.work or Path(tempfile.mkdtemp(prefix="vitune-smollm2-"))
    work.mkdir(parents=True, exist_ok=True)
    info = environment()
    data = prepare(work, args.steps, args.optim)
    print(environment_line(info))
    print(f"model: {PRESET}, fp32, SDPA, micro-batch {MICRO_BATCH}, max length {MAX_LENGTH}, lr {LR}, "
          f"optimizer {resolve_optimizer(args.optim)[0]} (both), LoRA r {LORA['r']} alpha {LORA['alpha']} dropout 0 all-linear")
    print(f"data: {data['rows']} rows, {data['tokens']:,} tokens (median {data['median_length']}, max {data['max_length']}), "
          f"{data['trained_fraction']:.0%} trained, template {data['template']}; TRL packing={args.trl_packing}; "
          f"{args.steps} steps per run, each run in its own process\n", flush=True)

    passthrough = ["--work", str(work), "--steps", str(args.steps), "--optim", args.optim,
                   "--trl-packing", args.trl_packing, "--trl-qlora-adapters", args.trl_qlora_adapters]
    results: dict[str, dict[str, dict]] = {m: {} for m in methods}
    for round_ in range(args.repeat):
        for i, method in enumerate(methods):
            k = (i + round_) % len(stacks)  # rotate which stack goes first
            for stack in stacks[k:] + stacks[:k]:
                log = work / f"log-{stack}-{method}-{round_}.txt"
                rc, rss = run_child(Path(__file__), ["--child", stack, "--method", method, "--round", str(round_), *passthrough],
                                    log, args.timeout, ROOT)
                result_file = work / f"result-{stack}-{method}-{round_}.json"
                if rc != 0 or not result_file.exists():
                    tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
                    print(f"{stack:6s} {method:5s} FAILED (exit {rc}); log {log}:\n{tail}\n", flush=True)
                    continue
                r = json.loads(result_file.read_text())
                r["peak_rss_gib"] = rss
                best = results[method].get(stack)
                r["runs"] = (best["runs"] if best else []) + [round(r["tokens_per_s"], 1)]
                if best is None or r["tokens_per_s"] > best["tokens_per_s"]:
                    results[method][stack] = r
                results[method][stack]["runs"] = r["runs"]
                loss = (f"loss {r['first_loss']:.3f} -> {r['final_loss']:.3f}; "
                        if r.get("first_loss") is not None and r.get("final_loss") is not None else "")
                print(f"{stack:6s} {method:5s} {r['tokens_per_s']:7.1f} real tokens/s  peak RSS {rss:5.2f} GiB  "
                      f"({r['steps']} steps, {r['tokens']:,} tokens timed over {r['seconds']:.1f} s; {loss}"
                      f"{r['trainable_params']:,} trainable; wall {r['wall_s']:.0f} s)", flush=True)

    ratios = {}
    print(f"\n{'method':6s} | {'TRL tok/s':>9s} | {'vitune tok/s':>12s} | {'ratio':>5s} | "
          f"{'TRL peak RSS GiB':>16s} | {'vitune peak RSS GiB':>19s} | {'ratio':>5s}")
    for method in methods:
        trl, vit = results[method].get("trl"), results[method].get("vitune")
        def cell(r, key, fmt):
            return format(r[key], fmt) if r else format("-", ">" + fmt.split(".")[0])
        speed = vit["tokens_per_s"] / trl["tokens_per_s"] if trl and vit else None
        memory = vit["peak_rss_gib"] / trl["peak_rss_gib"] if trl and vit else None
        ratios[method] = {"tokens_per_s": speed, "peak_rss": memory}
        print(f"{method:6s} | {cell(trl, 'tokens_per_s', '9.1f')} | {cell(vit, 'tokens_per_s', '12.1f')} | "
              f"{format(speed, '4.2f') + 'x' if speed else '-':>5s} | {cell(trl, 'peak_rss_gib', '16.2f')} | "
              f"{cell(vit, 'peak_rss_gib', '19.2f')} | {format(memory, '4.2f') + 'x' if memory else '-':>5s}")
    print("\nratio = vitune / TRL (tokens/s: higher is faster for vitune; RSS: lower is leaner for vitune)")
    print(environment_line(info))
    if args.out:
        args.out.write_text(json.dumps({"info": info, "data": data, "settings": {
            "model": PRESET, "max_length": MAX_LENGTH, "micro_batch": MICRO_BATCH, "learning_rate": LR, "lora": LORA,
            "steps": args.steps, "repeat": args.repeat, "optimizer": resolve_optimizer(args.optim)[0],
            "trl_packing": args.trl_packing, "trl_qlora_adapters": args.trl_qlora_adapters},
            "results": results, "ratios": ratios}, indent=2, default=str))


if __name__ == "__main__":
    main()
