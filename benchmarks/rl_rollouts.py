"""RL rollouts and RL steps on the CPU: TRL's default generation path vs vitune's `sample_completions`
(src/vitune/train/rollouts.py), on the real SmolLM2-135M-Instruct with a fresh LoRA.

Workload: SmolLM2-135M-Instruct (fp32 in both stacks: TRL's GRPOConfig defaults to bf16=True even on
the CPU, set to False here), a new LoRA (r 16, alpha 32, dropout 0, all linear layers, B = 0 as PEFT
initialises it), the first 16 prompts of data/alpaca_vi.jsonl rendered by the ChatML template up to the
assistant's generation prompt, 8 completions per batch (2 prompts x 4 generations), at most 48 new
tokens, temperature 1.0, stopping at <|im_end|>. Both stacks build a GRPOTrainer the same way (the
base model + peft_config, beta 0.02, a cheap reward: the completion's length / 100) and differ only in
the class: TRL's GRPOTrainer or vitune's VituneGRPOTrainer.

  (a) rollout generated tokens/s: `trainer._generate_single_turn` on all 16 prompts (8 batches of 8,
      after one warm-up batch), the model in train mode as during training; real completion tokens
      (up to and including the eos) over the seconds. Two more stacks separate the two changes:
      trl-merged (TRL's `generate` inside vitune's `rollout_mode`: LoRA merged, eval mode) and
      vitune-unmerged (vitune's decode loop over PEFT's unmerged LoRA).
  (b) seconds per RL step: `trainer.train()` for 4 steps; the mean of steps 2..4 (the first pays
      one-time costs), with the share spent in the rollout.

Every stack runs in its own process (this script with --child), one after another; compare the
ratios, not the absolute figures, on a shared host. `--profile` instead prints where a decode step of
TRL's path goes (cProfile of one batch's `generate`), for rollouts.py's docstring.

    python benchmarks/rl_rollouts.py --out results.json
    python benchmarks/rl_rollouts.py --profile
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, environment_line, run_child  # noqa: E402

PRESET = "smollm2-135m-instruct"
PROMPTS = 16
GENERATIONS = 4
BATCH = 8  # completions per batch: 2 prompts x 4 generations
MAX_NEW = 48
BETA = 0.02
STEPS = 4  # the first is a warm-up
ROLLOUT_STACKS = ("trl", "trl-merged", "vitune-unmerged", "vitune")
STEP_STACKS = ("trl", "vitune")


def prepare(work: Path) -> Path:
    """The model folder and the rendered prompts (work/prompts.json)."""
    from vitune.data.records import Conversation, Message
    from vitune.data.templates import get_template
    from vitune.models.presets import write_preset

    model_dir, _ = write_preset(PRESET, work / "smollm2")
    rows = [json.loads(line) for line in (ROOT / "data" / "alpaca_vi.jsonl").read_text(encoding="utf-8").splitlines()]
    template = get_template("chatml")
    prompts = [template.prompt(Conversation([Message("user", "\n\n".join(filter(None, (r["instruction"], r.get("input")))))]))
               for r in rows[:PROMPTS]]
    (work / "prompts.json").write_text(json.dumps(prompts, ensure_ascii=False))
    return model_dir


def length_reward(completions, **kwargs):
    return [len(c) / 100 for c in completions]


def build_trainer(work: Path, stack: str, max_steps: int):
    """A GRPO trainer of `stack` (TRL's class or vitune's) over the prompts, the LoRA new."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from vitune.train.stages.rl import VituneGRPOTrainer

    torch.manual_seed(0)
    model_dir = work / "smollm2"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    prompts = json.loads((work / "prompts.json").read_text())
    args = GRPOConfig(output_dir=str(work / f"out-{stack}"), per_device_train_batch_size=BATCH, num_generations=GENERATIONS,
                      max_completion_length=MAX_NEW, temperature=1.0, beta=BETA, bf16=False, max_steps=max_steps,
                      learning_rate=1e-5, logging_steps=1, save_strategy="no", report_to=[], seed=0, use_cpu=True)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer_class = GRPOTrainer if stack.startswith("trl") else VituneGRPOTrainer
    return trainer_class(model=model, args=args, reward_funcs=[length_reward], processing_class=tokenizer,
                         train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]), peft_config=lora), prompts


def rollout_child(work: Path, stack: str, prompts_timed: int) -> dict:
    """Tokens/s of `stack`'s `_generate_single_turn` over the first `prompts_timed` prompts, GENERATIONS times each."""
    import contextlib

    import vitune.train.rollouts as rollouts

    trainer, prompts = build_trainer(work, stack, 1)
    if stack == "vitune-unmerged":
        rollouts._merge_lora = lambda model: []  # the ablation: PEFT's unmerged forward in vitune's loop
    ids = [trainer.processing_class(text=p, add_special_tokens=False)["input_ids"] for p in prompts[:prompts_timed]]
    per_batch = BATCH // GENERATIONS
    batches = [[row for row in ids[i:i + per_batch] for _ in range(GENERATIONS)] for i in range(0, len(ids), per_batch)]
    model = trainer.accelerator.unwrap_model(trainer.model)
    model.train()  # as GRPO's training step leaves it

    def generate(batch):
        context = rollouts.rollout_mode(model) if stack == "trl-merged" else contextlib.nullcontext()
        with context:
            out = trainer._generate_single_turn(batch, None, {}, GENERATIONS)
        return out[0] if isinstance(out, tuple) else out

    generate(batches[0])  # warm-up: first-call costs
    start = time.perf_counter()
    completions = [c for batch in batches for c in generate(batch)]
    seconds = time.perf_counter() - start
    tokens = sum(map(len, completions))
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "completions": len(completions),
            "mean_length": tokens / len(completions)}


def step_child(work: Path, stack: str, steps: int) -> dict:
    """Seconds per optimizer step of `stack`'s GRPO (steps 2..steps), and the rollout's share of them."""
    from transformers import TrainerCallback

    trainer, _ = build_trainer(work, stack, steps)
    marks, rollout = [], [0.0] * (steps + 1)
    generate = trainer._generate_single_turn

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return generate(*args, **kwargs)
        finally:
            rollout[trainer.state.global_step] += time.perf_counter() - start

    trainer._generate_single_turn = timed

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks.append(time.perf_counter())

    trainer.add_callback(Clock())
    trainer.train()
    seconds = (marks[-1] - marks[0]) / (len(marks) - 1)
    return {"seconds_per_step": seconds, "rollout_s_per_step": sum(rollout[1:steps]) / (steps - 1), "steps": len(marks)}


def profile_child(work: Path) -> None:
    """Print where one batch of TRL's regular path goes: cProfile of `generate`, grouped."""
    import cProfile
    import pstats

    trainer, prompts = build_trainer(work, "trl", 1)
    ids = [trainer.processing_class(text=p, add_special_tokens=False)["input_ids"] for p in prompts[:2]]
    batch = [row for row in ids for _ in range(GENERATIONS)]
    trainer.model.train()
    trainer._generate_single_turn(batch, None, {}, GENERATIONS)  # warm-up
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    completions, _ = trainer._generate_single_turn(batch, None, {}, GENERATIONS)
    profiler.disable()
    total = time.perf_counter() - start
    decode_steps = max(map(len, completions))
    stats = pstats.Stats(profiler)
    cumulative = {}
    for (path, _, name), (_, _, tottime, cumtime, _) in stats.stats.items():
        cumulative[(path.rsplit("site-packages/", 1)[-1], name)] = (cumtime, tottime)

    def cum(path_part, name):
        return sum(c for (p, n), (c, _) in cumulative.items() if path_part in p and n == name)

    model = cum("modeling_llama.py", "forward") and max(c for (p, n), (c, _) in cumulative.items()
                                                        if p.endswith("modeling_llama.py") and n == "forward")
    lora_all = cum("peft/tuners/lora/layer.py", "forward")
    linear = sum(t for (p, n), (_, t) in cumulative.items() if n == "<built-in method torch._C._nn.linear>")
    print(f"one batch of {len(batch)}: {total:.2f} s, {decode_steps} decode steps, {total / decode_steps:.3f} s per step")
    print(f"  model forward (LlamaForCausalLM, cumulative): {model:.2f} s ({model / total:.0%})")
    print(f"  lora.Linear.forward, 210 modules, cumulative: {lora_all:.2f} s ({lora_all / total:.0%})")
    print(f"  every F.linear (base + LoRA A/B + lm_head):   {linear:.2f} s ({linear / total:.0%})")
    print(f"  generate overhead (all but the model):        {total - model:.2f} s ({(total - model) / total:.0%})")
    stats.sort_stats("tottime").print_stats(12)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rollout-stacks", default=",".join(ROLLOUT_STACKS), help="of " + ",".join(ROLLOUT_STACKS))
    parser.add_argument("--step-stacks", default=",".join(STEP_STACKS), help="of trl,vitune; empty: skip (b)")
    parser.add_argument("--prompts", type=int, default=PROMPTS, help="prompts of (a), after a warm-up batch")
    parser.add_argument("--steps", type=int, default=STEPS, help="optimizer steps of (b), the first a warm-up")
    parser.add_argument("--threads", type=int, help="torch threads of every child (default: torch's own)")
    parser.add_argument("--profile", action="store_true", help="print the profile of TRL's path and stop")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds before a child is killed")
    parser.add_argument("--work", type=Path, help="working folder (default: a new temporary one)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--child", choices=("rollout", "step", "profile"), help=argparse.SUPPRESS)
    parser.add_argument("--stack", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    from vitune.cli import quiet_libraries

    quiet_libraries()
    if args.child:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        if args.child == "profile":
            return profile_child(args.work)
        result = (rollout_child(args.work, args.stack, args.prompts) if args.child == "rollout"
                  else step_child(args.work, args.stack, args.steps))
        (args.work / f"result-{args.child}-{args.stack}.json").write_text(json.dumps(result))
        return None
    work = args.work or Path(tempfile.mkdtemp(prefix="vitune-rl-rollouts-"))
    work.mkdir(parents=True, exist_ok=True)
    prepare(work)
    passthrough = ["--work", str(work), "--prompts", str(args.prompts), "--steps", str(args.steps),
                   *(["--threads", str(args.threads)] if args.threads else [])]
    info = environment()
    if args.threads:
        info["threads"] = args.threads
    print(environment_line(info))
    print(f"model: {PRESET}, fp32 (TRL: bf16=False), LoRA r 16 alpha 32 all-linear; (a) {args.prompts} prompts x "
          f"{GENERATIONS} generations, (b) {args.steps} steps, batches of {BATCH}, max {MAX_NEW} new tokens, temperature 1.0, beta {BETA}\n", flush=True)
    if args.profile:
        rc, _ = run_child(Path(__file__), ["--child", "profile", *passthrough], work / "log-profile.txt",
                          args.timeout, ROOT)
        print((work / "log-profile.txt").read_text())
        return rc
    results = {"rollout": {}, "step": {}}
    jobs = [("rollout", s) for s in filter(None, args.rollout_stacks.split(","))]
    jobs += [("step", s) for s in filter(None, args.step_stacks.split(","))]
    for kind, stack in jobs:
        log = work / f"log-{kind}-{stack}.txt"
        rc, rss = run_child(Path(__file__), ["--child", kind, "--stack", stack, *passthrough], log, args.timeout, ROOT)
        result_file = work / f"result-{kind}-{stack}.json"
        if rc != 0 or not result_file.exists():
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
            print(f"{kind} {stack} FAILED (exit {rc}); log {log}:\n{tail}\n", flush=True)
            continue
        r = results[kind][stack] = {**json.loads(result_file.read_text()), "peak_rss_gib": rss}
        if kind == "rollout":
            print(f"rollout {stack:16s} {r['tokens_per_s']:6.1f} generated tokens/s ({r['tokens']} tokens in "
                  f"{r['seconds']:.1f} s, {r['completions']} completions, mean length {r['mean_length']:.1f})", flush=True)
        else:
            print(f"step    {stack:16s} {r['seconds_per_step']:6.2f} s per step, of which rollout "
                  f"{r['rollout_s_per_step']:.2f} s (steps 2..{r['steps']})", flush=True)
    ratios = {}
    base = results["rollout"].get("trl")
    for stack, r in results["rollout"].items():
        if base and stack != "trl":
            ratios[f"rollout tokens/s {stack} / trl"] = r["tokens_per_s"] / base["tokens_per_s"]
    trl, vit = results["step"].get("trl"), results["step"].get("vitune")
    if trl and vit:
        ratios["seconds per step trl / vitune"] = trl["seconds_per_step"] / vit["seconds_per_step"]
        ratios["rest of the step (no rollout) trl / vitune"] = ((trl["seconds_per_step"] - trl["rollout_s_per_step"])
                                                               / (vit["seconds_per_step"] - vit["rollout_s_per_step"]))
    print()
    for name, value in ratios.items():
        print(f"{name:45s} {value:5.2f}x")
    if args.out:
        args.out.write_text(json.dumps({"info": info, "results": results, "ratios": ratios}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
