"""vitune's DPO stage vs TRL's DPOTrainer on the CPU: real (non-padding) tokens/s, seconds per
step and peak RSS, the same preference pairs, model and batch for both.

Workload: SmolLM2-135M-Instruct (`--tiny`: a tiny random Llama, for a quick smoke) with LoRA
r 16 / alpha 32 / dropout 0 / all-linear, fp32, SDPA, every pair of the bundled
data/preference_vi.jsonl (Alpaca- and ShareGPT-style rows) rendered and tokenised ONCE by vitune
(`prepare_preference_data`, the answer and its end-of-turn marker trained). DPO with the sigmoid
loss, beta 0.1, the reference = the same model with the adapter disabled, micro-batch `--batch`
pairs, lr 5e-5 cosine, gradient checkpointing off, the same optimizer (`--optim`, vitune's `auto`
by default, given to TRL too), no eval, TRL saves nothing.

  vitune  the real runner, vitune.train.runner.run_training with train.stage: dpo: the chosen and
          rejected sequences of a micro-batch end to end in one padding-free row, attention row
          by row, the LM head only where a token is trained
  trl     DPOTrainer (TRL 1.16: padding_free is switched off, so the 2 x batch sequences are
          right-padded to the longest), fp32 (bf16=False, use_cpu=True)

TRL 1.16 always tokenises its dataset from text (`DPOTrainer._prepare_dataset` has no path for
token ids), so `PreTokenizedDPOTrainer` below overrides that one method to take vitune's ids as
prompt_ids / chosen_ids / rejected_ids; collation, forward, loss and metrics stay TRL's own. The
split: prompt_ids = the tokens before the first trained one (identical for chosen and rejected
in every pair), chosen_ids / rejected_ids = the rest of each sequence. Both stacks thus process
exactly the same tokens; TRL's completion mask also covers the one untrained token after each
answer's end-of-turn marker ("\\n" in ChatML), so its log-probs sum one more token per sequence.

Real tokens = the non-padding tokens of chosen + rejected of a micro-batch (the policy forward;
the reference forward re-reads the same tokens and is not counted again), over the seconds from
the end of the first optimizer step to the end of the last (the first pays one-time costs).
Every stack runs in its own subprocess (this script with --child), one after the other; its peak
RSS is that child's ru_maxrss from os.wait4.

    python benchmarks/dpo_vs_trl.py --steps 8 --batch 4 --json dpo.json
    python benchmarks/dpo_vs_trl.py --tiny --steps 4        # smoke, ~1 minute
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
MODEL_DIR = ROOT / "runs" / PRESET
DATA = ROOT / "data" / "preference_vi.jsonl"
MAX_LENGTH = 1024
LR = 5e-5
BETA = 0.1
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
STACKS = ("trl", "vitune")


def vitune_config(model_dir: Path, steps: int, batch: int, optim: str, out: Path):
    """The vitune run config; TRL takes its hyper-parameters from the same object."""
    from vitune.config import validate_config

    return validate_config({
        "model": {"name_or_path": str(model_dir), "dtype": "float32", "attn_implementation": "sdpa"},
        "method": {"type": "lora", "lora": dict(LORA)},
        "data": {"train": [{"path": str(DATA)}], "max_length": MAX_LENGTH},  # packing: the default
        "train": {"stage": "dpo", "max_steps": steps, "micro_batch_size": batch, "learning_rate": LR,
                  "optimizer": optim, "gradient_checkpointing": False, "output_dir": str(out), "overwrite": True,
                  "logging_steps": 1, "report_to": ["none"]},
        "dpo": {"loss": "sigmoid", "beta": BETA},
    })


def trl_rows(pairs) -> dict:
    """vitune's tokenised pairs -> TRL's pre-tokenised columns (same token ids)."""
    from vitune.data.preference import prompt_length

    rows = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    for pair in pairs:
        chosen, rejected = pair.chosen.input_ids, pair.rejected.input_ids
        n = prompt_length(pair.chosen)
        if rejected[:prompt_length(pair.rejected)] != chosen[:n]:
            raise SystemExit(f"{pair.source}: chosen and rejected prompts tokenise differently; TRL needs one prompt")
        rows["prompt_ids"].append(chosen[:n])
        rows["chosen_ids"].append(chosen[n:])
        rows["rejected_ids"].append(rejected[n:])
    return rows


# ---------------------------------------------------------------- children (one run each)


class BatchClock(StepClock):
    """StepClock fed once per micro-batch by the trainer instead of by a forward hook: TRL's
    reference forward runs through the same modules, in training mode, and a hook would count
    every token twice."""

    def _count(self, module, args, kwargs):
        pass


def child_trl(config, rows_file: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from vitune.models.optimizers import resolve_optimizer

    class PreTokenizedDPOTrainer(DPOTrainer):
        """DPOTrainer on prompt_ids / chosen_ids / rejected_ids as given; counts real tokens."""

        clock: BatchClock | None = None

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # TRL 1.16 would re-tokenise from text; the ids are already vitune's

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                self.clock.pending += int(inputs["attention_mask"].sum())  # chosen + rejected, no padding
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    t, model_dir = config.train, config.model.name_or_path
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa",
                                                 use_safetensors=True)
    lora = config.method.lora
    peft_config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=lora.target_modules, task_type="CAUSAL_LM")
    clock = BatchClock(model)
    args = DPOConfig(
        output_dir=t.output_dir, per_device_train_batch_size=t.micro_batch_size, max_length=config.data.max_length,
        loss_type=["sigmoid"], beta=config.dpo.beta, max_steps=t.max_steps, learning_rate=t.learning_rate,
        lr_scheduler_type=t.scheduler, warmup_steps=t.warmup_ratio, weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm, optim=resolve_optimizer(t.optimizer)[0], gradient_checkpointing=False,
        logging_steps=1, report_to="none", use_cpu=True, bf16=False, fp16=False, save_strategy="no",
        eval_strategy="no", disable_tqdm=True, seed=t.seed, data_seed=t.seed, dataloader_num_workers=0,
    )
    dataset = Dataset.from_dict(json.loads(rows_file.read_text()))
    trainer = PreTokenizedDPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                                     peft_config=peft_config, callbacks=[clock.callback])
    trainer.clock = clock
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {**clock.rate(), "steps": trainer.state.global_step, "step_tokens": clock.tokens_by_step,
            "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
            "trainable_params": trainable, "optimizer": args.optim, "trl_padding_free": trainer.padding_free}


def child_vitune(config) -> dict:
    from rich.console import Console

    from vitune.models.optimizers import resolve_optimizer
    from vitune.train.runner import run_training

    result = run_training(config, Console(quiet=True))
    s = result.summary
    metrics = Path(config.train.output_dir) / "metrics.jsonl"
    cumulative = [m["real_tokens"] for m in map(json.loads, metrics.read_text().splitlines()) if "loss" in m]
    return {**rate_from_metrics(metrics), "steps": s["steps"],
            "step_tokens": [b - a for a, b in zip([0, *cumulative], cumulative)],
            "first_loss": s["first_loss"], "final_loss": s["final_loss"], "summary_tokens_per_s": s["tokens_per_s"],
            "speed": s["speed"], "optimizer": resolve_optimizer(config.train.optimizer)[0],
            "trainable_params": sum(p.numel() for p in result.model.parameters() if p.requires_grad)}


def child_main(args) -> None:
    from vitune.cli import quiet_libraries

    quiet_libraries()
    out = args.work / f"{args.child}-{args.round}"
    config = vitune_config(args.model, args.steps, args.batch, args.optim, out)
    started = time.perf_counter()
    r = child_trl(config, args.work / "pairs.json") if args.child == "trl" else child_vitune(config)
    r["wall_s"] = time.perf_counter() - started
    r["peak_rss_self_gib"] = maxrss_gib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    (args.work / f"result-{args.child}-{args.round}.json").write_text(json.dumps(r, indent=2, default=str))


# ---------------------------------------------------------------- parent


def prepare(work: Path, model_dir: Path, tiny: bool, args) -> dict:
    """The model folder, and vitune's tokenised pairs for TRL (the vitune child tokenises the same
    file with the same seed itself; the per-step token counts show both trained the same batches)."""
    from vitune.data.preference import prepare_preference_data
    from vitune.data.templates import resolve_template
    from vitune.models.loading import load_tokenizer

    if tiny:
        from vitune.models.tiny import init_tiny_model

        init_tiny_model("llama", model_dir)
    elif not (model_dir / "config.json").exists():
        from vitune.models.presets import write_preset

        write_preset(PRESET, model_dir)  # what `vitune init-model --preset smollm2-135m-instruct` does
    config = vitune_config(model_dir, args.steps, args.batch, args.optim, work / "unused")
    tokenizer = load_tokenizer(str(model_dir))
    template = resolve_template(config.model.template, tokenizer)
    pairs, _, report = prepare_preference_data(config.data, tokenizer, template, config.train.seed, "dpo")
    (work / "pairs.json").write_text(json.dumps(trl_rows(pairs)))
    per_pair = sorted(len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in pairs)
    return {"pairs": len(pairs), "tokens": report.total_tokens, "trained_fraction": report.trained_token_fraction,
            "median_pair_tokens": per_pair[len(per_pair) // 2], "max_pair_tokens": per_pair[-1],
            "template": template.name}




def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per stack (the first is not timed)")
    parser.add_argument("--batch", type=int, default=4, help="pairs per micro-batch (2x sequences)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of SmolLM2 (smoke test)")
    parser.add_argument("--stacks", default=",".join(STACKS), help="trl,vitune or one of them")
    parser.add_argument("--repeat", type=int, default=1, help="run every stack this many times; report the fastest")
    parser.add_argument("--optim", default="auto", help="optimizer of BOTH stacks (vitune's train.optimizer values)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds before a run is killed")
    parser.add_argument("--work", type=Path, help="working folder (default: a new temporary one)")
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument("--child", choices=STACKS, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args)
    if args.steps < 2:
        parser.error("--steps must be 2 or more: the first step is not timed")
    stacks = args.stacks.split(",")
    for s in stacks:
        if s not in STACKS:
            parser.error(f"unknown stack {s}")

    from vitune.cli import quiet_libraries
    from vitune.models.optimizers import resolve_optimizer

    quiet_libraries()
    work = args.work or Path(tempfile.mkdtemp(prefix="vitune-dpo-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / "tiny-llama" if args.tiny else MODEL_DIR
    model_name = "tiny random Llama" if args.tiny else PRESET
    info = environment()
    data = prepare(work, model_dir, args.tiny, args)
    print(environment_line(info))
    print(f"model: {model_name}, fp32, SDPA, LoRA r {LORA['r']} alpha {LORA['alpha']} dropout 0 all-linear, "
          f"reference = adapter disabled; DPO sigmoid, beta {BETA}, lr {LR}, optimizer {resolve_optimizer(args.optim)[0]}")
    print(f"data: {data['pairs']} pairs, {data['tokens']:,} tokens (chosen + rejected per pair: median "
          f"{data['median_pair_tokens']}, max {data['max_pair_tokens']}), {data['trained_fraction']:.0%} trained, "
          f"template {data['template']}; micro-batch {args.batch} pairs, {args.steps} steps per stack, "
          f"each in its own process\n", flush=True)

    passthrough = ["--work", str(work), "--model", str(model_dir), "--steps", str(args.steps),
                   "--batch", str(args.batch), "--optim", args.optim]
    results: dict[str, dict] = {}
    for round_ in range(args.repeat):
        k = round_ % len(stacks)  # rotate which stack goes first
        for stack in stacks[k:] + stacks[:k]:
            log = work / f"log-{stack}-{round_}.txt"
            rc, rss = run_child(Path(__file__), ["--child", stack, "--round", str(round_), *passthrough], log,
                                args.timeout, ROOT)
            result_file = work / f"result-{stack}-{round_}.json"
            if rc != 0 or not result_file.exists():
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
                print(f"{stack:6s} FAILED (exit {rc}); log {log}:\n{tail}\n", flush=True)
                continue
            r = json.loads(result_file.read_text())
            r["peak_rss_gib"] = rss
            r["s_per_step"] = r["seconds"] / (r["steps"] - 1)
            runs = results.get(stack, {}).get("runs", []) + [round(r["tokens_per_s"], 1)]
            if stack not in results or r["tokens_per_s"] > results[stack]["tokens_per_s"]:
                results[stack] = r
            results[stack]["runs"] = runs
            own = f"; vitune summary {r['summary_tokens_per_s']:.1f} tokens/s" if "summary_tokens_per_s" in r else ""
            print(f"{stack:6s} {r['tokens_per_s']:7.1f} real tokens/s  {r['s_per_step']:6.2f} s/step  peak RSS "
                  f"{rss:5.2f} GiB  ({r['steps']} steps, {r['tokens']:,} tokens timed over {r['seconds']:.1f} s; "
                  f"loss {r['first_loss']:.4f} -> {r['final_loss']:.4f}{own}; wall {r['wall_s']:.0f} s)", flush=True)

    trl, vit = results.get("trl"), results.get("vitune")
    ratios = {}
    if trl and vit:
        ratios = {"tokens_per_s": vit["tokens_per_s"] / trl["tokens_per_s"],
                  "s_per_step": vit["s_per_step"] / trl["s_per_step"],
                  "peak_rss": vit["peak_rss_gib"] / trl["peak_rss_gib"]}
        print(f"\n{'stack':6s} | {'real tokens/s':>13s} | {'s/step':>6s} | {'peak RSS GiB':>12s}")
        for name, r in (("TRL", trl), ("vitune", vit)):
            print(f"{name:6s} | {r['tokens_per_s']:13.1f} | {r['s_per_step']:6.2f} | {r['peak_rss_gib']:12.2f}")
        print(f"ratio  | {ratios['tokens_per_s']:12.2f}x | {ratios['s_per_step']:5.2f}x | {ratios['peak_rss']:11.2f}x")
        print("ratio = vitune / TRL (tokens/s: higher is faster for vitune; s/step and RSS: lower is better)")
        if trl["step_tokens"] != vit["step_tokens"]:
            print(f"note: the stacks trained different batches (tokens per step: TRL {trl['step_tokens']}, "
                  f"vitune {vit['step_tokens']})")
    print(environment_line(info))
    record = {"info": info, "data": data, "settings": {
        "model": model_name, "max_length": MAX_LENGTH, "micro_batch_pairs": args.batch, "learning_rate": LR,
        "beta": BETA, "loss": "sigmoid", "lora": LORA, "steps": args.steps, "repeat": args.repeat,
        "optimizer": resolve_optimizer(args.optim)[0]}, "results": results, "ratios": ratios}
    if args.json:
        args.json.write_text(json.dumps(record, indent=2, default=str))
    print(json.dumps({"vitune_tokens_per_s": vit and round(vit["tokens_per_s"], 1),
                      "trl_tokens_per_s": trl and round(trl["tokens_per_s"], 1),
                      "ratio": round(ratios["tokens_per_s"], 3) if ratios else None,
                      "vitune_peak_rss_gib": vit and round(vit["peak_rss_gib"], 3),
                      "trl_peak_rss_gib": trl and round(trl["peak_rss_gib"], 3)}))


if __name__ == "__main__":
    main()
