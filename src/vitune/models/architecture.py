"""The tensor shapes of a decoder-only model, read from its config.json alone.

`read_architecture(config)` gives every linear layer of a decoder layer (with grouped KV
heads and biases as each family has them), the norms, the embeddings and whether lm_head is
tied, so parameters can be counted exactly without weights. One small reader per family in
`ARCHITECTURES`; Vietnamese derivatives (Vistral, VinaLlama, ...) use their base family's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from vitune.errors import UserError
from vitune.models.loading import _check_model_path, _load_error, damaged_files


@dataclass(frozen=True)
class Linear:
    name: str
    in_features: int
    out_features: int
    bias: bool
    source: str  # which activation feeds it; linears with the same source share their input

    @property
    def params(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)


@dataclass(frozen=True)
class Architecture:
    """Tensor shapes of a decoder-only model, as its config.json describes them."""

    family: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    linears: tuple[Linear, ...]  # of one decoder layer
    layer_norm_params: int  # norms of one decoder layer
    outer_norm_params: int  # final norm (+ embedding norm for BLOOM)
    gated_mlp: bool
    sdpa: bool  # False: eager attention only (BLOOM's ALiBi), which stores seq x seq scores
    embed_name: str = "embed_tokens"
    qk_norm_dim: int = 0  # Gemma 3 / Qwen3: a norm over each head's query and key (head_dim weights each)

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def lm_head_params(self) -> int:
        return 0 if self.tied else self.vocab * self.hidden

    @property
    def layer_params(self) -> int:
        return sum(lin.params for lin in self.linears) + self.layer_norm_params

    @property
    def total_params(self) -> int:
        return self.embed_params + self.lm_head_params + self.layers * self.layer_params + self.outer_norm_params


def _get(cfg: dict, *keys: str, default: Any = None) -> Any:
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    if default is not None:
        return default
    raise UserError(f"the model's config.json has no {keys[0]!r}; cannot work out its shapes")


def _llama_like(cfg: dict, family: str, qkv_bias: bool, o_bias: bool, mlp_bias: bool) -> Architecture:
    h = _get(cfg, "hidden_size")
    heads = _get(cfg, "num_attention_heads")
    kv = _get(cfg, "num_key_value_heads", default=heads)
    hd = _get(cfg, "head_dim", default=h // heads)
    i = _get(cfg, "intermediate_size")
    linears = (
        Linear("q_proj", h, heads * hd, qkv_bias, "norm1"),
        Linear("k_proj", h, kv * hd, qkv_bias, "norm1"),
        Linear("v_proj", h, kv * hd, qkv_bias, "norm1"),
        Linear("o_proj", heads * hd, h, o_bias, "attention"),
        Linear("gate_proj", h, i, mlp_bias, "norm2"),
        Linear("up_proj", h, i, mlp_bias, "norm2"),
        Linear("down_proj", i, h, mlp_bias, "mlp"),
    )
    return Architecture(
        family, h, i, _get(cfg, "num_hidden_layers"), heads, kv, hd, _get(cfg, "vocab_size"),
        bool(cfg.get("tie_word_embeddings", False)), linears,
        layer_norm_params=2 * h, outer_norm_params=h, gated_mlp=True, sdpa=True,
    )


def _llama(cfg: dict) -> Architecture:
    bias = bool(cfg.get("attention_bias", False))
    return _llama_like(cfg, "llama", bias, bias, bool(cfg.get("mlp_bias", False)))


def _mistral(cfg: dict) -> Architecture:
    return _llama_like(cfg, "mistral", False, False, False)


def _qwen2(cfg: dict) -> Architecture:
    return _llama_like(cfg, "qwen2", True, False, False)  # Qwen2 hard-codes a bias on q, k, v


def _gemma3(cfg: dict) -> Architecture:
    # Llama's linears; four norms around attention and MLP and one per head over q and k; tied
    # embeddings unless the config says otherwise
    arch = _llama_like({"tie_word_embeddings": True, **cfg}, "gemma3", bool(cfg.get("attention_bias", False)),
                       bool(cfg.get("attention_bias", False)), False)
    h, hd = arch.hidden, arch.head_dim
    return dataclasses.replace(arch, layer_norm_params=4 * h + 2 * hd, qk_norm_dim=hd)


def _bloom(cfg: dict) -> Architecture:
    h = _get(cfg, "hidden_size", "n_embed")
    heads = _get(cfg, "n_head", "num_attention_heads")
    linears = (
        Linear("query_key_value", h, 3 * h, True, "norm1"),
        Linear("dense", h, h, True, "attention"),
        Linear("dense_h_to_4h", h, 4 * h, True, "norm2"),
        Linear("dense_4h_to_h", 4 * h, h, True, "mlp"),
    )
    return Architecture(
        "bloom", h, 4 * h, _get(cfg, "n_layer", "num_hidden_layers"), heads, heads, h // heads,
        _get(cfg, "vocab_size"), bool(cfg.get("tie_word_embeddings", True)), linears,
        layer_norm_params=4 * h, outer_norm_params=4 * h, gated_mlp=False, sdpa=False,
        embed_name="word_embeddings",
    )


ARCHITECTURES = {"llama": _llama, "mistral": _mistral, "qwen2": _qwen2, "gemma3_text": _gemma3, "bloom": _bloom}


def read_architecture(model_config: Any) -> Architecture:
    """Shapes from a `PretrainedConfig` or the dict of a config.json."""
    cfg = model_config if isinstance(model_config, dict) else model_config.to_dict()
    model_type = cfg.get("model_type")
    if model_type not in ARCHITECTURES:
        raise UserError(
            f"vitune estimate knows the architectures {', '.join(ARCHITECTURES)}; this model's "
            f"config.json has model_type {model_type!r}"
        )
    return ARCHITECTURES[model_type](cfg)


def load_model_config(name_or_path: str, trust_remote_code: bool = False):
    """The model's config.json only (a Hub id downloads just that file), never its weights."""
    from transformers import AutoConfig

    source = _check_model_path(name_or_path)
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise _load_error(name_or_path, "config", exc) from None
    except Exception as exc:
        raise damaged_files(name_or_path, "config", exc, "its config.json") from None


def lora_targets(arch: Architecture, target_modules: Any) -> list[Linear]:
    """The linears of one decoder layer that PEFT wraps: all-linear = all of them (lm_head is
    not in a decoder layer), or those named in method.lora.target_modules."""
    if target_modules == "all-linear":
        return list(arch.linears)
    names = {lin.name for lin in arch.linears}
    unknown = [t for t in target_modules if t not in names]
    if unknown:
        raise UserError(
            f"method.lora.target_modules: {', '.join(unknown)} is not a linear layer of {arch.family}; "
            f"its linear layers are {', '.join(lin.name for lin in arch.linears)}"
        )
    return [lin for lin in arch.linears if lin.name in target_modules]


def tensor_shapes(arch: Architecture) -> list[tuple[int, ...]]:
    """Every parameter's shape, for optimizers whose state depends on it (Adafactor, bnb)."""
    shapes: list[tuple[int, ...]] = [(arch.vocab, arch.hidden)] + ([] if arch.tied else [(arch.vocab, arch.hidden)])
    for _ in range(arch.layers):
        for lin in arch.linears:
            shapes.append((lin.out_features, lin.in_features))
            if lin.bias:
                shapes.append((lin.out_features,))
        shapes += [(arch.hidden,)] * ((arch.layer_norm_params - 2 * arch.qk_norm_dim) // arch.hidden)
        shapes += [(arch.qk_norm_dim,)] * (2 if arch.qk_norm_dim else 0)
    shapes += [(arch.hidden,)] * (arch.outer_norm_params // arch.hidden)
    return shapes
