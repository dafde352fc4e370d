"""`vitune vocab extend MODEL --corpus FILE --new-tokens N --out DIR`: Vietnamese tokens added
to a model's tokenizer as real vocabulary entries with their merges, embeddings grown to match."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape

from vitune.cli.app import app

vocab_app = typer.Typer(help="Extend a model's vocabulary with tokens learned from a corpus.", no_args_is_help=True)
app.add_typer(vocab_app, name="vocab")


@vocab_app.command(
    help=(
        "Learn N new BPE tokens (Vietnamese syllables and words) from a corpus, append them and their "
        "merges to the tokenizer (Llama-2/Mistral SentencePiece-style or Llama-3/Qwen2/SmolLM2 byte-level), "
        "resize the embeddings (new rows: mean of the rows of the tokens they replace) and write an "
        "ordinary model folder with vocab_report.json. A folder with only a tokenizer is extended alone.\n\n"
        "Example: vitune vocab extend runs/smollm2 --corpus data/corpus_vi.jsonl --new-tokens 2800 "
        "--held-out data/corpus_vi_eval.jsonl --out runs/smollm2-vi"
    )
)
def extend(
    model: str = typer.Argument(..., help="Model folder (or a folder holding only a tokenizer)", show_default=False),
    corpus: List[str] = typer.Option(..., "--corpus", help="Corpus file: .txt (documents separated by a blank line), "
                                     ".jsonl/.json/.csv/.parquet with a text column (repeatable)", show_default=False),
    new_tokens: int = typer.Option(..., "--new-tokens", help="How many tokens to add", show_default=False),
    out: Path = typer.Option(..., "--out", help="New folder to write (must not exist or be empty)", show_default=False),
    held_out: Optional[str] = typer.Option(None, "--held-out", help="Text to measure tokens per syllable on", show_default=False),
    pad_to_multiple_of: Optional[int] = typer.Option(None, "--pad-to-multiple-of", help="Round the embedding rows up to a multiple of this", show_default=False),
    min_frequency: int = typer.Option(2, "--min-frequency", help="A merge must be seen at least this many times"),
) -> None:
    from vitune.models.vocab import extend_vocabulary

    console = Console(highlight=False, soft_wrap=True)
    report = extend_vocabulary(model, corpus, new_tokens, out, held_out=held_out,
                               pad_to_multiple_of=pad_to_multiple_of, min_frequency=min_frequency)
    c = report["corpus"]
    console.print(f"learned {report['new_tokens']} new tokens ({report['merges_added']} merges) from "
                  f"{c['documents']} documents ({c['bytes']:,} bytes); vocabulary {report['vocab_size_before']} -> "
                  f"{report['vocab_size_after']}")
    rows = report["embedding_rows"]
    if rows:
        console.print(f"embeddings {rows['before']} -> {rows['after']} rows ({'tied' if rows['tied'] else 'untied'})")
    held = report["held_out"]
    if held:
        console.print(f"held-out {escape(held['file'])}: {held['tokens_per_syllable_before']:.2f} -> "
                      f"{held['tokens_per_syllable_after']:.2f} tokens per syllable ({held['tokens_before']} -> "
                      f"{held['tokens_after']} tokens, {held['reduction_percent']:.1f}% fewer)")
    console.print("sample: " + escape(" | ".join(report["sample_new_tokens"][:10])))
    for line in report["left_out"]:
        console.print(f"left out {escape(line)}")
    console.print(f"wrote {escape(str(out))} (see vocab_report.json)")
