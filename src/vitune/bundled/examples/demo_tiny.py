"""`make demo-tiny`: the whole path on the CPU in two minutes, on a tiny random model.

1. build a tiny random Llama-architecture model with a tokenizer trained on the bundled data;
2. fine-tune it with examples/tiny.yaml (loss at start and end is printed);
3. ask it questions from the training set and show the expected answer beside its own.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from vitune.cli import quiet_libraries, run_script
from vitune.config import load_config
from vitune.data.records import Message
from vitune.infer.chat import load_chat_model
from vitune.models.tiny import init_tiny_model
from vitune.train.runner import run_training

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    quiet_libraries()
    console = Console()
    config = load_config(ROOT / "examples" / "tiny.yaml")
    console.rule("1. a tiny model")
    folder = init_tiny_model("llama", config.model.name_or_path)
    console.print(f"random Llama-architecture model and BPE tokenizer written to {folder}")

    console.rule("2. fine-tune on the bundled Vietnamese data")
    result = run_training(config, console)
    s = result.summary
    console.print(f"[bold]loss at start {s['first_loss']:.3f} -> at end {s['final_loss']:.3f}[/] "
                  f"({s['steps']} steps, {s['seconds']:.0f} s, {s['tokens_per_s']:,.0f} tokens/s)")

    console.rule("3. ask it questions from the training set")
    bot = load_chat_model(str(result.output_dir))
    rows = [json.loads(line) for line in open(ROOT / "data" / "alpaca_vi.jsonl", encoding="utf-8")][:3]
    table = Table("question", "expected answer", "model's answer", "same?", show_lines=True)
    for row in rows:
        answer = bot.answer([Message("user", row["instruction"], input=row["input"] or None)], max_new_tokens=200)
        table.add_row(row["instruction"], row["output"], answer, "yes" if answer == row["output"].strip() else "no")
    console.print(table)
    console.print(f"chat yourself: .venv/bin/vitune chat {result.output_dir}")
    return 0


if __name__ == "__main__":
    run_script(main)
