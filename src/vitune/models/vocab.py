"""Vocabulary extension: learn new BPE tokens from a Vietnamese corpus and add them to a
model's tokenizer as real vocabulary entries with their merges, then grow its embeddings.

The story: `read_corpus` (files -> NFC documents) -> `learn_extension` (documents -> new
tokens and merges on top of the old ones) -> `extend_tokenizer_json` (tokenizer.json with
the merges appended) -> `grow_embeddings` (new rows = mean of the rows that spelled them) ->
`extend_vocabulary` writes the model folder and vocab_report.json, atomically.

Why appended merges and not "added tokens": added tokens are matched before pre-tokenisation,
so "không" added that way would also split "khôngian" and change neighbouring words. Merges
appended after the existing ones keep their priority: every old merge applies first, so a word
whose old tokens hold no new merge pair tokenises exactly as before.

Two kinds of BPE tokenizer are handled: SentencePiece-style (`▁` for spaces, byte fallback:
Llama-2, Mistral) and byte-level (Ġ-alphabet: Llama-3, Qwen2, SmolLM2).
"""

from __future__ import annotations

import heapq
import json
import os
import re
import shutil
import tempfile
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from vitune.data.normalize import normalize_text
from vitune.data.sources import read_rows
from vitune.errors import ConfigError, DataError, UserError
from vitune.models.loading import load_pretrained, load_tokenizer
from vitune.models.permissions import umask_modes

MAX_VOCAB = 2**31 - 1  # token ids are int32 in tokenizers' output, ONNX and many kernels
SUPPORTED = ("BPE tokenizers in tokenizer.json: SentencePiece-style with '▁' (Llama-2, Mistral) "
             "or byte-level (Llama-3, Qwen2, SmolLM2)")
TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".csv", ".parquet")
# rows without a `text` column: the strings under these keys (Alpaca, ShareGPT, preference rows)
ROW_TEXT_KEYS = ("instruction", "input", "output", "prompt", "chosen", "rejected", "value", "content")
SPIECE = "▁"
BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
# tokenizer files copied beside the new tokenizer.json; the weights are written anew
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")


# ---------------------------------------------------------------- corpus

def read_corpus(paths: list[str]) -> tuple[list[str], int]:
    """NFC-normalised documents of corpus files, and their size in UTF-8 bytes.

    `.txt`: documents separated by a blank line. `.jsonl`/`.json`/`.csv`/`.parquet`: a `text`
    column, or else the strings of the usual instruction/conversation/preference keys."""
    docs: list[str] = []
    for path in paths:
        file = Path(path)
        if not file.is_file():
            raise DataError(f"corpus file not found: {path}")
        if file.suffix not in TEXT_SUFFIXES:
            raise DataError(f"{path}: a corpus file must be one of {', '.join(TEXT_SUFFIXES)}")
        if file.suffix != ".parquet":
            _check_utf8(file)
        if file.suffix == ".txt":
            text = file.read_text(encoding="utf-8-sig").replace("\r\n", "\n")
            found = [d.strip() for d in re.split(r"\n\s*\n", text) if d.strip()]
        else:
            found = []
            for raw in read_rows(str(file)):
                if raw.row is None:
                    raise DataError(f"{raw.source}: {raw.problem[1]}")
                found += [t for t in _row_texts(raw.row) if t.strip()]
        if not found:
            raise DataError(f"{path}: no text found (expected documents separated by blank lines in .txt, "
                            "or a `text` column)")
        docs += [normalize_text(d) for d in found]
    return docs, sum(len(d.encode("utf-8")) for d in docs)


def _check_utf8(file: Path) -> None:
    data = file.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{file}: not UTF-8 text at byte {exc.start} (of {len(data)}); "
                        "give a UTF-8 text corpus (.txt, .jsonl, .json, .csv, .parquet)") from None


def _row_texts(row: dict) -> list[str]:
    if isinstance(row.get("text"), str):
        return [row["text"]]
    texts: list[str] = []

    def walk(value, key=None):
        if isinstance(value, str) and key in ROW_TEXT_KEYS:
            texts.append(value)
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, k)
        elif isinstance(value, list):
            for v in value:
                walk(v, key)

    walk(row)
    return texts


def count_syllables(text: str) -> int:
    """Space-separated words holding a letter: Vietnamese writes one syllable per word."""
    return sum(any(c.isalpha() for c in word) for word in text.split())


# ---------------------------------------------------------------- the tokenizer's kind

def tokenizer_kind(spec: dict) -> str:
    """'sentencepiece' or 'byte-level' for a tokenizer.json; refuses anything else."""
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise ConfigError(f"the tokenizer is {model.get('type', 'unknown')}, which vocab extension does not handle; "
                          f"supported: {SUPPORTED}")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise ConfigError("the tokenizer is a BPE with a subword prefix or end-of-word suffix; "
                          f"supported: {SUPPORTED}")
    text = json.dumps([spec.get("pre_tokenizer"), spec.get("normalizer")])
    if '"ByteLevel"' in text:
        return "byte-level"
    if '"Metaspace"' in text or SPIECE in text:
        return "sentencepiece"
    raise ConfigError("the tokenizer is a BPE with neither byte-level nor SentencePiece ('▁') pre-tokenisation; "
                      f"supported: {SUPPORTED}")


# ---------------------------------------------------------------- learning

@dataclass
class NewToken:
    content: str  # as in tokenizer.json's vocab (byte-level alphabet for byte-level BPE)
    id: int
    spelling: tuple[int, ...]  # the old token ids it replaces
    text: str  # readable


@dataclass
class Extension:
    kind: str
    new_tokens: list[NewToken]
    merges: list[tuple[str, str]] = field(default_factory=list)  # appended after the old ones
    could_supply: int = 0  # how many new tokens the corpus gave at most (when asked for more)


def learn_extension(spec: dict, docs: list[str], n: int, min_frequency: int = 2) -> Extension:
    """Up to `n` new tokens (and their merges) for the tokenizer `spec` from `docs`.

    tokenizers' BpeTrainer cannot do this: it trains from characters and cannot continue from
    an existing merge list, so its tokens would be built from pieces the old merges never
    produce. This greedy learner starts from each word's old tokens and repeatedly merges the
    most frequent adjacent pair, so every new merge is consistent with the old ones."""
    from tokenizers import Tokenizer

    kind = tokenizer_kind(spec)
    old = Tokenizer.from_str(json.dumps(spec))
    vocab = spec["model"]["vocab"]
    specials = {t["content"] for t in spec.get("added_tokens", [])}
    next_id = 1 + max([*vocab.values(), *(t["id"] for t in spec.get("added_tokens", []))])
    words, spelling = _words(old, docs, kind)
    ext = Extension(kind, [])

    def add(content: str) -> None:
        ext.new_tokens.append(NewToken(content, next_id + len(ext.new_tokens), spelling[content], _readable(content, kind)))

    # SentencePiece-style: a letter missing from the vocab is spelled in byte-fallback tokens,
    # which no merge may join (the merged string would be "<0xE1><0xBB>", not a letter);
    # the letter itself becomes a token first, most frequent first.
    if kind == "sentencepiece":
        letters = Counter()
        for symbols, freq in words.items():
            for s in symbols:
                if s not in vocab and len(s) == 1:
                    letters[s] += freq
        for letter, freq in sorted(letters.items(), key=lambda kv: (-kv[1], kv[0])):
            if len(ext.new_tokens) < n and freq >= min_frequency and unicodedata.category(letter)[0] in "LM":
                add(letter)
    known = set(vocab) | {t.content for t in ext.new_tokens}
    # SentencePiece-style pre-tokenisation keeps "(x" or "1." in one word; only letters merge,
    # so numbers, punctuation and code keep their tokens (byte-level pre-tokens split them already)
    frozen = {s for symbols in words for s in symbols
              if s not in known or (kind == "sentencepiece" and not _letters_only(s))}
    ext.merges = _greedy_merges(words, n, min_frequency, frozen, vocab, specials, spelling, add, ext)
    return ext


def _words(old, docs: list[str], kind: str) -> tuple[Counter, dict[str, tuple[int, ...]]]:
    """Each word of the corpus as its old tokens (a tuple of symbols), with its frequency, and
    the old ids spelling each symbol.

    Words are the tokenizer's own pre-tokens (for SentencePiece-style, whose pre-tokenizer
    keeps the text whole, runs of tokens starting at a '▁'), so no merge crosses a word.
    Byte-fallback tokens of one character are grouped back into that character."""
    words: Counter = Counter()
    spelling: dict[str, tuple[int, ...]] = {}
    for enc in old.encode_batch(docs, add_special_tokens=False):
        doc_words: list[list[str]] = []
        current: list[str] = []
        pending: list[int] = []  # a run of byte-fallback ids
        last = None
        for tok, tid, wid in zip(enc.tokens, enc.ids, enc.word_ids):
            if wid is None:  # an added (special) token
                continue
            if wid != last or (kind == "sentencepiece" and tok.startswith(SPIECE)):
                current += _letters(pending, old, spelling)
                pending = []
                if current:
                    doc_words.append(current)
                current = []
            last = wid
            if kind == "sentencepiece" and BYTE_TOKEN.match(tok):
                pending.append(tid)
                continue
            current += _letters(pending, old, spelling)
            pending = []
            current.append(tok)
            spelling.setdefault(tok, (tid,))
        current += _letters(pending, old, spelling)
        if current:
            doc_words.append(current)
        for w in doc_words:
            words[tuple(w)] += 1
    # only words with a letter: numbers, punctuation and code layout keep their tokens
    kept = Counter({w: f for w, f in words.items() if any(c.isalpha() for c in _readable("".join(w), kind))})
    return kept, spelling


def _letters_only(symbol: str) -> bool:
    text = symbol[1:] if symbol.startswith(SPIECE) else symbol
    return all(unicodedata.category(c)[0] in "LM" for c in text)


def _letters(ids: list[int], old, spelling: dict) -> list[str]:
    """A run of byte-fallback tokens -> one symbol per character (stray bytes stay byte tokens)."""
    if not ids:
        return []
    try:
        chars = bytes(int(old.id_to_token(i)[3:5], 16) for i in ids).decode("utf-8")
    except UnicodeDecodeError:
        for i in ids:
            spelling.setdefault(old.id_to_token(i), (i,))
        return [old.id_to_token(i) for i in ids]
    out, at = [], 0
    for ch in chars:
        width = len(ch.encode("utf-8"))
        spelling.setdefault(ch, tuple(ids[at:at + width]))
        out.append(ch)
        at += width
    return out


def _greedy_merges(words: Counter, n: int, min_frequency: int, frozen: set, vocab: dict, specials: set,
                   spelling: dict, add, ext: Extension) -> list[tuple[str, str]]:
    """BPE training from the given segmentation, with incremental pair counts, until `n` new
    tokens exist or no pair is seen `min_frequency` times. A merge whose result is already a
    token (old or new) is kept too: it shortens text at no cost in vocabulary."""
    seqs = [list(w) for w in words]
    freqs = list(words.values())
    counts: Counter = Counter()
    where: dict[tuple[str, str], set[int]] = {}

    def pairs(seq):
        return [p for p in zip(seq, seq[1:]) if p[0] not in frozen and p[1] not in frozen]

    for i, seq in enumerate(seqs):
        for pair in pairs(seq):
            counts[pair] += freqs[i]
            where.setdefault(pair, set()).add(i)
    # ties: the pair that sorts first, so the result does not depend on the corpus order
    heap = [(-c, p) for p, c in counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    new = {t.content for t in ext.new_tokens}
    while len(ext.new_tokens) < n and heap:
        negative, pair = heapq.heappop(heap)
        if counts.get(pair, 0) != -negative:
            continue  # stale entry
        if -negative < min_frequency:
            break
        merged = pair[0] + pair[1]
        if merged in specials:  # a special token's text is never built by a merge
            counts.pop(pair)
            continue
        spelling.setdefault(merged, spelling[pair[0]] + spelling[pair[1]])
        if merged not in vocab and merged not in new:
            add(merged)
            new.add(merged)
        merges.append(pair)
        changed: Counter = Counter()
        for i in where.pop(pair, ()):
            seq = seqs[i]
            for p in pairs(seq):
                changed[p] -= freqs[i]
            seq[:] = _merge(seq, pair, merged)
            for p in pairs(seq):
                changed[p] += freqs[i]
                where.setdefault(p, set()).add(i)
        counts.pop(pair, None)
        for p, delta in changed.items():
            if delta and p != pair:
                counts[p] += delta
                heapq.heappush(heap, (-counts[p], p))
    ext.could_supply = len(ext.new_tokens)
    return merges


def _merge(seq: list[str], pair: tuple[str, str], merged: str) -> list[str]:
    out, i = [], 0
    while i < len(seq):
        if i + 1 < len(seq) and seq[i] == pair[0] and seq[i + 1] == pair[1]:
            out.append(merged)
            i += 2
        else:
            out.append(seq[i])
            i += 1
    return out


def _readable(content: str, kind: str) -> str:
    if kind == "sentencepiece":
        return content.replace(SPIECE, " ")
    from tokenizers import decoders

    return decoders.ByteLevel().decode([content])


# ---------------------------------------------------------------- tokenizer.json and weights

def extend_tokenizer_json(spec: dict, ext: Extension) -> dict:
    """A copy of tokenizer.json with the new tokens in the vocab and their merges appended."""
    new = json.loads(json.dumps(spec))
    model = new["model"]
    # tokenizers numbers an added token missing from the model's vocab as vocab size + k, not
    # by its "id": with the vocab grown that would land on a new token, so it is pinned here
    # (added tokens are matched before the model runs, so this changes no tokenisation)
    for added in new.get("added_tokens", []):
        if added["content"] not in model["vocab"]:
            model["vocab"][added["content"]] = added["id"]
    for token in ext.new_tokens:
        model["vocab"][token.content] = token.id
    old = [m if isinstance(m, list) else m.split(" ", 1) for m in model["merges"]]
    model["merges"] = old + [list(pair) for pair in ext.merges]
    return new


def grow_embeddings(model, ext: Extension, pad_to_multiple_of: int | None) -> tuple[int, int]:
    """Resize the input and output embeddings (tied or not) for the new ids; each new row is the
    mean of the rows of the old tokens that spelled it, input and output separately, and rows
    added only as padding are the mean of all old rows. Returns (rows before, rows after)."""
    import torch

    old_in = model.get_input_embeddings().weight.detach().clone()
    out_layer = model.get_output_embeddings()
    tied = out_layer is None or out_layer.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    old_out = None if tied else out_layer.weight.detach().clone()
    before = old_in.shape[0]
    needed = max(before, 1 + max((t.id for t in ext.new_tokens), default=-1))
    model.resize_token_embeddings(needed, pad_to_multiple_of=pad_to_multiple_of, mean_resizing=False)
    after = model.get_input_embeddings().weight.shape[0]

    def fill(weight, old):
        mean = old.float().mean(0).to(old.dtype)
        with torch.no_grad():
            weight[before:] = mean
            for token in ext.new_tokens:
                weight[token.id] = old[list(token.spelling)].float().mean(0).to(old.dtype)

    fill(model.get_input_embeddings().weight, old_in)
    if old_out is not None:
        fill(model.get_output_embeddings().weight, old_out)
    return before, after


# ---------------------------------------------------------------- the whole command

def _source_spec(model: str) -> tuple[Path, dict, bool]:
    """(folder, tokenizer.json as a dict, whether the folder holds weights)."""
    folder = Path(os.path.expanduser(model))
    if not folder.is_dir():
        raise UserError(f"model folder not found: {model} (give a model folder, or a folder with a tokenizer.json)")
    file = folder / "tokenizer.json"
    if file.is_file():
        try:
            spec = json.loads(file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"{file}: not a valid tokenizer.json ({exc}); restore it from the original model") from None
    else:
        spec = json.loads(load_tokenizer(model).backend_tokenizer.to_str())
    weights = (folder / "config.json").is_file() and any(folder.glob("*.safetensors")) | any(folder.glob("*.bin"))
    return folder, spec, weights


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} already exists and is not empty; choose a new folder")
    blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise UserError(f"--out {out}: {blocker} is a file, not a folder; choose another --out")


def held_out_counts(spec: dict, texts: list[str]) -> tuple[int, int]:
    """(tokens, syllables) of held-out texts under a tokenizer.json."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(json.dumps(spec))
    tokens = sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))
    return tokens, sum(count_syllables(t) for t in texts)


def extend_vocabulary(model: str, corpus: list[str], new_tokens: int, out: str | Path, held_out: str | None = None,
                      pad_to_multiple_of: int | None = None, min_frequency: int = 2, at_most: bool = False) -> dict:
    """Learn `new_tokens` tokens from `corpus`, write the extended model (or tokenizer) folder to
    `out` and its vocab_report.json; returns the report. With `at_most`, fewer tokens than asked
    are fine (the benchmark); otherwise a corpus that cannot supply them is refused."""
    out = Path(out)
    if new_tokens < 1:
        raise UserError(f"--new-tokens {new_tokens}: give a number of tokens of at least 1")
    if min_frequency < 1:
        raise UserError(f"--min-frequency {min_frequency}: give a count of at least 1")
    if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
        raise UserError(f"--pad-to-multiple-of {pad_to_multiple_of}: give a positive number of rows")
    _check_out(out)
    folder, spec, has_weights = _source_spec(model)
    kind = tokenizer_kind(spec)
    size = 1 + max([*spec["model"]["vocab"].values(), *(t["id"] for t in spec.get("added_tokens", []))])
    if size + new_tokens > MAX_VOCAB:
        raise ConfigError(f"--new-tokens {new_tokens} would grow the vocabulary from {size} to {size + new_tokens} "
                          f"tokens, over the {MAX_VOCAB} ids an embedding index can hold; ask for fewer")
    docs, corpus_bytes = read_corpus(corpus)
    held = read_corpus([held_out])[0] if held_out else None
    ext = learn_extension(spec, docs, new_tokens, min_frequency)
    if len(ext.new_tokens) < new_tokens and not at_most:
        raise DataError(f"the corpus can supply only {len(ext.new_tokens)} new tokens seen at least {min_frequency} "
                        f"times, not {new_tokens}; ask for --new-tokens {len(ext.new_tokens)} or fewer, "
                        "lower --min-frequency, or give a larger corpus")
    new_spec = extend_tokenizer_json(spec, ext)
    report = {
        "model": str(model), "tokenizer_kind": kind,
        "corpus": {"files": [str(c) for c in corpus], "documents": len(docs), "bytes": corpus_bytes},
        "min_frequency": min_frequency, "new_tokens": len(ext.new_tokens), "merges_added": len(ext.merges),
        "vocab_size_before": size, "vocab_size_after": size + len(ext.new_tokens),
        "sample_new_tokens": [t.text for t in ext.new_tokens[:: max(1, len(ext.new_tokens) // 20)][:20]],
        "held_out": None, "embedding_rows": None, "left_out": [],
        # what method.lora.train_tokens: new trains (vitune.models.loading.new_token_ids)
        "new_token_ids": [t.id for t in ext.new_tokens],
    }
    if held is not None:
        (before, syllables), (after, _) = held_out_counts(spec, held), held_out_counts(new_spec, held)
        report["held_out"] = {
            "file": str(held_out), "documents": len(held), "syllables": syllables,
            "tokens_before": before, "tokens_after": after,
            "tokens_per_syllable_before": round(before / max(syllables, 1), 4),
            "tokens_per_syllable_after": round(after / max(syllables, 1), 4),
            "reduction_percent": round(100 * (before - after) / max(before, 1), 2),
        }
    if (folder / "tokenizer.model").is_file():
        # SentencePiece picks merges by piece score over any split, tokenizers by this merge
        # list: an extended .model could tokenise differently, so none is written.
        report["left_out"].append("tokenizer.model: the extended vocabulary is in tokenizer.json only; a SentencePiece "
                                  "model cannot be made to agree with the appended merges exactly")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        if has_weights:
            report["embedding_rows"] = _write_model(folder, partial, ext, pad_to_multiple_of)
        for name in TOKENIZER_FILES:
            if (folder / name).is_file() and not (partial / name).exists():
                shutil.copy2(folder / name, partial / name)
        from tokenizers import Tokenizer

        Tokenizer.from_str(json.dumps(new_spec)).save(str(partial / "tokenizer.json"))
        (partial / "vocab_report.json").write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        umask_modes(partial)  # mkdtemp's 0700 and safetensors' 0600 would keep other accounts out
        if out.exists():
            out.rmdir()  # empty, checked above
        os.rename(partial, out)  # nothing half-written ever sits at `out`
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return report


def _write_model(folder: Path, target: Path, ext: Extension, pad_to_multiple_of: int | None) -> dict:
    from transformers import AutoModelForCausalLM

    model = load_pretrained(AutoModelForCausalLM, str(folder), allow_pickle=False, dtype="auto")
    before, after = grow_embeddings(model, ext, pad_to_multiple_of)
    model.save_pretrained(target)
    tied = model.get_output_embeddings() is None or (
        model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr())
    return {"before": before, "after": after, "tied": tied, "pad_to_multiple_of": pad_to_multiple_of}
