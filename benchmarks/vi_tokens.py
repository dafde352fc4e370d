"""Tokens per Vietnamese syllable: NFC vs NFD, and old vs new tone-mark style.

Why `data.normalize` exists, in numbers. Uses the real vocab-only GGUF files of Llama 2
(llama-spm, 32k SentencePiece), Llama 3 (llama-bpe, 128k BPE) and Qwen2 (151k BPE) from
the llama-cpp-python 0.3.36 source distribution (see DESIGN.md); they are never
committed. Fetch them once:

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /tmp/lcp
    mkdir -p /tmp/vocab && tar -xzf /tmp/lcp/llama_cpp_python-0.3.36.tar.gz -C /tmp/vocab \\
        --strip-components=4 --wildcards '*/models/ggml-vocab-llama-spm.gguf' \\
        '*/models/ggml-vocab-llama-bpe.gguf' '*/models/ggml-vocab-qwen2.gguf'

Run (prints markdown tables; needs the `gguf` package; ~1 min on 2 CPU cores, most of it
loading the BPE vocabularies):

    PYTHONPATH=src python benchmarks/vi_tokens.py --vocab-dir /tmp/vocab
"""

from __future__ import annotations

import argparse
import json
import os
import unicodedata
from pathlib import Path

from tokenizers import normalizers
from transformers import AutoTokenizer

from vitune.data.normalize import normalize_text

ROOT = Path(__file__).resolve().parents[1]
VOCABS = {  # name in the table -> GGUF file
    "Llama-2 (llama-spm, 32k)": "ggml-vocab-llama-spm.gguf",
    "Llama-3 (llama-bpe, 128k)": "ggml-vocab-llama-bpe.gguf",
    "Qwen2 (qwen2, 151k)": "ggml-vocab-qwen2.gguf",
}
# Qwen2Tokenizer builds an NFC normalizer (so does the Hub tokenizer.json), but the
# tokenizer that transformers converts from the GGUF file has none; a second row puts it back.
RESTORE_NFC = {"Qwen2 (qwen2, 151k)"}
# old style, new style; counted mid-sentence (with a leading space), as they occur in text
WORDS = [("hòa", "hoà"), ("khỏe", "khoẻ"), ("thủy", "thuỷ"), ("hóa", "hoá")]


def alpaca_texts(path: Path) -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            texts += [row[k] for k in ("instruction", "input", "output") if row.get(k)]
    return texts


def passage(texts: list[str], syllables: int) -> str:
    """The first `syllables` syllables (space-separated words with a letter) of the answers."""
    words: list[str] = []
    found = 0
    for text in texts:
        for word in text.split():
            words.append(word)
            found += any(c.isalpha() for c in word)
            if found == syllables:
                return " ".join(words)
    raise SystemExit(f"the data has fewer than {syllables} syllables")


def count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab-dir", default=os.environ.get("VITUNE_VOCAB_DIR", "/tmp/vocab"))
    parser.add_argument("--data", default=str(ROOT / "data" / "alpaca_vi.jsonl"))
    parser.add_argument("--syllables", type=int, default=150)
    args = parser.parse_args()

    texts = alpaca_texts(Path(args.data))
    nfc = unicodedata.normalize("NFC", passage(texts, args.syllables))
    nfd = unicodedata.normalize("NFD", nfc)
    corpus_old = "\n".join(normalize_text(t, vi_tone="old") for t in texts)
    corpus_new = "\n".join(normalize_text(t, vi_tone="new") for t in texts)
    n = args.syllables

    passage_rows, word_rows = [], []
    for name, gguf in VOCABS.items():
        tok = AutoTokenizer.from_pretrained(args.vocab_dir, gguf_file=gguf)
        variants = [name] + ([name + " + NFC normalizer"] if name in RESTORE_NFC else [])
        for label in variants:
            if label != name:
                tok.backend_tokenizer.normalizer = normalizers.NFC()
            a, b = count(tok, nfc), count(tok, nfd)
            old, new = count(tok, corpus_old), count(tok, corpus_new)
            passage_rows.append(
                f"| {label} | {a / n:.2f} | {b / n:.2f} | {b / a:.2f}x | {old} | {new} | {100 * (new - old) / old:+.2f}% |"
            )
        word_rows.append(f"| {name} | " + " | ".join(f"{count(tok, ' ' + o)} / {count(tok, ' ' + w)}" for o, w in WORDS) + " |")

    print(f"Passage: the first {n} syllables of {Path(args.data).name} ({len(nfc)} characters NFC, {len(nfd)} NFD). "
          f"Corpus: all {len(texts)} texts of the file, in old vs new tone style.\n")
    print("| Tokenizer | tokens/syllable NFC | tokens/syllable NFD | NFD/NFC | corpus tokens old style | new style | new vs old |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(passage_rows))
    print("\nTokens per word, mid-sentence (leading space), old / new style:\n")
    print("| Tokenizer | " + " | ".join(f"{o} / {w}" for o, w in WORDS) + " |")
    print("|---|" + "---|" * len(WORDS))
    print("\n".join(word_rows))


if __name__ == "__main__":
    main()
