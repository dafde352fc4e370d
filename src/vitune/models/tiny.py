"""Tiny random models of real architectures, for demos and tests.

`init_tiny_model(arch, out_dir)` writes an ordinary Hugging Face model folder: a randomly
initialised model of a few million parameters of the real architecture (Llama, Mistral,
Qwen2, BLOOM) and a byte-level BPE tokenizer trained on the bundled Vietnamese data, with
the special tokens and chat template of that family. Everything else in vitune loads it
through `from_pretrained`, exactly as it loads a downloaded model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from vitune import bundled
from vitune.data.templates import get_template
from vitune.errors import UserError
from vitune.models.permissions import umask_modes

# Every tiny tokenizer knows the special tokens of all built-in templates, so any template
# can be tried with any tiny model; each family picks its own BOS/EOS/PAD among them.
SPECIAL_TOKENS = [
    "<unk>", "<s>", "</s>", "<pad>",
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
]


@dataclass(frozen=True)
class TinyFamily:
    arch: str
    template: str
    bos: str | None
    eos: str
    pad: str
    # special tokens of this family only, after the shared ones: adding them to SPECIAL_TOKENS
    # would renumber every other tiny tokenizer, whose token ids the tests assert
    own_specials: tuple[str, ...] = ()


GEMMA_SPECIALS = ("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>")
TINY_FAMILIES = {
    "llama": TinyFamily("llama", "llama3", "<|begin_of_text|>", "<|eot_id|>", "<pad>"),
    "mistral": TinyFamily("mistral", "mistral", "<s>", "</s>", "<pad>"),
    "qwen2": TinyFamily("qwen2", "chatml", None, "<|im_end|>", "<|endoftext|>"),
    "gemma3": TinyFamily("gemma3", "gemma", "<bos>", "<eos>", "<pad>", own_specials=GEMMA_SPECIALS),
    "bloom": TinyFamily("bloom", "vietcuna", "<s>", "</s>", "<pad>"),
}


# The bundled files the tiny tokenizer learns from: a fixed list, so that adding a data file (the
# evaluation sets) does not change every tiny model's vocabulary, and the token counts tests assert.
TOKENIZER_CORPUS = ("alpaca_vi.jsonl", "corpus_vi.jsonl", "corpus_vi_eval.jsonl", "preference_vi.jsonl",
                    "preference_vi_eval.jsonl", "sharegpt_vi.jsonl")

def bundled_texts(data_dir: Path | None = None) -> list[str]:
    """Every string in the bundled JSONL datasets: the tiny tokenizer's training corpus."""
    data_dir = data_dir or bundled.data_dir()
    texts: list[str] = []

    def walk(value):
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    for file in (data_dir / name for name in TOKENIZER_CORPUS):
        for line in file.read_text(encoding="utf-8").splitlines():
            if line.strip():
                walk(json.loads(line))
    if not texts:
        raise UserError(f"no bundled data found in {data_dir} to train the tiny tokenizer")
    return texts


def train_tiny_tokenizer(family: TinyFamily, vocab_size: int = 4096):
    """A byte-level BPE tokenizer (like Llama 3's and Qwen2's) trained on the bundled data."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS + list(family.own_specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(bundled_texts(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=family.bos,
        eos_token=family.eos,
        pad_token=family.pad,
        unk_token="<unk>",
        additional_special_tokens=[t for t in SPECIAL_TOKENS + list(family.own_specials)
                                   if t not in {family.bos, family.eos, family.pad, "<unk>"}],
        model_max_length=2048,
    )
    tokenizer.chat_template = get_template(family.template).jinja()
    return tokenizer


# Gemma 3's pattern (five sliding-window layers, then a global one) shortened to four layers
GEMMA3_LAYERS = ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"]
GEMMA3_WINDOW = 32


def tiny_config(arch: str, tokenizer, sliding_window: int | None = None):
    from transformers import BloomConfig, Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config

    ids = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if arch == "bloom":
        return BloomConfig(hidden_size=256, n_layer=4, n_head=4, **ids)
    shape = dict(
        hidden_size=256,
        intermediate_size=704,  # a multiple of 32, as bitsandbytes' packed CPU 4-bit kernels need
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        **ids,
    )
    if arch == "llama":
        return LlamaConfig(rope_theta=500000.0, **shape)
    if arch == "mistral":
        return MistralConfig(sliding_window=sliding_window, **shape)
    if arch == "gemma3":
        shape.update(tie_word_embeddings=True, head_dim=64)
        return Gemma3TextConfig(sliding_window=sliding_window or GEMMA3_WINDOW, layer_types=GEMMA3_LAYERS,
                                query_pre_attn_scalar=64, **shape)
    return Qwen2Config(**shape)


WINDOWED = ("mistral", "gemma3")  # the tiny architectures that take a sliding window


def init_tiny_model(arch: str, out_dir: str | Path, seed: int = 0, sliding_window: int | None = None) -> Path:
    """Write a tiny random model of `arch` with its tokenizer to `out_dir`; returns the folder.
    `sliding_window` (Mistral, Gemma 3): how many tokens each sliding-window layer sees."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    if arch not in TINY_FAMILIES:
        raise UserError(f"--arch {arch!r} is not supported; choose one of {', '.join(TINY_FAMILIES)}")
    if sliding_window is not None and (arch not in WINDOWED or sliding_window < 1):
        raise UserError(f"--sliding-window {sliding_window}: " + (
            "give a number of tokens of at least 1" if arch in WINDOWED
            else f"{arch} has no sliding-window attention; use it with --arch {' or '.join(WINDOWED)}"))
    family = TINY_FAMILIES[arch]
    out = Path(out_dir)
    # refused before the tokenizer is trained (seconds), not after
    blocker = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise UserError(f"--out {out}: {blocker} is a file, not a folder; choose another --out")
    tokenizer = train_tiny_tokenizer(family)
    config = tiny_config(arch, tokenizer, sliding_window)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out, save_jinja_files=False)
    umask_modes(out)  # safetensors writes 0600 (models/permissions.py)
    return out
