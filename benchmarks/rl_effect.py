"""What an RL run changed, on held-out prompts: the mean reward of the model before (a model folder)
and after (the run folder), each prompt's completions sampled from the same seeds, with standard
errors, the paired difference, and a few answers side by side.

    python benchmarks/rl_effect.py --before runs/smollm2-135m-instruct --after runs/ppo \
        --data data/qa_vi_eval.jsonl --reward examples.rewards:vietnamese --samples 2 --show 4

Prompts are rendered as `vitune chat` and the rl stage render them (the run's chat template, up
to the assistant's generation prompt); completions come from the rl stage's rollout engine
(vitune.train.rollouts) at the given temperature, at most --max-new-tokens, stopping at the end of
turn. The reward function is called as the rl stage calls it: (last user message, answer without
its end-of-turn marker). Prints one JSON object (and --json-out writes it).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def held_out_prompts(path: str) -> list:
    """The data file's conversations, without the answers they end with."""
    from vitune.config import DataConfig
    from vitune.data.pipeline import DataReport, load_conversations
    from vitune.data.records import Conversation

    data = DataConfig(train=[{"path": path}], max_length=4096)
    convs, _ = load_conversations(data, 42, DataReport())
    convs.sort(key=lambda c: c.source)
    return [Conversation(c.messages[:-1] if c.messages[-1].role == "assistant" else c.messages, system=c.system,
                         source=c.source) for c in convs]


def answers(path: str, prompts: list, samples: int, seed: int, max_new_tokens: int, temperature: float) -> list[str]:
    """`samples` completions of every prompt by the model (or run folder) at `path`, from fixed seeds."""
    from vitune.infer.chat import load_chat_model
    from vitune.train.reward_functions import strip_end_of_turn
    from vitune.train.rollouts import row_seeds, sample_completions

    chat = load_chat_model(path)
    tokenizer = chat.tokenizer
    ids = [tokenizer(chat.template.prompt(p), add_special_tokens=False)["input_ids"] for p in prompts]
    rows = [i for i in ids for _ in range(samples)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else chat.stop_ids[0]
    out = []
    for start in range(0, len(rows), 16):
        chunk = rows[start:start + 16]
        seeds = row_seeds(seed, start, rows=len(chunk))
        out += sample_completions(chat.model, chunk, seeds, max_new_tokens=max_new_tokens, eos_ids=chat.stop_ids,
                                  pad_id=pad, temperature=temperature)
    texts = tokenizer.batch_decode(out, skip_special_tokens=True)
    return [strip_end_of_turn(t, chat.template.stop_strings).strip() for t in texts]


def mean_sem(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / max(n - 1, 1)
    return mean, math.sqrt(var / n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="the model the run started from (folder)")
    parser.add_argument("--after", required=True, help="the RL run folder")
    parser.add_argument("--data", default=str(ROOT / "data" / "qa_vi_eval.jsonl"))
    parser.add_argument("--reward", default="examples.rewards:vietnamese", help="module:function")
    parser.add_argument("--samples", type=int, default=2, help="completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--show", type=int, default=4, help="answers printed side by side")
    parser.add_argument("--json-out")
    args = parser.parse_args()

    import torch

    from vitune.train.reward_functions import import_reward_function

    torch.manual_seed(args.seed)
    reward = import_reward_function(args.reward, "--reward")
    prompts = held_out_prompts(args.data)
    questions = [p.messages[-1].text for p in prompts for _ in range(args.samples)]
    result = {"data": args.data, "prompts": len(prompts), "samples_per_prompt": args.samples, "reward": args.reward,
              "temperature": args.temperature, "max_new_tokens": args.max_new_tokens}
    texts = {}
    for side, path in (("before", args.before), ("after", args.after)):
        started = time.perf_counter()
        texts[side] = answers(path, prompts, args.samples, args.seed, args.max_new_tokens, args.temperature)
        scores = [float(reward(q, t)) for q, t in zip(questions, texts[side])]
        mean, sem = mean_sem(scores)
        result[side] = {"path": path, "mean_reward": round(mean, 4), "sem": round(sem, 4),
                        "seconds": round(time.perf_counter() - started, 1), "scores": scores}
    diff = [a - b for a, b in zip(result["after"]["scores"], result["before"]["scores"])]
    mean, sem = mean_sem(diff)
    result["difference"] = {"mean": round(mean, 4), "sem": round(sem, 4), "in_sems": round(mean / sem, 2) if sem else None}
    result["examples"] = [{"question": questions[i], "before": texts["before"][i], "after": texts["after"][i]}
                          for i in range(0, min(args.show * args.samples, len(questions)), args.samples)]
    for side in ("before", "after"):
        result[side].pop("scores")
    text = json.dumps(result, ensure_ascii=False, indent=2)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
