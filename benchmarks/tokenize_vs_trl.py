"""Tokenising conversations: TRL's SFTTrainer preprocessing vs vitune, side by side.

Both tokenise the same N ShareGPT-style conversations (built deterministically from the
bundled data) with the same tokenizer and chat template, training only on assistant turns
(TRL: `assistant_only_loss=True`, which reads the template's {% generation %} markers).
Each side is timed from the JSON Lines file on disk to token ids and labels in memory
(vitune's time includes setting up its tiktoken engine from the tokenizer). The script prints
rows/s for both, the ratio, and checks that input ids and labels agree on a sample of rows.
vitune runs a second time with its tiktoken engine off (the `tokenizers` backend only), to
show what each part contributes.

    python benchmarks/tokenize_vs_trl.py --rows 20000
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_conversations(n: int, seed: int = 0) -> list[dict]:
    """N conversations of 1-4 exchanges, recombined from the bundled Vietnamese turns."""
    pairs = []
    for line in (ROOT / "data" / "sharegpt_vi.jsonl").read_text(encoding="utf-8").splitlines():
        turns = [t for t in json.loads(line)["conversations"] if t["from"] != "system"]
        pairs += [(turns[i]["value"], turns[i + 1]["value"]) for i in range(0, len(turns) - 1, 2)]
    for line in (ROOT / "data" / "alpaca_vi.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        pairs.append((row["instruction"] + (f"\n\n{row['input']}" if row["input"] else ""), row["output"]))
    rng = random.Random(seed)
    systems = ["Bạn là trợ lý AI hữu ích.", "Trả lời ngắn gọn bằng tiếng Việt.", None, None]
    out = []
    for _ in range(n):
        messages = []
        system = rng.choice(systems)
        if system:
            messages.append({"role": "system", "content": system})
        for q, a in rng.sample(pairs, rng.randint(1, 4)):
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        out.append({"messages": messages})
    return out


def run_trl(path: Path, tokenizer, max_length: int):
    import datasets
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    model = AutoModelForCausalLM.from_pretrained(TINY)
    started = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=str(path), split="train")
    args = SFTConfig(output_dir=tempfile.mkdtemp(), assistant_only_loss=True, max_length=max_length,
                     report_to=[], use_cpu=True, dataset_num_proc=None)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer)
    prepared = trainer.train_dataset
    ids = prepared["input_ids"]
    masks = [[int(label != -100) for label in row] for row in prepared["labels"]]
    seconds = time.perf_counter() - started
    return seconds, ids, masks


def run_vitune(path: Path, tokenizer, max_length: int, tiktoken: bool = True):
    """vitune from the file to rows; `tiktoken=False` switches its engine off (tokenizers only)."""
    from vitune.config import DataConfig
    from vitune.data import byte_bpe
    from vitune.data.pipeline import prepare_sft_data
    from vitune.data.templates import resolve_template

    tokenizer = copy.copy(tokenizer)  # no engine left set up by an earlier run
    tokenizer.__dict__.pop("_vitune_byte_bpe", None)
    if not tiktoken:
        byte_bpe.encoder_for(tokenizer)  # set up (not timed), then switched off
        byte_bpe.disable(tokenizer)
    started = time.perf_counter()
    cfg = DataConfig(train=[{"path": str(path), "format": "messages"}], max_length=max_length,
                     overflow="truncate", cache=False)
    rows, _, report = prepare_sft_data(cfg, tokenizer, resolve_template("auto", tokenizer), seed=0)
    seconds = time.perf_counter() - started
    return seconds, rows, report


def main() -> int:
    global TINY
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--max-length", type=int, default=4096)
    parser.add_argument("--sample", type=int, default=500, help="rows compared between the two")
    parser.add_argument("--tokenizer", default=None,
                        help="a tokenizer folder (e.g. a real Llama-3 vocab); default: vitune's tiny 4k BPE. "
                             "Both sides then use vitune's llama3 template, which carries {% generation %} markers")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from vitune.cli import quiet_libraries
    from vitune.models.tiny import init_tiny_model

    quiet_libraries()
    work = Path(tempfile.mkdtemp(prefix="vitune-bench-"))
    TINY = init_tiny_model("llama", work / "tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or TINY)
    if args.tokenizer:
        from vitune.data.templates import get_template

        tokenizer.chat_template = get_template("llama3").jinja()
    convs = make_conversations(args.rows)
    path = work / "conversations.jsonl"
    with open(path, "w", encoding="utf-8") as fh:
        for c in convs:
            fh.write(json.dumps(c, ensure_ascii=False) + "\n")

    trl_s, trl_ids, trl_masks = run_trl(path, tokenizer, args.max_length)
    vit_s, rows, report = run_vitune(path, tokenizer, args.max_length)
    hf_s, hf_rows, _ = run_vitune(path, tokenizer, args.max_length, tiktoken=False)
    from vitune.data.byte_bpe import build

    engine, why = build(tokenizer)

    # vitune shuffles rows by seed; match rows by their ids to compare the same conversations
    by_ids = {tuple(r.input_ids): r.labels for r in rows}
    compared = same_ids = same_labels = 0
    for ids, mask in list(zip(trl_ids, trl_masks))[: args.sample]:
        compared += 1
        labels = by_ids.get(tuple(ids))
        if labels is None:
            continue
        same_ids += 1
        trl_labels = [t if m else -100 for t, m in zip(ids, mask)]
        same_labels += labels == trl_labels

    import tokenizers
    import transformers
    import trl

    print(f"tokenizer: {args.tokenizer or 'vitune tiny 4k BPE'} ({len(tokenizer)} tokens)")
    print(f"rows: {args.rows}, tokens: {report.total_tokens:,}, max_length {args.max_length}, "
          f"cpu cores: {os.cpu_count()}")
    print(f"versions: transformers {transformers.__version__}, trl {trl.__version__}, tokenizers {tokenizers.__version__}")
    print(f"TRL SFTTrainer preprocessing : {args.rows / trl_s:10.0f} rows/s ({trl_s:.1f} s)")
    print(f"vitune prepare_sft_data      : {args.rows / vit_s:10.0f} rows/s ({vit_s:.1f} s)")
    print(f"ratio vitune / TRL           : {trl_s / vit_s:10.1f}x   (vitune engine: "
          f"{'tiktoken' if engine else 'tokenizers, ' + why})")
    print(f"vitune, tokenizers only      : {args.rows / hf_s:10.0f} rows/s ({hf_s:.1f} s), "
          f"{trl_s / hf_s:.1f}x TRL, same rows as with tiktoken: {hf_rows == rows}")
    print(f"sample of {compared} rows: same input ids {same_ids}, same labels {same_labels}")
    return 0 if same_ids == compared and same_labels == compared and hf_rows == rows else 1


if __name__ == "__main__":
    sys.exit(main())
