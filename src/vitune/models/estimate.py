"""Predict the peak GPU memory and the speed of a run from the model's config.json alone.

`estimate(run_config, model_config, device)` never touches weights: it rebuilds the shapes of
every tensor from the architecture (embeddings, attention with grouped KV heads, MLP, norms,
lm_head tied or not), so the counts are exact, and prices each part of a training step:

- base_weights: the frozen or trained model. bf16/fp16 2 bytes, fp32 4. QLoRA: every decoder
  nn.Linear in NF4 (0.5 byte/param + one absmax per 64 values: 1 byte with double quantisation,
  plus one fp32 per 256 absmax; 4 bytes without); embeddings, lm_head, norms and biases are not
  quantised, and `prepare_model_for_kbit_training` (which vitune calls) upcasts them to fp32.
- lora_params: r * (in + out) per targeted linear (all-linear = every linear but lm_head),
  plus full copies of `modules_to_save`. PEFT (autocast_adapter_dtype=True, its default)
  keeps adapters in fp32 even on a bf16 base.
- gradients: one per trainable parameter, in the parameter's dtype.
- optimizer_states: adamw_torch(_fused) 2 states in the parameter's dtype; adamw_bnb_8bit /
  paged_adamw_8bit 2 bytes (+ fp32 absmax per 256; tensors under 4096 values keep 8 bytes);
  paged_adamw_32bit 8 bytes; adafactor the factored second moment, 4 x (rows + cols) per
  matrix in the parameter's dtype; sgd nothing. Paged states live in CUDA unified memory:
  they occupy the GPU but are not in `torch.cuda.max_memory_allocated`.
- activations: bytes saved per token per decoder layer for backward, counted tensor by
  tensor for SDPA / flash attention (no seq x seq matrix; eager attention adds it), times
  tokens = data.max_length x train.micro_batch_size. With gradient checkpointing only each
  layer's input is kept, plus 1.8 x one layer while it is recomputed and back-propagated.
- logits_loss: transformers upcasts the logits to fp32 for the loss; the peak, at the start
  of backward, holds the fp32 log-softmax, its gradient and the gradient of the upcast:
  12 bytes x vocab x tokens.
- cuda_overhead: CUDA context (0.75 GiB) + caching-allocator slack (10% of peak_allocated).

total is the peak of a step as nvidia-smi sees it; peak_allocated (total - cuda_overhead, less
paged optimizer states) is what torch.cuda.max_memory_allocated, and so vitune's
peak_memory_gib, reports. Both are less
than the sum of the parts, because not everything is alive at once: peak_allocated = weights
+ adapters + optimizer states + the larger of (activations + logits_loss [+ gradients when
accumulating]) and (gradients + the optimizer's temporaries); with gradient checkpointing,
the loss's buffers are freed before the first layer is recomputed, so only the larger of
logits_loss and the recomputed layer counts. Measured against real steps: within 2.5%.

Speed: tokens/s = device peak FLOP/s x MFU / FLOPs per token, where with N the weights of
every matmul (decoder linears + lm_head) and A = 2 x layers x (heads x head_dim) x seq_len
the forward attention FLOPs of a causal token (flash attention skips the masked half):
full = 3 x (2N + A); LoRA/QLoRA = 2N (forward) + 2N (input gradients only, frozen base)
+ 3A + 6 x lora_params; gradient checkpointing adds one forward of the decoder layers.
QLoRA adds the time to dequantise every 4-bit weight for each matmul that uses it
(2.5 bytes of memory traffic per weight, 2 or 3 uses per step) at the device's bandwidth
(not measured yet). A step never takes less than the host's floor (HOST_SECONDS_PER_LAYER x
layers): below ~2k tokens per micro-batch a 7-8B LoRA step is bound by Python and kernel
launches, not by the GPU.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from vitune.config import RunConfig
from vitune.errors import UserError
from vitune.models.architecture import Architecture, Linear, lora_targets, read_architecture, tensor_shapes
from vitune.models.optimizers import resolve_optimizer

GIB = 2**30

# The constants below were measured with benchmarks/estimate_measure.py-style steps (HF
# eager PyTorch, SDPA, bf16 autocast) on one H200: Llama-3-8B / Mistral-7B LoRA r=16 and a
# Llama-3.2-1B full fine-tune, 1k-8k tokens per micro-batch.
# Fraction of peak bf16 FLOP/s reached once a step is compute-bound (measured 0.29-0.36).
ASSUMED_MFU = 0.33
# CUDA context, and caching-allocator slack as a fraction of the allocated peak (3-25%).
CUDA_CONTEXT_GIB = 0.75
ALLOCATOR_SLACK = 0.10
# Recomputing and back-propagating one checkpointed layer holds its saved activations plus
# as much again in gradients: peak = 1.8 x the layer's saved activations (measured).
LAYER_BACKWARD_FACTOR = 1.8
# Host-side floor of one micro-batch step, per decoder layer: Python, autograd and kernel
# launches. Short sequences cannot go faster than this however fast the GPU is. Keyed by
# (method is LoRA/QLoRA, gradient checkpointing); measured on a sandboxed (gVisor) host,
# a faster host has a lower floor.
HOST_SECONDS_PER_LAYER = {(True, True): 10.8e-3, (True, False): 9.2e-3, (False, True): 8.6e-3, (False, False): 5.3e-3}


# ---------------------------------------------------------------- devices


@dataclass(frozen=True)
class Device:
    name: str
    bf16_flops: float  # dense tensor-core peak, FLOP/s; 0 = no bf16 (vitune falls back to fp32)
    fp16_flops: float
    fp32_flops: float
    bandwidth: float  # bytes/s
    memory_gib: float  # nominal
    cuda: bool = True


DEVICES = {
    "H100": Device("H100 SXM", 989e12, 989e12, 67e12, 3.35e12, 80),
    "H200": Device("H200 SXM", 989e12, 989e12, 67e12, 4.8e12, 141),
    "A100": Device("A100 80GB SXM", 312e12, 312e12, 19.5e12, 2.04e12, 80),
    "RTX4090": Device("RTX 4090", 165e12, 165e12, 82.6e12, 1.01e12, 24),
    "L4": Device("L4", 121e12, 121e12, 30.3e12, 0.3e12, 24),
    "T4": Device("T4", 0.0, 65e12, 8.1e12, 0.32e12, 16),
    "CPU": Device("CPU", 0.0, 0.0, 1e12, 0.1e12, 0, cuda=False),
}


def get_device(name: str) -> Device:
    key = name.upper().replace(" ", "").replace("-", "")
    if key not in DEVICES:
        raise UserError(f"--device {name!r} is not known; choose one of {', '.join(DEVICES)}")
    return DEVICES[key]


# ---------------------------------------------------------------- the estimate


@dataclass
class Estimate:
    """Peak memory of one training step in GiB, by part, and the predicted speed."""

    base_weights: float
    lora_params: float
    gradients: float
    optimizer_states: float
    activations: float
    logits_loss: float
    cuda_overhead: float
    total: float
    peak_allocated: float
    trainable_params: int
    total_params: int
    flops_per_token: float
    predicted_tokens_per_s: float
    device: str
    assumed_mfu: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def nf4_bytes(numel: int, double_quant: bool) -> float:
    """Bytes of one weight stored by bitsandbytes in 4 bits (blocks of 64 values)."""
    blocks = math.ceil(numel / 64)
    nf4_code = 16 * 4  # the 16 NF4 levels, fp32
    if double_quant:  # absmax quantised to 8 bits in blocks of 256: fp32 absmax, 256-entry code, offset
        return numel / 2 + blocks + 4 * math.ceil(blocks / 256) + 4 * 256 + 4 + nf4_code
    return numel / 2 + 4 * blocks + nf4_code


def optimizer_bytes(name: str, shapes: list[tuple[int, ...]], param_bytes: int) -> float:
    """Optimizer state for trainable tensors of these shapes stored with `param_bytes` each."""
    total = 0.0
    for shape in shapes:
        n = math.prod(shape)
        if name in ("adamw_torch", "adamw_torch_fused"):
            total += 2 * n * param_bytes
        elif name in ("adamw_bnb_8bit", "paged_adamw_8bit"):
            total += 2 * n + 2 * 4 * math.ceil(n / 256) if n >= 4096 else 8 * n
        elif name == "paged_adamw_32bit":
            total += 8 * n
        elif name == "adafactor":
            total += (shape[0] + shape[1] if len(shape) == 2 else n) * param_bytes
        elif name != "sgd":
            raise UserError(f"vitune estimate does not know the optimizer {name!r}")
    return total


def model_config_type(model_config) -> str | None:
    return model_config.get("model_type") if isinstance(model_config, dict) else getattr(model_config, "model_type", None)


def logits_bytes(model_type: str | None, arch: Architecture, tokens: int) -> int:
    """What the loss over the vocabulary holds at its peak: fp32 logits, their softmax and gradient
    for every token (12 bytes each) in the model's own forward; with vitune's chunked loss
    (models/chunked_loss.py) one chunk's logits and softmax and the hidden states' fp32 gradient."""
    from vitune.models.chunked_loss import CHUNK_BYTES, CHUNKED_ARCHITECTURES  # lazy: it imports torch

    plain = 12 * arch.vocab * tokens
    if model_type not in CHUNKED_ARCHITECTURES:
        return plain
    return min(plain, 2 * CHUNK_BYTES + 4 * arch.hidden * tokens)


def layer_activation_bytes(
    arch: Architecture, full: bool, targets: list[Linear], dropout: bool, autocast: bool, act: int, r: int
) -> float:
    """Bytes one token leaves saved for backward inside one decoder layer (SDPA attention).

    RMSNorm saves its input upcast to fp32; SDPA saves q, k, v, its output and an fp32
    log-sum-exp per head; the gated MLP saves gate, silu(gate) and up. Full fine-tuning also
    saves every linear's input (once per distinct input) for its weight gradient. LoRA saves
    per targeted linear the adapter's input: a copy cast for lora_A (under autocast), plus a
    1-byte dropout mask when lora dropout > 0.
    """
    h, i = arch.hidden, arch.intermediate
    q, kv = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    total = 2 * 4 * h  # two norms, fp32 input each
    if full:
        inputs = {lin.source: lin.in_features for lin in arch.linears}
        total += act * sum(inputs.values())
    cast = 2 if autocast else 4  # lora_A's input: cast to bf16 by autocast, else to fp32 (the adapter's dtype)
    for lin in targets:
        total += cast * r  # lora_A's output, saved by lora_B
        if dropout:
            total += (1 + cast) * lin.in_features  # dropout mask + the dropped input lora_A saves
        elif autocast or act != 4:
            total += cast * lin.in_features  # one cast copy per adapter
    if targets and not dropout and not autocast and act == 4:
        total += 4 * sum({lin.source: lin.in_features for lin in targets}.values())  # fp32: no copy, shared
    total += act * (q + 2 * kv + q) + 4 * arch.heads  # SDPA: q, k, v, output, logsumexp
    total += act * (3 * i if arch.gated_mlp else 2 * i)  # gate, silu(gate), up | fc1 out, gelu out
    return total


def estimate(run_config: RunConfig, model_config: Any, device: str = "H100") -> Estimate:
    """Predict peak memory (GiB, by part) and tokens/s of `run_config` on `device`.

    `model_config` is the model's `PretrainedConfig` or its config.json as a dict. The
    formulas are in this module's docstring; assumptions land in `Estimate.notes`.
    """
    arch = read_architecture(model_config)
    dev = get_device(device)
    method, train, lora = run_config.method, run_config.train, run_config.method.lora
    if train.gradient_checkpointing == "auto":
        # as the runner decides: no checkpointing when the run fits the device without it
        def fixed(value: bool) -> RunConfig:
            return run_config.model_copy(update={"train": train.model_copy(update={"gradient_checkpointing": value})})

        result = estimate(fixed(False), model_config, device)
        if dev.cuda and result.total > dev.memory_gib * 0.9:
            result = estimate(fixed(True), model_config, device)
            result.notes.append("gradient_checkpointing auto: estimated with every layer checkpointed; "
                                "the run checkpoints only as many layers as it needs")
        return result
    notes: list[str] = []

    # vitune's own choices (models/loading.py, train/sft.py): auto = bf16 where the GPU has it
    dtype = run_config.model.dtype
    if dtype == "auto":
        dtype = "bfloat16" if dev.cuda and dev.bf16_flops else "float32"
    elif dtype == "bfloat16" and not dev.bf16_flops:
        notes.append(f"{dev.name} has no bf16 tensor cores: bf16 runs at fp32 speed")
    wbytes = 4 if dtype == "float32" else 2
    autocast = dev.cuda and dtype == "bfloat16"  # Trainer's bf16=True
    act = 2 if wbytes == 2 else 4
    peak_flops = {"bfloat16": dev.bf16_flops or dev.fp32_flops, "float16": dev.fp16_flops or dev.fp32_flops}.get(dtype, dev.fp32_flops)

    total_params = arch.total_params
    full = method.type == "full"
    qlora = method.type == "qlora"
    targets = [] if full else lora_targets(arch, lora.target_modules)
    quant = method.quantization

    # ---- weights
    linear_weights = arch.layers * sum(lin.in_features * lin.out_features for lin in arch.linears)
    if qlora:
        per_tensor = [lin.in_features * lin.out_features for lin in arch.linears]
        if quant.bits == 4:
            quantised = arch.layers * sum(nf4_bytes(n, quant.double_quant) for n in per_tensor)
        else:
            quantised = arch.layers * sum(n + 4 * lin.out_features for n, lin in zip(per_tensor, arch.linears))
        # prepare_model_for_kbit_training upcasts every weight it cannot quantise to fp32
        base = quantised + 4 * (total_params - linear_weights)
        notes.append(
            "QLoRA: embeddings, lm_head and norms are upcast to fp32 by prepare_model_for_kbit_training "
            f"({4 * (total_params - linear_weights) / GIB:.2f} GiB); the residual stream is fp32 too"
        )
    else:
        base = wbytes * total_params

    # ---- trainable parameters and their dtype
    saved_modules = list(lora.modules_to_save or []) if not full else []
    extra_shapes: list[tuple[int, ...]] = []
    for name in saved_modules:
        if name in (arch.embed_name, "lm_head"):
            extra_shapes.append((arch.vocab, arch.hidden))
        else:
            notes.append(f"modules_to_save {name!r} is not counted")
    if full:
        train_shapes, tbytes = tensor_shapes(arch), wbytes
    else:
        # PEFT upcasts adapter weights to fp32 (autocast_adapter_dtype=True)
        train_shapes = [s for lin in targets for s in ((lora.r, lin.in_features), (lin.out_features, lora.r))] * arch.layers
        tbytes = 4
    trainable = sum(math.prod(s) for s in train_shapes)
    saved_params = sum(math.prod(s) for s in extra_shapes)
    saved_bytes = 4 if qlora else wbytes  # a copy of the (possibly upcast) module
    adapter = 0.0 if full else trainable * tbytes + saved_params * saved_bytes
    gradients = trainable * tbytes + saved_params * saved_bytes
    optimizer = resolve_optimizer(train.optimizer, bool(train.fsdp))[0]  # auto -> what the run would use here
    states = optimizer_bytes(optimizer, train_shapes, tbytes) + optimizer_bytes(optimizer, extra_shapes, saved_bytes)
    step_temp = gradients if optimizer == "adamw_torch" else 0.0  # foreach sqrt(exp_avg_sq)
    if optimizer.startswith("paged_"):
        notes.append("paged optimizer states live in CUDA unified memory: on the GPU, but not in torch's peak_memory_gib")

    # ---- activations
    seq = run_config.data.max_length
    tokens = seq * train.micro_batch_size
    r = 0 if full else lora.r
    per_layer = layer_activation_bytes(arch, full, targets, lora.dropout > 0 and not full, autocast, act, r) * tokens
    eager = not arch.sdpa or run_config.model.attn_implementation == "eager"
    if eager:
        per_layer += arch.heads * seq * seq * (4 + act) * train.micro_batch_size  # fp32 softmax + probabilities
        notes.append("eager attention stores seq x seq scores per head; sdpa / flash attention do not")
    residual = 4 if qlora else act
    final_norm = tokens * (4 * arch.hidden + (act * arch.hidden if full else 0))
    logits = logits_bytes(model_config_type(model_config), arch, tokens)
    if train.gradient_checkpointing:
        kept = arch.layers * residual * arch.hidden * tokens + final_norm
        activations = kept + LAYER_BACKWARD_FACTOR * per_layer
        transient = kept + max(logits, LAYER_BACKWARD_FACTOR * per_layer)
    else:
        activations = arch.layers * per_layer + final_norm
        transient = activations + logits
        notes.append("gradient checkpointing (train.gradient_checkpointing: true) would keep only each layer's input")
    if logits < 12 * arch.vocab * tokens:
        notes.append(f"the loss takes the {arch.vocab:,}-token logits a chunk of tokens at a time "
                     f"(models/chunked_loss.py), never all {tokens:,} tokens' at once")
    else:
        notes.append(f"the loss holds 12 bytes x {arch.vocab:,} vocab x {tokens:,} tokens in fp32 (this architecture "
                     "takes the model's own forward, not vitune's chunked loss)")
    notes.append("assumes every micro-batch is full (rows as long as data.max_length); shorter rows use less")

    accumulating = gradients if train.gradient_accumulation > 1 else 0.0
    allocated = base + adapter + states + max(transient + accumulating, gradients + step_temp)
    overhead = (CUDA_CONTEXT_GIB * GIB + ALLOCATOR_SLACK * allocated) if dev.cuda else 0.0
    peak = allocated + overhead
    paged = states if optimizer.startswith("paged_") else 0.0  # outside torch's allocator
    if dev.cuda and peak / GIB > dev.memory_gib:
        notes.append(f"does not fit: {peak / GIB:.1f} GiB > {dev.memory_gib} GB on {dev.name}")

    # ---- speed
    matmul = linear_weights + arch.vocab * arch.hidden
    attention = 2 * arch.layers * arch.heads * arch.head_dim * seq * (2 if eager else 1)
    forward = 2 * matmul + attention
    if full:
        flops = 3 * forward
    else:
        flops = 4 * matmul + 3 * attention + 6 * trainable
    if train.gradient_checkpointing:
        flops += forward - 2 * arch.vocab * arch.hidden
    step_seconds = tokens * flops / (peak_flops * ASSUMED_MFU)
    if qlora:
        uses = 3 if train.gradient_checkpointing else 2
        step_seconds += uses * 2.5 * linear_weights / dev.bandwidth
    floor = arch.layers * HOST_SECONDS_PER_LAYER[(not full, train.gradient_checkpointing)] if dev.cuda else 0.0
    notes.append(f"tokens/s assumes {ASSUMED_MFU:.0%} of {dev.name}'s {peak_flops / 1e12:.0f} TFLOP/s peak")
    if floor > step_seconds:
        notes.append(
            f"host-bound: a step takes at least {floor:.2f} s of Python and kernel launches; "
            "more tokens per micro-batch would cost little extra time"
        )

    return Estimate(
        base_weights=base / GIB,
        lora_params=adapter / GIB,
        gradients=gradients / GIB,
        optimizer_states=states / GIB,
        activations=activations / GIB,
        logits_loss=logits / GIB,
        cuda_overhead=overhead / GIB,
        total=peak / GIB,
        peak_allocated=(allocated - paged) / GIB,
        trainable_params=total_params if full else trainable + saved_params,
        total_params=total_params,
        flops_per_token=flops,
        predicted_tokens_per_s=tokens / max(step_seconds, floor),
        device=dev.name,
        assumed_mfu=ASSUMED_MFU,
        notes=notes,
    )
