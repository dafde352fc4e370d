"""A Hugging Face tokenizer as llama.cpp's GGUF vocabulary.

llama.cpp tokenises with its own code, so the file must say everything `tokenizer.json` says in
llama.cpp's terms:
- byte-level BPE (Llama 3, Qwen2, SmolLM2, BLOOM, GPT-2 style): model "gpt2", the tokens, the
  merges, and the name of the pre-tokenizer regex llama.cpp should split text with — recognised
  here from the tokenizer's own pre-tokenizer, never guessed: a regex llama.cpp has no name for
  is refused, since a wrong split silently changes every token id;
- SentencePiece-style BPE with byte fallback (Llama 2, Mistral, Vistral, VinaLlama, Gemma 3): model
  "llama", the tokens, and scores that make llama.cpp's highest-score-first merging follow the
  BPE merge order (score = -rank of the merge that makes the token); whether a space is put
  before the text is read from the tokenizer (Llama 2 puts one, Gemma does not);
- token types: control for special tokens, user-defined for other added tokens, byte for
  `<0xNN>`, unknown, normal; rows the embedding has beyond the tokenizer are `[PAD{id}]`, unused.

Vocabularies extended by `vitune vocab extend` are ordinary BPE vocabularies with appended merges,
so they need nothing special here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from vitune.data.templates import TemplateRefused, resolve_template, stop_token_ids
from vitune.errors import ConfigError, UserError
from vitune.models.loading import load_tokenizer

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# The split regexes of byte-level BPE tokenizers that llama.cpp knows, by llama.cpp's name.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
BLOOM_SPLIT = r" ?[^(\s|[.,!?…。，、।۔،])]+"
KNOWN_SPLITS = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2", BLOOM_SPLIT: "bloom"}


@dataclass
class GGUFVocab:
    model: str                       # "gpt2" (byte-level BPE) or "llama" (SentencePiece-style)
    pre: str | None
    tokens: list[str]
    types: list[int]
    merges: list[str] | None = None
    scores: list[float] | None = None
    special: dict[str, int] = field(default_factory=dict)   # bos / eos / eot / unk / pad -> id
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_template: str | None = None


def gguf_vocab(folder: Path, rows: int) -> GGUFVocab:
    """The tokenizer of the model folder `folder` for an embedding of `rows` rows."""
    tokenizer = load_tokenizer(str(folder))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError(f"{folder}: GGUF export needs a fast tokenizer (tokenizer.json); this one is "
                        f"{type(tokenizer).__name__}")
    spec = json.loads(backend.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise UserError(f"{folder}: tokenizer.json has a {model.get('type')} model; GGUF export writes BPE "
                        "tokenizers (byte-level like Llama 3 / Qwen2, or SentencePiece-style like Llama 2)")
    ids = {**model["vocab"], **{t["content"]: t["id"] for t in spec.get("added_tokens", [])}}
    if max(ids.values()) >= rows:
        raise UserError(f"{folder}: the tokenizer has ids up to {max(ids.values())} but the embedding has {rows} rows; "
                        "grow the embedding (`vitune vocab extend` does) before exporting")
    by_id = {i: t for t, i in ids.items()}
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    spm = bool(model.get("byte_fallback"))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    tokens, types = [], []
    for i in range(rows):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        tokens.append(token)
        types.append(_token_type(token, added.get(i), spm, model.get("unk_token")))

    vocab = GGUFVocab(model="llama" if spm else "gpt2", pre=None if spm else pre_tokenizer_name(spec, folder),
                      tokens=tokens, types=types)
    if spm:
        vocab.scores = merge_scores(tokens, merges)
        vocab.add_space_prefix = _prepends_space(spec)
    else:
        vocab.merges = merges
    vocab.special, vocab.add_bos, vocab.add_eos = special_ids(tokenizer)
    vocab.chat_template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    return vocab


def _token_type(token: str, added: dict | None, spm: bool, unk: str | None) -> int:
    if token == unk:
        return UNKNOWN
    if added is not None:
        return CONTROL if added.get("special") else USER_DEFINED
    if spm and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        return BYTE
    return NORMAL


def merge_scores(tokens: list[str], merges: list[str]) -> list[float]:
    """SentencePiece-style scores: llama.cpp merges the adjacent pair whose result scores highest,
    BPE the pair whose merge ranks first; -rank makes the two agree. Tokens no merge makes
    (single characters, bytes, specials) score 0: they are never a merge's result."""
    rank = {}
    for r, merge in enumerate(merges):
        left, right = merge.split(" ", 1)
        rank.setdefault(left + right, r)
    return [-float(rank[t]) if t in rank else 0.0 for t in tokens]


def pre_tokenizer_name(spec: dict, folder: Path) -> str:
    """llama.cpp's name for the way this byte-level BPE tokenizer splits text before merging."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # digits one by one, then GPT-2's regex (SmolLM, SmolLM2)
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        name = KNOWN_SPLITS.get((steps[0].get("pattern") or {}).get("Regex"))
        if name:
            return name
    raise UserError(f"{folder}: its tokenizer splits text with a pre-tokenizer llama.cpp has no name for "
                    f"({json.dumps(pre)[:120]}); GGUF export knows GPT-2, SmolLM, Llama-3, Qwen2 and BLOOM's")


def _prepends_space(spec: dict) -> bool:
    """Whether the SentencePiece-style tokenizer puts "▁" before the text (Llama 2 does)."""
    text = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")])
    return '"Prepend"' in text or ('"Metaspace"' in text and '"prepend_scheme": "never"' not in text)


def special_ids(tokenizer) -> tuple[dict[str, int], bool, bool]:
    """bos / eos / unk / pad ids, and eot: the first token (other than EOS) that ends a turn in the
    chat template, so llama.cpp stops at <|eot_id|> / <|im_end|> and not only at EOS. Also whether
    the tokenizer adds BOS / EOS itself."""
    special = {}
    for key, value in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                       ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)):
        if value is not None:
            special[key] = int(value)
    try:
        stops = stop_token_ids(tokenizer, resolve_template("auto", tokenizer))
    except (ConfigError, TemplateRefused, UserError):
        stops = []  # no chat template (a base model after pt): EOS alone ends the text
    ends = [i for i in stops if i != tokenizer.eos_token_id]
    if ends:
        special["eot"] = int(ends[0])
    sample = tokenizer("a", add_special_tokens=True)["input_ids"]
    add_bos = tokenizer.bos_token_id is not None and bool(sample) and sample[0] == tokenizer.bos_token_id
    add_eos = tokenizer.eos_token_id is not None and len(sample) > 1 and sample[-1] == tokenizer.eos_token_id
    return special, add_bos, add_eos
