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

Speed. FLOPs per token (`flops_per_token`), with N the weights of every matmul (decoder
linears + lm_head) and A = 2 x layers x (heads x head_dim) x seq_len the forward attention of a
causal token when the kernel skips the masked half (flash attention, SDPA on a GPU; twice that
on the CPU): full = 3 x (2N + A); LoRA/QLoRA = 2N (forward) + 2N (input gradients only, frozen
base) + 3A + 6 x lora_params; gradient checkpointing adds one forward of the decoder layers; a
head that trains under the chunked loss computes its logits once more.

- GPU: tokens/s = peak FLOP/s x MFU / FLOPs per token, MFU 0.33 (the range: 0.29-0.36, as
  measured). QLoRA adds the time to dequantise every 4-bit weight for each matmul that uses it
  (2.5 bytes of memory traffic per weight, 2 or 3 uses per step) at the device's bandwidth (not
  measured yet). A step never takes less than the host's floor (HOST_SECONDS_PER_LAYER x layers):
  below ~2k tokens per micro-batch a 7-8B LoRA step is bound by Python and kernel launches.
- CPU: nothing is assumed about the machine. `cpu_probe` times the run's own matmul shapes
  (forward, input gradient, and for full fine-tuning weight gradient, in the run's dtype, ~0.3 s,
  once per process) and an elementwise op the size of a micro-batch's activations. A step =
  its matmul FLOPs at the probed rate + the elements its elementwise ops touch (norms, rotary,
  activations, attention scores, LoRA's adds, the log-softmax over the vocabulary, AdamW; counted
  by `cpu_step_elements`) at the probed time per element + the Trainer's bookkeeping. The range
  is +-30% around that: the probe sees the machine for a fraction of a second, the run for
  minutes, and other processes come and go.

This module is longer than most: memory and speed of a step are priced from the same shapes
and read together by the CLI, the web page and `train --dry-run`.
"""

from __future__ import annotations

import functools
import math
import os
import time
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
# The MFU measured on the H200 (0.29-0.36) bounds a GPU's tokens/s range.
MFU_RANGE = (0.29, 0.36)

# CPU: no assumed peak. A probe times the run's own matmuls on this machine (cpu_probe), and the
# rest of a step is priced in elements that elementwise ops read and write (norms, rotary,
# activations, residual adds, softmax, the optimizer), at the probe's measured seconds per element.
# Elements per token and decoder layer, forward + backward: x hidden, x intermediate, x each
# LoRA adapter's (in + out), x attention scores (heads x seq; SDPA on the CPU does not skip the
# masked half).
CPU_ELEMENTS_PER_HIDDEN = 30
CPU_ELEMENTS_PER_INTERMEDIATE = 10
CPU_ELEMENTS_PER_ADAPTER = 6
CPU_ELEMENTS_PER_SCORE = 6
# The loss over the vocabulary: log-softmax, its gradient (+ Gemma's tanh softcapping), per logit.
CPU_ELEMENTS_PER_LOGIT = 10
CPU_ELEMENTS_PER_SOFTCAPPED_LOGIT = 16
# AdamW (foreach), gradient clipping and accumulation, per trained parameter, read from memory.
CPU_ELEMENTS_PER_TRAINED_PARAM = 20
# The Trainer's own bookkeeping per optimizer step (callbacks, logging, the data loader), seconds.
CPU_SECONDS_PER_STEP = 0.02
# Python and op dispatch per decoder layer and step (forward + backward, the adapters' modules),
# seconds: what the elements above leave unexplained, fitted on 2 cores where tiny models showed it
# (benchmarks/estimate_accuracy.py: tiny Gemma 3 trained 42% slower than the elements predicted).
CPU_SECONDS_PER_LAYER = 0.01
# How far a CPU prediction may miss (the machine's load changes between the probe and the run):
# the range is the middle / (1 + x) .. middle x (1 + x).
CPU_UNCERTAINTY = 0.3


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


# ---------------------------------------------------------------- the CPU probe


@dataclass(frozen=True)
class CpuRates:
    """What the probe measured on this machine: the FLOP/s of the run's own matmuls, and the
    seconds per element of an elementwise op on a tensor of one micro-batch's hidden states."""

    matmul_flops: float
    element_seconds: float


# A probe's matmuls do at most this many FLOPs per pass over the model's shapes (~0.3 s in all on 2 cores).
PROBE_FLOPS_PER_PASS = 1.5e9


@functools.lru_cache(maxsize=8)
def cpu_probe(
    shapes: tuple[tuple[int, int, int], ...] = ((1024, 1024, 1),), rows: int = 256, dtype: str = "float32",
    weight_gradients: bool = False,
) -> CpuRates:
    """Time this machine's matmuls of `shapes` ((in, out, uses per forward), `rows` tokens) in
    `dtype`, as a step runs them: forward, input gradient, and (full fine-tuning) weight gradient.
    The rate is weighted by each shape's share of the model's FLOPs. Cached per process."""
    import torch

    torch_dtype = getattr(torch, dtype)
    flops = seconds = 0.0
    for n_in, n_out, uses in shapes:
        x, w = torch.randn(rows, n_in, dtype=torch_dtype), torch.randn(n_out, n_in, dtype=torch_dtype)
        g = torch.randn(rows, n_out, dtype=torch_dtype)
        products = [lambda: x @ w.T, lambda: g @ w] + ([lambda: g.T @ x] if weight_gradients else [])
        for product in products:
            seconds += uses * _seconds_per_call(product)
            flops += uses * 2 * rows * n_in * n_out
    # elementwise: adds on a [rows, intermediate] tensor, the size of a step's MLP activations
    width = max(n_out for _, n_out, _ in shapes[:-1] or shapes)
    a, b = torch.randn(rows, width, dtype=torch_dtype), torch.randn(rows, width, dtype=torch_dtype)
    return CpuRates(flops / seconds, _seconds_per_call(lambda: torch.add(a, b, out=a), 0.02) / (rows * width))


def _seconds_per_call(call, at_least: float = 0.005) -> float:
    """Mean seconds of `call` after a warm-up (allocation, thread start), over at least
    `at_least` seconds: long enough to average over the scheduler's slices on a busy machine."""
    call()
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < at_least or calls < 2:
        call()
        calls += 1
    return elapsed / calls


def probe_shapes(arch: Architecture, tokens: int) -> tuple[tuple[tuple[int, int, int], ...], int]:
    """(the distinct matmul shapes of a forward pass with their uses, rows) for cpu_probe: each
    decoder linear, and last a slice of the LM head (4,096 of its vocabulary) that stands for all
    of it. Rows shrink for big models so a probe stays under PROBE_FLOPS_PER_PASS."""
    uses: dict[tuple[int, int], int] = {}
    for lin in arch.linears:
        uses[(lin.in_features, lin.out_features)] = uses.get((lin.in_features, lin.out_features), 0) + arch.layers
    head_slice = min(arch.vocab, 4096)
    per_row = 2 * (sum(n_in * n_out for n_in, n_out in uses) + arch.hidden * head_slice)
    rows = max(16, min(tokens, 256, int(PROBE_FLOPS_PER_PASS / per_row)))
    head = (arch.hidden, head_slice, math.ceil(arch.vocab / head_slice))
    return tuple((n_in, n_out, n) for (n_in, n_out), n in uses.items()) + (head,), rows


# ---------------------------------------------------------------- speed


def flops_per_token(arch: Architecture, seq: int, full: bool, adapter_params: int, skip_masked: bool,
                    checkpointing: bool, head_recomputed: bool) -> float:
    """FLOPs of one token through forward and backward. N = the weights of every matmul (decoder
    linears + lm_head); A = 2 x layers x heads x head_dim x seq, the attention of a causal token
    when the kernel skips the masked half (flash attention, SDPA on a GPU), twice that otherwise.
    Full: 3 x (2N + A) (forward, input and weight gradients). LoRA: 2N + 2N (input gradients
    only: the base is frozen) + 3A + 6 per adapter weight. Checkpointing repeats the decoder's
    forward; a trained head under the chunked loss computes its logits again in the backward."""
    matmul = arch.layers * sum(lin.in_features * lin.out_features for lin in arch.linears) + arch.vocab * arch.hidden
    attention = 2 * arch.layers * arch.heads * arch.head_dim * seq * (1 if skip_masked else 2)
    forward = 2 * matmul + attention
    flops = 3 * forward if full else 4 * matmul + 3 * attention + 6 * adapter_params
    if checkpointing:
        flops += forward - 2 * arch.vocab * arch.hidden
    if head_recomputed:
        flops += 2 * arch.vocab * arch.hidden
    return flops


def cpu_step_elements(arch: Architecture, tokens: int, seq: int, targets: list[Linear], trained_params: int,
                      softcapped: bool, checkpointing: bool) -> float:
    """Elements that the elementwise ops of one CPU step read and write (see CPU_ELEMENTS_*)."""
    per_layer = (CPU_ELEMENTS_PER_HIDDEN * arch.hidden + CPU_ELEMENTS_PER_INTERMEDIATE * arch.intermediate
                 + CPU_ELEMENTS_PER_ADAPTER * sum(lin.in_features + lin.out_features for lin in targets)
                 + CPU_ELEMENTS_PER_SCORE * arch.heads * seq)
    if checkpointing:  # the forward again: about a third of forward + backward
        per_layer *= 4 / 3
    logit = CPU_ELEMENTS_PER_SOFTCAPPED_LOGIT if softcapped else CPU_ELEMENTS_PER_LOGIT
    return tokens * (arch.layers * per_layer + logit * arch.vocab) + CPU_ELEMENTS_PER_TRAINED_PARAM * trained_params


def cpu_step_seconds(flops: float, elements: float, tokens: int, rates: CpuRates, layers: int = 0) -> float:
    """One step on the CPU: its matmuls at the probe's FLOP/s, its elementwise work at the probe's
    seconds per element, the dispatch of each layer's ops and the Trainer's bookkeeping."""
    return (tokens * flops / rates.matmul_flops + elements * rates.element_seconds
            + CPU_SECONDS_PER_LAYER * layers + CPU_SECONDS_PER_STEP)


def cpu_range(middle: float) -> tuple[float, float]:
    return middle / (1 + CPU_UNCERTAINTY), middle * (1 + CPU_UNCERTAINTY)


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
    predicted_tokens_per_s: float  # the middle of tokens_per_s_range
    device: str
    assumed_mfu: float  # GPUs; 0 on the CPU, whose speed is measured by the probe
    tokens_per_s_range: tuple[float, float] = (0.0, 0.0)
    probe_flops: float = 0.0  # CPU: the matmul FLOP/s the probe measured at the model's shapes
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


def _config_value(model_config, key: str):
    return model_config.get(key) if isinstance(model_config, dict) else getattr(model_config, key, None)


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


def estimate(run_config: RunConfig, model_config: Any, device: str = "H100", cpu_rates: CpuRates | None = None) -> Estimate:
    """Predict peak memory (GiB, by part) and tokens/s of `run_config` on `device`.

    `model_config` is the model's `PretrainedConfig` or its config.json as a dict. The
    formulas are in this module's docstring; assumptions land in `Estimate.notes`. On the CPU
    the speed comes from `cpu_rates`, measured by `cpu_probe` when not given (tests pass fixed ones).
    """
    arch = read_architecture(model_config)
    dev = get_device(device)
    method, train, lora = run_config.method, run_config.train, run_config.method.lora
    if train.gradient_checkpointing == "auto":
        # as the runner decides: no checkpointing when the run fits the device without it
        def fixed(value: bool) -> RunConfig:
            return run_config.model_copy(update={"train": train.model_copy(update={"gradient_checkpointing": value})})

        result = estimate(fixed(False), model_config, device, cpu_rates)
        if dev.cuda and result.total > dev.memory_gib * 0.9:
            result = estimate(fixed(True), model_config, device, cpu_rates)
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
    from vitune.models.chunked_loss import CHUNKED_ARCHITECTURES  # lazy: it imports torch

    softcapped = bool(_config_value(model_config, "final_logit_softcapping"))
    head_trains = full or any(name in (arch.embed_name, "lm_head") for name in saved_modules)
    chunked = model_config_type(model_config) in CHUNKED_ARCHITECTURES
    flops = flops_per_token(arch, seq, full, trainable, skip_masked=dev.cuda and not eager,
                            checkpointing=bool(train.gradient_checkpointing), head_recomputed=chunked and head_trains)
    if dev.cuda:
        def tokens_per_s(mfu: float) -> float:
            seconds = tokens * flops / (peak_flops * mfu)
            if qlora:
                seconds += (3 if train.gradient_checkpointing else 2) * 2.5 * linear_weights / dev.bandwidth
            return tokens / max(seconds, floor)

        floor = arch.layers * HOST_SECONDS_PER_LAYER[(not full, bool(train.gradient_checkpointing))]
        middle, probed = tokens_per_s(ASSUMED_MFU), 0.0
        speed_range = (tokens_per_s(MFU_RANGE[0]), tokens_per_s(MFU_RANGE[1]))
        notes.append(f"tokens/s assumes {ASSUMED_MFU:.0%} of {dev.name}'s {peak_flops / 1e12:.0f} TFLOP/s peak "
                     f"(the range: {MFU_RANGE[0]:.0%}-{MFU_RANGE[1]:.0%}, as measured on an H200)")
        if floor > tokens * flops / (peak_flops * ASSUMED_MFU):
            notes.append(
                f"host-bound: a step takes at least {floor:.2f} s of Python and kernel launches; "
                "more tokens per micro-batch would cost little extra time"
            )
    else:
        if cpu_rates is None:
            shapes, rows = probe_shapes(arch, tokens)
            cpu_rates = cpu_probe(shapes, rows, dtype, weight_gradients=full)
        trained = total_params if full else trainable + saved_params
        elements = cpu_step_elements(arch, tokens, seq, targets, trained, softcapped, bool(train.gradient_checkpointing))
        middle = tokens / cpu_step_seconds(flops, elements, tokens, cpu_rates, arch.layers)
        speed_range, probed = cpu_range(middle), cpu_rates.matmul_flops
        matmul_share = tokens * flops / cpu_rates.matmul_flops / (tokens / middle)
        notes.append(
            f"tokens/s from a probe of this machine: the run's matmuls in {dtype} at {probed / 1e9:.1f} GFLOP/s "
            f"({flops / 1e9:.2f} GFLOP per token, {matmul_share:.0%} of the step), elementwise work at "
            f"{cpu_rates.element_seconds * 1e9:.2f} ns per element; the range is ±{CPU_UNCERTAINTY:.0%}, "
            "what other processes on the machine can take or give back"
        )
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
        if load > cores:
            notes.append(f"this machine is busy (load average {load:.1f} on {cores} cores): other processes' "
                         "share of it changes from one minute to the next, and the run's speed with it")

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
        predicted_tokens_per_s=middle,
        device=dev.name,
        assumed_mfu=ASSUMED_MFU if dev.cuda else 0.0,
        tokens_per_s_range=speed_range,
        probe_flops=probed,
        notes=notes,
    )
