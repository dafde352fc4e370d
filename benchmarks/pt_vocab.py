"""Continued pretraining of SmolLM2-135M-Instruct on the bundled Vietnamese corpus with its original
vocabulary and with a Vietnamese one (`vitune vocab extend`), side by side: held-out bits per
character (tokenizer-independent) before and after, time, tokens/s and characters/s of each.

Both runs are `vitune train` in their own process, one after the other, with the same settings
(examples/pt.yaml and examples/pt_vocab.yaml: LoRA r 16, 40 steps of 2 bins of 1,024 tokens; the
extended one also trains its new embedding rows, `method.lora.train_tokens: new`). Equal steps of
equal bins cost about the same compute, so they are run for the same number of steps and their
times printed; the extended model reads ~2.9x more text in those steps.

    vitune init-model --preset smollm2-135m-instruct --out runs/smollm2-135m-instruct
    vitune vocab extend runs/smollm2-135m-instruct --corpus data/corpus_vi.jsonl --new-tokens 2800 \
        --held-out data/corpus_vi_eval.jsonl --pad-to-multiple-of 64 --out runs/smollm2-vi
    python benchmarks/pt_vocab.py                  # both runs (about 40 minutes on 2 CPU cores)
    python benchmarks/pt_vocab.py --read           # only print the table of runs/pt and runs/pt_vocab
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
RUNS = {"original vocabulary": ("examples/pt.yaml", "runs/pt"),
        "extended vocabulary": ("examples/pt_vocab.yaml", "runs/pt_vocab")}


def characters_per_token(run: Path) -> float:
    """Characters of the training text over its tokens, from the run's own data."""
    report = json.loads((run / "data_report.json").read_text())
    config = run / "config.yaml"
    import yaml

    data = yaml.safe_load(config.read_text())["data"]
    characters = 0
    for spec in data["train"]:
        with open(ROOT / spec["path"], encoding="utf-8") as fh:
            characters += sum(len(json.loads(line)["text"]) for line in fh if line.strip())
    return characters / report["total_tokens"]


def row(name: str, run: Path) -> str:
    summary = json.loads((run / "summary.json").read_text())
    chars = characters_per_token(run)
    return (f"| {name} | {summary['eval_bits_per_char_start']:.4f} | **{summary['eval_bits_per_char_end']:.4f}** | "
            f"{summary['steps']} | {summary['seconds']:,.0f} | {summary['real_tokens']:,} | {summary['tokens_per_s']:.1f} | "
            f"{chars:.2f} | {summary['tokens_per_s'] * chars:,.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--read", action="store_true", help="print the table of finished runs, train nothing")
    args = parser.parse_args()
    from common import environment, environment_line

    if not args.read:
        for name, (config, _) in RUNS.items():
            print(f"{name}: vitune train {config}", flush=True)
            subprocess.run([sys.executable, "-m", "vitune", "train", config], cwd=ROOT, check=True)
    print(environment_line(environment()))
    print("| vocabulary | held-out bits/char start | end | steps | seconds | tokens trained | tokens/s | "
          "characters/token | characters/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (_, run) in RUNS.items():
        print(row(name, ROOT / run))


if __name__ == "__main__":
    main()
