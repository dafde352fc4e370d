"""The loss over the vocabulary, a chunk of tokens at a time: the logits of a whole batch are
never held at once (Gemma 3's 262,144-token vocabulary makes them 1 GiB per 1,024 tokens in fp32,
before their gradient).

    loss_path(model, liger) -> "liger" | "chunked" | "plain"      the one place that decides
    causal_lm_loss(model, batch, liger) -> what model(**batch) returns, its loss computed as decided
                                           (sft and pt, the held-out loss of training)
    token_logps(model, inputs, targets) -> log-probability of every scored token and its row
                                           (dpo's per-sequence log-probs, vitune eval's loss)
    next_tokens(batch) -> the token each position predicts (-100: none)

How: the model runs through its wrappers (DDP, DeepSpeed, PEFT) as it always does, with a forward
pre-hook on its LM head that takes the head's input -- the final hidden states, after the final
norm, at the positions the batch keeps (`logits_to_keep`) -- and hands the head an empty slice
instead. The head then runs here, on CHUNK_BYTES of fp32 logits at a time, followed by what the
architecture's forward does to its logits (Gemma 2 and 3: `final_logit_softcapping`), the upcast to
float32 and the cross-entropy at the scored tokens. Two ways through a chunk:

- a frozen plain `nn.Linear` head (LoRA and QLoRA leave it frozen: the usual case): one custom
  autograd Function computes the chunk's log-probabilities and, in the same pass, their gradient
  with respect to the hidden states ([tokens, hidden], small); its backward only scales that by the
  incoming gradient. No logits are kept and no head matmul is repeated: the FLOPs of the plain loss.
- a head that trains (full fine-tuning, trained tied embeddings, LoRA on lm_head,
  modules_to_save): each chunk under `torch.utils.checkpoint`, its logits recomputed in the
  backward (one more head matmul per chunk, for the weight's gradient).

Exact: the same operations in the same order as transformers' forward and loss, chunk by chunk;
tests/test_chunked_loss.py holds loss and gradients within 1e-5 of `model(...).loss` on Llama, Qwen2
and Gemma 3 (softcapped too), full and LoRA, packed and padded.

Hand-written because Liger's fused linear cross-entropy (train.liger_kernel), which does the same
with Triton kernels, runs only on NVIDIA GPUs and is not installable everywhere (no CPU build);
transformers has no chunked cross-entropy; and dpo needs per-token log-probabilities, not a sum.

Where this cannot be exact, the model's own forward computes the loss (`plain`): an architecture
whose forward does more to its logits than is repeated here (not in CHUNKED_ARCHITECTURES: e.g.
Cohere's logit scale, Mixtral's router loss), or weights sharded across processes (FSDP, DeepSpeed
ZeRO-3: the head's weight is whole only inside their forward).

It lives in models/, below both training (train/) and vitune eval, which score tokens with it.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint
from transformers.modeling_outputs import CausalLMOutputWithPast

from vitune.data.tokenize import IGNORE

# fp32 logits of one chunk: 256 tokens of a 262,144-token vocabulary, 2,048 of a 32,000-token one
CHUNK_BYTES = 2**28

# Architectures whose *ForCausalLM.forward (transformers 5.24) takes lm_head's output, softcaps it
# where True here and the config sets final_logit_softcapping, and returns the plain cross-entropy:
# exactly what this module repeats. Any other architecture computes its loss in its own forward.
CHUNKED_ARCHITECTURES = {
    "llama": False, "mistral": False, "qwen2": False, "qwen3": False, "phi3": False, "gemma": False,
    "bloom": False, "gemma2": True, "gemma3_text": True,
}

_LOSS_KEYS = ("labels", "shift_labels", "num_items_in_batch")  # for the loss, not the model's forward


# ---------------------------------------------------------------- which loss runs


def loss_path(model, liger: bool = False) -> str:
    """How the loss over the vocabulary of `model` (wrapped or not) is computed: "liger" when
    Liger's kernels are applied to it (train.liger_kernel: its patched forward fuses the head and
    the loss), else "chunked" where this module is exact, else "plain" (the model's forward)."""
    if liger:
        return "liger"
    return "chunked" if _chunked_head(model) is not None else "plain"


def _chunked_head(model):
    """(the LM head, its softcapping or None, the vocabulary size) of a model this module can
    score, through DDP, DeepSpeed, FSDP and PEFT wrappers; None where it cannot."""
    inner = model
    while isinstance(getattr(inner, "module", None), torch.nn.Module):  # DDP, DeepSpeed's engine, FSDP1
        if isinstance(inner, FullyShardedDataParallel):
            return None
        inner = inner.module
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner  # PEFT
    config = getattr(base, "config", None)
    softcaps = CHUNKED_ARCHITECTURES.get(getattr(config, "model_type", None))
    head = base.get_output_embeddings() if softcaps is not None else None
    if head is None:
        return None
    weight = next(head.parameters(), None)
    if weight is None or isinstance(weight, DTensor) or hasattr(weight, "ds_id"):  # FSDP2, ZeRO-3: sharded
        return None
    softcap = getattr(config, "final_logit_softcapping", None) if softcaps else None
    return head, softcap, config.vocab_size


# ---------------------------------------------------------------- what the callers take


def next_tokens(batch: dict) -> torch.Tensor:
    """The token each position of the head's input predicts, -100 where none is scored: the batch's
    `shift_labels` (already shifted and cut to `logits_to_keep`), else its `labels` shifted left."""
    if "shift_labels" in batch:
        return batch["shift_labels"]
    return F.pad(batch["labels"][..., 1:], (0, 1), value=IGNORE)


def causal_lm_loss(model, batch: dict, liger: bool = False):
    """What `model(**batch)` returns for a causal LM with labels, as transformers defines its loss:
    the cross-entropy summed over the scored tokens and divided by `num_items_in_batch` (when the
    batch holds it) or by their count. Computed in chunks where `loss_path` says so: the output then
    holds the loss alone."""
    if loss_path(model, liger) != "chunked":
        return model(**batch)
    inputs = {k: v for k, v in batch.items() if k not in _LOSS_KEYS}
    logps, _ = token_logps(model, inputs, next_tokens(batch))
    total = -logps.sum()
    items = batch.get("num_items_in_batch")
    if items is None:
        items = len(logps)  # transformers' mean over the scored tokens (NaN without any, as there)
    elif torch.is_tensor(items):
        items = items.to(total.device)
    return CausalLMOutputWithPast(loss=total / items)


def token_logps(model, inputs: dict, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's log-probability (float32) of every scored token, and the row of `targets` it is
    in: `inputs` are the model's keyword arguments (with `logits_to_keep` where the batch cuts the
    head's input), `targets` what each position of the head's input predicts (`next_tokens`)."""
    scored = targets != IGNORE
    rows = scored.nonzero()[:, 0]
    found = _chunked_head(model)
    if found is None:  # the model's own logits, all at once
        logits = model(**inputs).logits
        return -F.cross_entropy(logits[scored].float(), targets[scored], reduction="none"), rows
    head, softcap, vocab = found
    with _taking_head_input(head) as taken:
        model(**inputs)
    if not taken:
        raise RuntimeError(f"{type(head).__name__}: the model's forward never called its output embeddings")
    scored = scored.to(taken[0].device)
    hidden, targets = taken[0][scored], targets.to(taken[0].device)[scored]
    chunk = max(1, CHUNK_BYTES // (4 * vocab))  # tokens
    params = list(head.parameters())
    if type(head) is torch.nn.Linear and not any(p.requires_grad for p in params):
        return _FrozenHeadLogps.apply(hidden, head.weight, head.bias, targets, softcap, chunk), rows
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in params))
    parts = []
    for start in range(0, len(targets), chunk):
        h, t = hidden[start:start + chunk], targets[start:start + chunk]
        if needs_grad and len(targets) > chunk:  # one chunk: nothing to save by recomputing it
            parts.append(checkpoint(_head_logps, head, softcap, h, t, use_reentrant=False))
        else:
            parts.append(_head_logps(head, softcap, h, t))
    return (torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)), rows


# ---------------------------------------------------------------- chunks


@contextmanager
def _taking_head_input(head):
    """Within the block, the LM head's input is appended to the yielded list and the head gets an
    empty slice of it instead: the model's forward runs whole (through its wrappers), logits empty."""
    taken = []

    def take(module, args):
        taken.append(args[0])
        return (args[0][..., :0, :], *args[1:])

    handle = head.register_forward_pre_hook(take)
    try:
        yield taken
    finally:
        handle.remove()


def _head_logps(head, softcap, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """One chunk as transformers computes it: head, softcapping, float32, log-softmax at the targets
    (as the logit minus the log-sum-exp, as `_FrozenHeadLogps` does: a policy and its frozen
    reference with the same weights get the very same numbers, whichever way each takes)."""
    logits = head(hidden)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits.float()
    return (logits.gather(1, targets.unsqueeze(1)) - torch.logsumexp(logits, dim=-1, keepdim=True)).squeeze(1)


class _FrozenHeadLogps(torch.autograd.Function):
    """log p(target) per token through a frozen linear head, chunk by chunk, with d log p / d hidden
    computed in the same pass (the head's weight takes no gradient): the backward scales it."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, softcap, chunk):
        logps = torch.empty(len(targets), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, len(targets), chunk):
            rows = slice(start, start + chunk)
            t = targets[rows].unsqueeze(1)
            z = F.linear(hidden[rows], weight, bias)
            if softcap is not None:  # as the forward: z / c, tanh, * c (in place, the same values)
                capped = z.div_(softcap).tanh_()
                z = capped * softcap
            logits = z.float()
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)
            logps[rows] = (logits.gather(1, t) - lse).squeeze(1)
            if grad is None:
                continue
            g = logits.sub_(lse).exp_().neg_()  # -softmax, in place: d log p / d logits = onehot - softmax
            g.scatter_add_(1, t, torch.ones_like(t, dtype=g.dtype))
            g = g.to(hidden.dtype)
            if softcap is not None:  # d (c tanh(z / c)) / dz = 1 - tanh^2
                g.mul_(capped.square_().neg_().add_(1))
            grad[rows] = g @ weight
        ctx.save_for_backward(grad)
        return logps

    @staticmethod
    def backward(ctx, grad_logps):
        (grad,) = ctx.saved_tensors
        return grad * grad_logps.unsqueeze(1).to(grad.dtype), None, None, None, None, None
