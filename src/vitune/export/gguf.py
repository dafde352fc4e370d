"""`vitune export gguf SOURCE --out FILE --quant TYPE`: a run or model folder -> one GGUF file
that llama.cpp, Ollama and LM Studio run.

The story: the source as one model folder (a LoRA / QLoRA run is merged first, `export/merge.py`)
-> its family (llama, mistral, qwen2, gemma3, bloom: `FAMILIES`) -> hyper-parameters and the tokenizer
(tokens, types, merges or scores, the pre-tokenizer llama.cpp must use, BOS/EOS/EOT/PAD, the
training chat template) as GGUF metadata -> every weight renamed to llama.cpp's names,
re-ordered where llama.cpp's kernels expect another layout, and quantised -> one file, written
under a temporary name and renamed when complete -> a model card (README.md, models/card.py) beside
it that lists the folder's .gguf files.

Written in Python on the `gguf` package (the one llama.cpp's own converter uses): its
`GGUFWriter` lays out the file and `gguf.quants` quantises Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1
bit-exactly as ggml does, so no llama.cpp checkout or compiler is needed. The mapping from a
Hugging Face folder to llama.cpp's conventions is written here by hand because no installable
library does it (llama.cpp's converter is a script inside its source tree, not a package).
K-quants (Q4_K_M, ...) have no Python quantiser: they go through llama.cpp's own
`llama_model_quantize` from `llama-cpp-python` when it is installed.

Weights are streamed one tensor at a time (the header is laid out first from shapes alone), so
exporting a 7B model needs the memory of its largest tensor, not of the model.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from vitune.errors import DISK_ERRNOS, UserError
from vitune.export.gguf_vocab import gguf_vocab
from vitune.export.merge import merge_run
from vitune.models.card import CARD, write_gguf_card
from vitune.models.gguf import is_gguf
from vitune.models.loading import damaged_files
from vitune.models.permissions import umask_modes

# --quant -> the ggml type of the 2-D weights; 1-D weights (norms, biases) stay float32
PLAIN_QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
# llama.cpp's own quantiser (llama-cpp-python): LLAMA_FTYPE_MOSTLY_* numbers
K_QUANTS = {"q2_k": 10, "q3_k_m": 12, "q4_k_s": 14, "q4_k_m": 15, "q5_k_s": 16, "q5_k_m": 17, "q6_k": 18}
QUANTS = PLAIN_QUANTS + tuple(K_QUANTS)
# Under a 4- or 5-bit type the embedding and output matrices are kept at Q8_0, as llama.cpp's
# quantiser keeps them higher: they dominate the quality lost at 135M-1B sizes.
LOW_BIT = ("q4_0", "q4_1", "q5_0", "q5_1")


@dataclass(frozen=True)
class GGUFFamily:
    arch: str            # llama.cpp's architecture name
    permute_qk: bool     # llama.cpp's "llama" rotary embedding pairs dimensions (2i, 2i+1), HF's (i, i+d/2)
    fused_qkv: bool = False
    # added to every RMSNorm weight: Gemma's norms scale by (1 + weight), llama.cpp's by the weight
    norm_shift: float = 0.0


FAMILIES = {
    "LlamaForCausalLM": GGUFFamily("llama", permute_qk=True),
    # Mistral has the llama architecture (llama.cpp's converter writes it as "llama" too)
    "MistralForCausalLM": GGUFFamily("llama", permute_qk=True),
    "Qwen2ForCausalLM": GGUFFamily("qwen2", permute_qk=False),
    # llama.cpp's gemma3 graph rotates HF's halves (NEOX) and scales the embedding by sqrt(hidden)
    # itself, so only the norms change; a tied embedding is read back as the output matrix
    "Gemma3ForCausalLM": GGUFFamily("gemma3", permute_qk=False, norm_shift=1.0),
    "BloomForCausalLM": GGUFFamily("bloom", permute_qk=False, fused_qkv=True),
}


def export_gguf(source: str | Path, out: str | Path, quant: str = "f16", force: bool = False,
                name: str | None = None, say=None) -> dict:
    """Write `source` (a run folder or a model folder) as the GGUF file `out`; returns a report."""
    source, out = Path(source), Path(out)
    quant = quant.lower()
    if quant not in QUANTS:
        raise UserError(f"--quant {quant}: choose one of {', '.join(QUANTS)}")
    if out.exists() and not force:
        raise UserError(f"--out {out} already exists; choose another file or add --force to replace it")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name such as {out / 'model.gguf'}")
    out.parent.mkdir(parents=True, exist_ok=True)
    say = say or (lambda line: None)
    with tempfile.TemporaryDirectory(prefix=".vitune-export-", dir=out.parent) as work:
        partial = out.parent / f".{out.name}.partial-{os.getpid()}"
        try:
            folder = model_folder(source, Path(work), say)
            if quant in K_QUANTS:
                f16 = Path(work) / "f16.gguf"
                report = write_gguf(folder, f16, "f16", name or source.name)
                llama_cpp_quantize(f16, partial, quant)
                report["quant"] = quant
            else:
                report = write_gguf(folder, partial, quant, name or source.name)
            umask_modes(partial)  # whatever wrote it (gguf, llama-quantize), the umask decides who reads it
            os.replace(partial, out)
        except (UserError, KeyboardInterrupt):
            raise
        except OSError as exc:
            if exc.errno in DISK_ERRNOS:
                raise  # a full disk: the CLI says so (exit 74)
            raise damaged_files(str(source), "model", exc, "its config.json, tokenizer files or weights") from None
        except Exception as exc:  # the folder is the user's: a damaged or hand-edited file, not a bug of ours
            raise damaged_files(str(source), "model", exc, "its config.json, tokenizer files or weights") from None
        finally:
            partial.unlink(missing_ok=True)
    report.update(source=str(source), out=str(out), bytes=out.stat().st_size)
    # the folder's card lists every .gguf file in it; anyone else's README.md there is left alone
    card = write_gguf_card(out, source)
    report["card"] = str(card) if card else None
    say(f"model card: {card}" if card else f"{out.parent / CARD} is not a card vitune wrote: kept as it is, no card "
        "written (export into a folder of its own, e.g. --out runs/NAME-gguf/NAME.gguf, to get one)")
    return report


def model_folder(source: Path, work: Path, say) -> Path:
    """A folder of full weights for `source`: itself, or for an adapter run its merge into `work`."""
    if is_gguf(source):
        raise UserError(f"{source} is already a GGUF file; give the run or model folder it came from")
    if not source.is_dir():
        raise UserError(f"{source}: folder not found (give a run folder such as runs/quickstart, or a model folder)")
    if (source / "adapter_config.json").is_file():
        say(f"merging the adapter of {source} into its base first (as `vitune merge`)")
        merge_run(source, work / "merged", dtype="float32")
        return work / "merged"
    if (source / "config.yaml").is_file() and not (source / "summary.json").is_file():
        raise UserError(f"{source} is an unfinished run (no summary.json): train it to the end (or resume it) first")
    if not (source / "config.json").is_file():
        raise UserError(f"{source}: no config.json, so not a model folder (give a run folder or a model folder)")
    return source


def write_gguf(folder: Path, out: Path, quant: str, name: str) -> dict:
    """The model folder `folder` as a GGUF file `out` with 2-D weights in `quant` (a PLAIN_QUANTS type)."""
    import gguf
    import numpy as np
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(folder))
    arch_name = (getattr(config, "architectures", None) or ["?"])[0]
    family = FAMILIES.get(arch_name)
    if family is None:
        raise UserError(f"{folder}: GGUF export supports {', '.join(FAMILIES)}; this model is {arch_name}")
    weights = WeightFiles(folder)
    tensors = planned_tensors(config, family, weights, quant)

    writer = gguf.GGUFWriter(str(out), family.arch)
    writer.add_name(name)
    writer.add_file_type(_file_type(quant))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_hparams(writer, config, family)
    vocab = write_tokenizer(writer, folder, family, config)
    for t in tensors:
        # any dtype but uint8: the shape is then read as elements, and raw_dtype names the ggml type
        writer.add_tensor_info(t.name, t.shape, np.float32, t.nbytes, raw_dtype=t.ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in tensors:  # one tensor in memory at a time
        writer.write_tensor_data(gguf.quants.quantize(t.load(), t.ggml_type))
    writer.close()
    kept = sorted({t.name for t in tensors if t.fallback})
    return {"architecture": family.arch, "quant": quant, "tensors": len(tensors), "kept_f16": kept,
            "window": uniform_window(config, family), **vocab}


# ---------------------------------------------------------------- weights

class WeightFiles:
    """The safetensors weights of a model folder, one or several shards, read tensor by tensor."""

    def __init__(self, folder: Path):
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            mapping = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            self.where = {key: folder / file for key, file in mapping.items()}
        elif (folder / "model.safetensors").is_file():
            from safetensors import safe_open

            with safe_open(str(folder / "model.safetensors"), framework="pt") as fh:
                self.where = {key: folder / "model.safetensors" for key in fh.keys()}
        else:
            raise UserError(f"{folder}: no model.safetensors; GGUF export reads safetensors weights "
                            "(re-save the model with save_pretrained(safe_serialization=True))")

    def keys(self) -> list[str]:
        return list(self.where)

    def shape(self, key: str) -> tuple[int, ...]:
        from safetensors import safe_open

        with safe_open(str(self.where[key]), framework="pt") as fh:
            return tuple(fh.get_slice(key).get_shape())

    def load(self, key: str):
        """The tensor `key` as float32 numpy."""
        import torch
        from safetensors import safe_open

        with safe_open(str(self.where[key]), framework="pt") as fh:
            return fh.get_tensor(key).to(torch.float32).numpy()


@dataclass
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    ggml_type: object
    nbytes: int
    load: object        # () -> float32 numpy array in llama.cpp's layout
    fallback: bool = False


def planned_tensors(config, family: GGUFFamily, weights: WeightFiles, quant: str) -> list[PlannedTensor]:
    """Every tensor of the file: llama.cpp's name, shape, ggml type and size, and how to load it."""
    import gguf

    blocks = _get(config, "num_hidden_layers", "n_layer")
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, family.arch.upper()), blocks)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    planned: list[PlannedTensor] = []
    embedding_key = None
    for key in weights.keys():
        if key.endswith("rotary_emb.inv_freq"):
            continue  # recomputed from the rope settings
        if key == "lm_head.weight" and tied:
            continue  # llama.cpp reads the embedding when a file has no output matrix
        # gguf's map knows BLOOM's names without the "transformer." prefix of its HF checkpoints
        target = names.get_name(key, try_suffixes=(".weight", ".bias")) or \
            names.get_name(key.removeprefix("transformer."), try_suffixes=(".weight", ".bias"))
        if target is None:
            raise UserError(f"weight {key}: no llama.cpp tensor for it in architecture {family.arch}; "
                            "this model has parts GGUF export does not know")
        if target == "token_embd.weight":
            embedding_key = key
        planned.append(_plan(target, weights.shape(key), _loader(key, config, family, weights), quant))
    if tied and family.arch == "bloom" and embedding_key:
        # llama.cpp's BLOOM graph requires an output matrix: the tied embedding, written twice
        planned.append(_plan("output.weight", weights.shape(embedding_key),
                             _loader(embedding_key, config, family, weights), quant))
    rope = rope_factors(config)
    if rope is not None:
        planned.append(_plan("rope_freqs.weight", rope.shape, lambda: rope, quant))
    return planned


def _plan(name: str, shape: tuple[int, ...], load, quant: str) -> PlannedTensor:
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    qtype = {"f32": "F32", "f16": "F16", "bf16": "BF16"}.get(quant, quant.upper())
    if len(shape) == 1:
        qtype = "F32"
    elif quant in LOW_BIT and name in ("token_embd.weight", "output.weight"):
        qtype = "Q8_0"
    ggml_type = getattr(GGMLQuantizationType, qtype)
    block, block_bytes = GGML_QUANT_SIZES[ggml_type]
    fallback = shape[-1] % block != 0  # rows must hold whole blocks; a few odd shapes stay f16
    if fallback:
        ggml_type = GGMLQuantizationType.F16
        block, block_bytes = GGML_QUANT_SIZES[ggml_type]
    nbytes = int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * block_bytes
    return PlannedTensor(name, tuple(shape), ggml_type, nbytes, load, fallback)


def _loader(key: str, config, family: GGUFFamily, weights: WeightFiles):
    """() -> the weight `key` in the layout llama.cpp's kernels expect."""

    def load():
        data = weights.load(key)
        if family.permute_qk and key.endswith(("q_proj.weight", "q_proj.bias")):
            return interleave_rotary(data, config.num_attention_heads)
        if family.permute_qk and key.endswith(("k_proj.weight", "k_proj.bias")):
            return interleave_rotary(data, _kv_heads(config))
        if family.fused_qkv and key.endswith(("query_key_value.weight", "query_key_value.bias")):
            return split_fused_qkv(data, config.n_head)
        if family.norm_shift and key.endswith("norm.weight"):
            return data + family.norm_shift
        return data

    return load


def interleave_rotary(weight, heads: int):
    """Q or K rows from HF's rotary layout (halves: i and i + d/2 rotate together) into the
    layout of llama.cpp's "llama" rotary embedding (neighbours: 2i and 2i+1 rotate together)."""
    rows = weight.shape[0]
    return (weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def split_fused_qkv(weight, heads: int):
    """BLOOM's fused QKV rows, per head (q, k, v), into llama.cpp's order: all q, all k, all v."""
    head_dim = weight.shape[0] // heads // 3
    return weight.reshape(heads, 3, head_dim, *weight.shape[1:]).swapaxes(0, 1).reshape(weight.shape)


def rope_factors(config):
    """llama.cpp's `rope_freqs` tensor for Llama-3.1-style rope scaling (frequency divisors), or None."""
    import numpy as np

    params = _rope_parameters(config)
    if params.get("rope_type", "default") != "llama3":
        return None
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, torch.device("cpu"))
    dim = _head_dim(config)
    plain = 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    return (plain / scaled).numpy().astype(np.float32)


# ---------------------------------------------------------------- hyper-parameters

def write_hparams(writer, config, family: GGUFFamily) -> None:
    import gguf

    if family.arch == "bloom":
        writer.add_context_length(getattr(config, "seq_length", 2048))
        writer.add_embedding_length(config.hidden_size)
        writer.add_feed_forward_length(4 * config.hidden_size)
        writer.add_block_count(config.n_layer)
        writer.add_head_count(config.n_head)
        writer.add_head_count_kv(config.n_head)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
        writer.add_vocab_size(config.vocab_size)
        return
    params = _rope_parameters(config)
    rope_type = params.get("rope_type", "default")
    if rope_type not in ("default", "linear", "llama3"):
        raise UserError(f"rope scaling {rope_type!r}: GGUF export writes default, linear and llama3 rope only")
    writer.add_context_length(context_length(config, family))
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(_kv_heads(config))
    head_dim = _head_dim(config)
    writer.add_rope_dimension_count(head_dim)
    # Gemma 3 always: transformers' GGUF reader takes a missing one as 256, its default head_dim
    if head_dim != config.hidden_size // config.num_attention_heads or family.arch == "gemma3":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(params.get("rope_theta", 10000.0)))
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if family.arch == "gemma3":
        write_gemma3_attention(writer, config, head_dim)


def uniform_window(config, family: GGUFFamily) -> int | None:
    """The sliding window of a model whose every layer slides (Mistral-7B-v0.1 and its derivatives
    such as Vistral-7B-Chat: 4,096 of 32,768 positions), for an architecture whose llama.cpp graph
    has no window ("llama", "qwen2"); None when there is none to lose."""
    window = getattr(config, "sliding_window", None)
    if family.arch == "gemma3" or not window or getattr(config, "use_sliding_window", True) is False:
        return None  # gemma3 writes its windows; Qwen2 carries a sliding_window it does not use
    return int(window) if window < config.max_position_embeddings else None


def context_length(config, family: GGUFFamily) -> int:
    """The context the file states: the model's, or its window when llama.cpp would attend past it.
    Within the window full attention is sliding attention, so llama.cpp computes what transformers
    does; llama.cpp warns when asked for a longer context than the file states."""
    return uniform_window(config, family) or config.max_position_embeddings


def write_gemma3_attention(writer, config, head_dim: int) -> None:
    """Gemma 3's sliding-window layers (the window, which layers, their own rope base) and the
    checks that llama.cpp's gemma3 graph computes what this config does."""
    where = Path(config.name_or_path) / "config.json"
    # llama.cpp scales queries by 1/sqrt(head_dim), or by 1/sqrt(hidden/heads) for its 62-layer 27B
    expected = config.hidden_size // config.num_attention_heads if config.num_hidden_layers == 62 else head_dim
    if getattr(config, "query_pre_attn_scalar", head_dim) != expected:
        raise UserError(f"{where}: query_pre_attn_scalar {config.query_pre_attn_scalar}, but llama.cpp's gemma3 "
                        f"scales queries by 1/sqrt({expected}) for this shape: the GGUF file would compute another model")
    if getattr(config, "attn_logit_softcapping", None) or getattr(config, "use_bidirectional_attention", False):
        raise UserError(f"{where}: attention logit soft-capping or bidirectional attention, which llama.cpp's "
                        "gemma3 has neither of")
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
    window = getattr(config, "sliding_window", None)
    layers = list(getattr(config, "layer_types", None) or [])
    if not window or "sliding_attention" not in layers:
        return  # every layer global: llama.cpp's gemma3 without a window key
    local = _rope_parameters(config, "sliding_attention")
    if local.get("rope_type", "default") != "default":
        raise UserError(f"{where}: rope scaling {local['rope_type']!r} on the sliding-window layers, but "
                        "llama.cpp's gemma3 scales only the global layers' rope")
    writer.add_sliding_window(int(window))
    # per layer: llama.cpp's default (five local, one global) is Gemma 3's, not a tiny or pruned model's
    writer.add_sliding_window_pattern([kind == "sliding_attention" for kind in layers])
    writer.add_rope_freq_base_swa(float(local["rope_theta"]))


def _rope_parameters(config, layers: str = "full_attention") -> dict:
    """The rope settings of the global layers (or of `layers`, where a config has one set per layer kind)."""
    # transformers 5 keeps theta and scaling in config.rope_parameters (Gemma 3: one entry per layer
    # kind); older configs at the top level
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if isinstance(params.get(layers), dict):
        params = dict(params[layers])
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return params


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _kv_heads(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def _get(config, *names):
    for name in names:
        if getattr(config, name, None) is not None:
            return getattr(config, name)
    raise UserError(f"config.json has none of {', '.join(names)}")


def _file_type(quant: str) -> int:
    from gguf import LlamaFileType

    return {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "bf16": LlamaFileType.MOSTLY_BF16,
            "q8_0": LlamaFileType.MOSTLY_Q8_0, "q4_0": LlamaFileType.MOSTLY_Q4_0, "q4_1": LlamaFileType.MOSTLY_Q4_1,
            "q5_0": LlamaFileType.MOSTLY_Q5_0, "q5_1": LlamaFileType.MOSTLY_Q5_1}[quant]


# ---------------------------------------------------------------- tokenizer

def write_tokenizer(writer, folder: Path, family: GGUFFamily, config) -> dict:
    """Tokens, types, merges or scores, pre-tokenizer, special ids and the chat template; returns
    what was written (for the report and the tests)."""
    vocab = gguf_vocab(folder, config.vocab_size)
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges is not None:
        writer.add_token_merges(vocab.merges)
    for key, value in vocab.special.items():
        getattr(writer, f"add_{key}_token_id")(value)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
    return {"tokenizer": vocab.model, "pre_tokenizer": vocab.pre, "tokens": len(vocab.tokens),
            "special": vocab.special, "chat_template": bool(vocab.chat_template)}


# ---------------------------------------------------------------- llama.cpp's K-quants

def llama_cpp_quantize(source: Path, out: Path, quant: str) -> None:
    """`source` (an f16 GGUF) quantised to a K-quant by llama.cpp's own quantiser."""
    try:
        import llama_cpp
    except ImportError:
        raise UserError(f"--quant {quant} is quantised by llama.cpp itself, through llama-cpp-python, which is not "
                        "installed: pip install llama-cpp-python (it compiles llama.cpp: minutes, needs cmake and a "
                        f"C++ compiler), or choose one of {', '.join(PLAIN_QUANTS)}") from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = K_QUANTS[quant]
    params.nthread = os.cpu_count() or 1
    code = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params)
    if code != 0:
        raise UserError(f"llama.cpp could not quantise the model to {quant} (code {code}); try q8_0 or q4_0")
