"""vitune vs TRL's SFTTrainer on the CPU: real (non-padding) tokens per second.

The workload (issue 4): a tiny Llama (hidden 256, 4 layers, 4k vocab), 3,000 Vietnamese-like
conversations, micro-batch 8, max length 1024, loss on assistant tokens only, fp32, SDPA.
Three stacks, one process, same model weights, tokenizer and token rows:

  trl-padded   SFTTrainer, packing=False (rows padded to the longest of the batch)
  trl-packed   SFTTrainer, packing=True (BFD bins of 1024, a batch of 8 flattened into one row)
  vitune       `vitune train` defaults (packing on) through the real runner, run_training

TRL gets vitune's token ids and labels as a pre-tokenised dataset, so both stacks train on
exactly the same tokens with the same labels; both normalise the loss by trained tokens.
Throughput = real tokens / seconds from the end of the first optimizer step to the end of
the last (the first step pays one-time costs). GFLOP/s = 6 N x tokens/s, N = matmul weights
(embedding excluded, LM head included), the convention the logs use.

    python benchmarks/cpu_vs_trl.py --steps 30              # ~3 minutes on 2 cores
    python benchmarks/cpu_vs_trl.py --steps 30 --repeat 3   # best of 3, on a busy machine
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from common import StepClock, environment, environment_line, rate_from_metrics  # noqa: E402

MAX_LENGTH = 1024
BATCH = 8
LR = 2e-4


# ---------------------------------------------------------------- data


def turn_pool():
    """(system prompts, [(user, assistant)]) from the bundled Vietnamese data."""
    systems, pairs = [], []
    for line in (ROOT / "data" / "sharegpt_vi.jsonl").read_text(encoding="utf-8").splitlines():
        turns = json.loads(line)["conversations"]
        systems += [t["value"] for t in turns if t["from"] == "system"]
        chat = [t for t in turns if t["from"] != "system"]
        pairs += [(a["value"], b["value"]) for a, b in zip(chat[::2], chat[1::2])]
    for line in (ROOT / "data" / "alpaca_vi.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        pairs.append((user, row["output"]))
    return systems, pairs


def make_conversations(tokenizer, n: int, seed: int, median: float = 200, sigma: float = 1.0):
    """n ShareGPT conversations whose token lengths follow a log-normal (clipped to 32..1024):
    bundled turns recombined by a seeded RNG until each reaches its drawn length."""
    rng = random.Random(seed)
    systems, pairs = turn_pool()
    def tokens(text):
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    cost = [tokens(u) + tokens(a) + 16 for u, a in pairs]  # + the template's headers and end-of-turn tokens
    budget = MAX_LENGTH - 64  # + the conversation's own header
    out = []
    for _ in range(n):
        target = min(max(rng.lognormvariate(math.log(median), sigma), 32), budget)
        turns, used = [], 0
        if rng.random() < 0.3:
            system = rng.choice(systems)
            turns.append({"from": "system", "value": system})
            used += tokens(system) + 8
        while True:  # at least one exchange, then until the drawn length is reached
            i = rng.randrange(len(pairs))
            if used + cost[i] > budget:
                if turns and turns[-1]["from"] == "gpt":
                    break
                continue  # too long to be the first exchange: draw another
            turns += [{"from": "human", "value": pairs[i][0]}, {"from": "gpt", "value": pairs[i][1]}]
            used += cost[i]
            if used >= target:
                break
        out.append({"conversations": turns})
    return out


# ---------------------------------------------------------------- stacks


def run_trl(model_dir: Path, rows, packing: bool, steps: int, out: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    dataset = Dataset.from_dict({"input_ids": [r.input_ids for r in rows], "labels": [r.labels for r in rows]})
    args = SFTConfig(
        output_dir=str(out), per_device_train_batch_size=BATCH, max_length=MAX_LENGTH, packing=packing,
        max_steps=steps, learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=0.03, logging_steps=10,
        report_to="none", use_cpu=True, bf16=False, save_strategy="no", disable_tqdm=True, seed=42,
        dataloader_num_workers=0,
    )
    clock = StepClock(model)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[clock.callback])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {**clock.rate(), "steps": steps, "final_loss": losses[-1] if losses else None}


def run_vitune(model_dir: Path, data_file: Path, steps: int, out: Path) -> dict:
    from rich.console import Console

    from vitune.config import validate_config
    from vitune.train.runner import run_training

    config = validate_config({
        "model": {"name_or_path": str(model_dir)},
        "method": {"type": "full"},
        "data": {"train": [{"path": str(data_file)}], "max_length": MAX_LENGTH},  # packing: the default
        "train": {"max_steps": steps, "micro_batch_size": BATCH, "learning_rate": LR, "output_dir": str(out),
                  "overwrite": True, "logging_steps": 1, "report_to": ["none"]},
    })
    result = run_training(config, Console(quiet=True))
    return {**rate_from_metrics(out / "metrics.jsonl"), "steps": steps, "final_loss": result.summary["final_loss"],
            "summary": result.summary}


# ---------------------------------------------------------------- main


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps of the padded TRL run (8 rows each)")
    parser.add_argument("--rows", type=int, default=3000, help="conversations generated")
    parser.add_argument("--stacks", default="trl-padded,trl-packed,vitune")
    parser.add_argument("--repeat", type=int, default=1, help="run every stack this many times; report the best")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vitune.cli import quiet_libraries
    from vitune.config import DataConfig
    from vitune.data.pipeline import prepare_sft_data
    from vitune.data.templates import resolve_template
    from vitune.models.tiny import TINY_FAMILIES, tiny_config, train_tiny_tokenizer
    from vitune.train.telemetry import flops_model

    quiet_libraries()
    work = Path(tempfile.mkdtemp(prefix="vitune-bench-"))
    import torch

    tokenizer = train_tiny_tokenizer(TINY_FAMILIES["llama"], vocab_size=4096)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", tokenizer), dtype=torch.float32)
    model_dir = work / "tiny-llama"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir, save_jinja_files=False)
    flops_per_token = flops_model(model).per_token

    data_file = work / "conversations.jsonl"
    data_file.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in make_conversations(tokenizer, args.rows, args.seed)),
                         encoding="utf-8")
    data = DataConfig(train=[{"path": str(data_file)}], max_length=MAX_LENGTH)
    rows, _, report = prepare_sft_data(data, tokenizer, resolve_template("auto", tokenizer), seed=42)
    assert report.rows_kept == args.rows, report.summary()
    lengths = sorted(len(r.input_ids) for r in rows)
    mean = sum(lengths) / len(lengths)
    shuffled = random.Random(0).sample([len(r.input_ids) for r in rows], len(rows))
    batches = [shuffled[i:i + BATCH] for i in range(0, len(shuffled), BATCH)]
    padding = 1 - sum(map(sum, batches)) / sum(max(b) * len(b) for b in batches)
    # the packed stacks run as many steps as it takes for about the same number of real tokens
    packed_steps = max(4, round(args.steps * BATCH * mean / (BATCH * MAX_LENGTH)))

    info = environment()
    print(environment_line(info))
    print(f"data: {len(rows):,} conversations, {sum(lengths):,} tokens, length median {lengths[len(lengths) // 2]}, "
          f"mean {mean:.0f}, max {lengths[-1]}; {report.trained_token_fraction:.0%} of tokens trained; "
          f"padded batches of {BATCH}: {padding:.0%} padding")
    print(f"model: tiny Llama, {flops_per_token / 6 / 1e6:.2f} M matmul weights, {flops_per_token / 1e6:.1f} MFLOP/token (6N); "
          f"batch {BATCH}, max length {MAX_LENGTH}, fp32, SDPA\n")

    # Other work on a shared machine makes single runs noisy: with --repeat, the stacks run
    # in turn, in a rotating order, and each stack's best run is reported.
    stacks = args.stacks.split(",")
    results: dict[str, dict] = {}
    for round_ in range(args.repeat):
        for stack in stacks[round_ % len(stacks):] + stacks[:round_ % len(stacks)]:
            started = time.perf_counter()
            out = work / f"{stack}-{round_}"
            if stack == "trl-padded":
                r = run_trl(model_dir, rows, False, args.steps, out)
            elif stack == "trl-packed":
                r = run_trl(model_dir, rows, True, max(3, packed_steps // 3), out)  # ~3x slower per token
            elif stack == "vitune":
                r = run_vitune(model_dir, data_file, packed_steps, out)
            else:
                raise SystemExit(f"unknown stack {stack}")
            r["gflops"] = r["tokens_per_s"] * flops_per_token / 1e9
            r["runs"] = results.get(stack, {}).get("runs", []) + [round(r["tokens_per_s"], 1)]
            if stack not in results or r["tokens_per_s"] > results[stack]["tokens_per_s"]:
                results[stack] = r
            results[stack]["runs"] = r["runs"]
            print(f"{stack:11s} {r['tokens_per_s']:8,.0f} real tokens/s  {r['gflops']:6.1f} GFLOP/s  "
                  f"({r['steps']} steps, {r['tokens']:,} tokens timed over {r['seconds']:.1f} s; "
                  f"wall {time.perf_counter() - started:.0f} s)", flush=True)

    if args.repeat > 1:
        print(f"\nbest of {args.repeat} runs:")
        for stack, r in results.items():
            print(f"{stack:11s} {r['tokens_per_s']:8,.0f} real tokens/s  {r['gflops']:6.1f} GFLOP/s  (runs: {r['runs']})")
    if "vitune" in results:
        print()
        for other in ("trl-padded", "trl-packed"):
            if other in results:
                print(f"vitune / {other}: {results['vitune']['tokens_per_s'] / results[other]['tokens_per_s']:.2f}x")
        if "summary" in results["vitune"]:
            s = results["vitune"]["summary"]
            print(f"vitune run: {s['speed']}; packing efficiency {s['packing_efficiency']:.1%}, padding {s['padding_fraction']:.0%}")
    if args.out:
        args.out.write_text(json.dumps({"info": info, "results": results}, indent=2, default=str))


if __name__ == "__main__":
    main()
