"""The tensor shapes of a decoder-only model, read from its config.json alone.

`read_architecture(config)` gives every linear layer of a decoder layer (with grouped KV
heads and biases as each family has them), the norms, the embeddings and whether lm_head is
tied, so parameters can be counted exactly without weights. One small reader per family in
`ARCHITECTURES` (exact, and instant); Vietnamese derivatives (Vistral, VinaLlama, ...) use their
base family's. Any other decoder that transformers knows is built from its config on the meta
device (`AutoModelForCausalLM.from_config` under `torch.device("meta")`: shapes, no weights, no
memory), and its parameters and the linear layers of its first decoder layer are read off the
modules; one forward pass on meta tensors tells which linears share an input.
"""

from __future__ import annotations

import dataclasses
import functools
import json
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
    param_shapes: tuple[tuple[int, ...], ...] = ()  # every parameter's shape, where read off a meta model

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
    """Shapes from a `PretrainedConfig` or the dict of a config.json: a family's own reader where
    there is one, else the model built on the meta device."""
    cfg = model_config if isinstance(model_config, dict) else model_config.to_dict()
    model_type = cfg.get("model_type")
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type](cfg)
    return _meta_architecture(json.dumps(cfg, sort_keys=True, default=str))


@functools.lru_cache(maxsize=16)
def _meta_architecture(config_json: str) -> Architecture:
    """Shapes of any causal LM transformers can build, read off an instance on the meta device."""
    import torch
    from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM

    cfg = json.loads(config_json)
    model_type = cfg.pop("model_type", None)
    if model_type not in CONFIG_MAPPING:
        raise UserError(
            f"the model's config.json has model_type {model_type!r}, which neither vitune estimate "
            f"({', '.join(ARCHITECTURES)}) nor this transformers knows; a model with its own code needs "
            "model.trust_remote_code and is not estimated"
        )
    try:
        config = AutoConfig.for_model(model_type, **cfg)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # unknown to transformers, not a causal LM, or a config it rejects
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(
            f"vitune estimate cannot build a causal LM of model_type {model_type!r} from this config.json "
            f"({reason}); its own readers know {', '.join(ARCHITECTURES)}"
        ) from None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers_list = _decoder_layers(model, text.num_hidden_layers)
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    vocab, hidden = embed.weight.shape
    tied = head is None or head.weight is embed.weight
    linears = _layer_linears(model, layers_list[0])
    layer_params = sum(p.numel() for p in layers_list[0].parameters())
    total = sum(p.numel() for p in model.parameters())
    lm_head = 0 if tied else vocab * hidden
    heads = _first(text, "num_attention_heads", "n_head", "num_heads")
    kv_heads = _first(text, "num_key_value_heads", "num_kv_heads") or (1 if getattr(text, "multi_query", False) else heads)
    return Architecture(
        family=model_type, hidden=hidden,
        intermediate=_first(text, "intermediate_size", "ffn_hidden_size", "n_inner") or 4 * hidden,
        layers=len(layers_list), heads=heads, kv_heads=kv_heads,
        head_dim=_first(text, "head_dim") or hidden // heads, vocab=vocab, tied=tied, linears=linears,
        layer_norm_params=layer_params - sum(lin.params for lin in linears),
        # whatever lies outside the decoder layers and the embeddings (final norm, ...); exact by construction
        outer_norm_params=total - vocab * hidden - lm_head - len(layers_list) * layer_params,
        gated_mlp=any("gate" in lin.name for lin in linears), sdpa=bool(getattr(model, "_supports_sdpa", False)),
        embed_name=next(name.rsplit(".", 1)[-1] for name, m in model.named_modules() if m is embed),
        param_shapes=tuple(tuple(p.shape) for p in model.parameters()),
    )


def _first(config, *keys: str) -> Any:
    return next((getattr(config, k) for k in keys if getattr(config, k, None) is not None), None)


def _decoder_layers(model, count: int):
    """The ModuleList of the model's decoder layers: the first one with one entry per layer."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return module
    raise UserError(f"vitune estimate found no list of {count} decoder layers in {type(model).__name__}")


def _layer_linears(model, layer) -> tuple[Linear, ...]:
    """The linear layers of one decoder layer (nn.Linear, and GPT-2's Conv1D whose weight is
    [in, out]), in order; linears that see the same input tensor in a meta forward share a source."""
    import torch

    found = [(name, m) for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"]
    inputs: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda _m, args, name=name: inputs.setdefault(name, args[0]))
             for name, m in found]
    try:
        model(input_ids=torch.zeros(1, 8, dtype=torch.long, device="meta"))
    except Exception:  # noqa: BLE001 -- a forward meta tensors cannot run: group by parent and input width
        inputs = {}
    finally:
        for hook in hooks:
            hook.remove()
    linears, seen = [], []
    for name, m in found:
        out_f, in_f = (m.weight.shape[1], m.weight.shape[0]) if type(m).__name__ == "Conv1D" else m.weight.shape
        tensor = inputs.get(name)
        key = next((i for i, t in enumerate(seen) if t is tensor), None) if tensor is not None else None
        if tensor is not None and key is None:
            seen.append(tensor)
            key = len(seen) - 1
        source = f"input{key}" if key is not None else f"{name.rsplit('.', 1)[0]}:{in_f}"
        linears.append(Linear(name.rsplit(".", 1)[-1], int(in_f), int(out_f), m.bias is not None, source))
    return tuple(linears)


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
    if arch.param_shapes:
        return list(arch.param_shapes)
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
