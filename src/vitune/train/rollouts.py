"""RL rollouts: sample one completion per prompt from the policy being trained, fast and reproducibly.

`sample_completions` is what GRPO/RLOO (train/stages/rl.py) and PPO generate with instead of TRL's
regular path (`GRPOTrainer._generate_single_turn`: a left-padded `model.generate`).

Where TRL's path spends a decode step (`python benchmarks/rl_rollouts.py --profile`: cProfile of
`GRPOTrainer._generate_single_turn`, SmolLM2-135M-Instruct fp32 with a new LoRA of r 16 on all 7
linear modules x 30 layers, one batch of 8, 48 decode steps, 2 CPU cores shared with other jobs):
- 631 `F.linear` calls a step: 210 base weights, 420 LoRA A and B (two thirds of the calls for a
  fraction of a percent of the FLOPs) and the LM head; `lora.Linear.forward` (base matmul, dropout,
  A, B, scale, add) holds 89% of the time cumulatively, the model forward 99%;
- `generate`'s own per-step work (logits processors, stopping criteria, cache bookkeeping): 1%;
  `torch.cat` (124 calls a step: the cache and the mask growing): 4%; attention (SDPA): 2%;
- on a CPU each small op pays dispatch and thread-synchronisation costs that do not shrink with its
  size, so the number of ops, not the FLOPs, sets a step's time; on a busy host every op may also
  wait for a time slice (11.9 s a step then, against the ~0.18 s the issue measured on a quieter one);
- rows that finished early are still computed until the last row ends.

What this module does about it; together 2.88x TRL's generated tokens/s (benchmarks/rl_rollouts.py,
one torch thread a process on a busy 2-core host, RESULTS.md): the merged LoRA alone (in `generate`)
1.11x, the decode loop alone (over the unmerged LoRA) 1.36x -- the two multiply, since with the LoRA
ops gone `generate`'s per-step work is a larger share of what is left:
- the LoRA update is merged into each base weight for the rollout (the original weight tensors are
  kept and put back afterwards, so the base stays bit-identical -- PEFT's unmerge subtracts and
  leaves rounding error); 4-bit/8-bit (QLoRA) layers, DoRA and LoRA biases are left unmerged. The
  cost is memory: during a rollout the adapted weights exist twice (SmolLM2-135M in fp32: 106 M
  weights, 0.42 GB more);
- a plain decode loop: one prefill of the left-padded prompts (logits of the last position only),
  then one forward per step over the KV cache with an explicit attention mask and position ids;
- rows that finished leave the batch and the cache (and columns that became padding in every row);
  unmeasured in the benchmark, where every completion ran to its 48 tokens;
- each row samples with its own `torch.Generator`, so a completion depends on (weights, prompt,
  seed) and not on the batch it ran in -- up to the float rounding that a different batch shape can
  give a matmul (~1e-6 on a logit), which flips a sampled token only when a draw lands within that
  distance of a boundary. Merged weights round differently from the unmerged forward that scores
  the completion afterwards by the same ~1e-6: sampling is from the same policy as far as float
  arithmetic goes.

The KV cache is the one `vitune serve` batches (models/kv_cache.py): sliding-window models (Mistral,
Gemma 2/3) get a cache that keeps every key and the model's own masks apply the windows. Models
whose cache cannot be left-padded (linear attention, ...) decode each row alone, which needs no padding.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Iterator

import torch

from vitune.models.kv_cache import attention_windows, drop_columns, keep_rows, prefill_cache
from vitune.models.loading import cache_keyword


def sample_completions(model, prompt_ids: list[list[int]], seeds: list[int], *, max_new_tokens: int,
                       eos_ids: list[int], pad_id: int, temperature: float = 1.0, top_p: float = 1.0,
                       top_k: int = 0) -> list[list[int]]:
    """Sample one completion per prompt row; row i draws its random numbers from its own
    torch.Generator seeded with seeds[i], so a completion depends only on (model weights, prompt, seed),
    never on which other rows share the batch, the batch size, or the process. Each returned list ends with
    the eos id it stopped on (included) or has max_new_tokens ids.

    `model`: a transformers causal LM or a PEFT model of one (unwrapped from DDP/accelerate by the
    caller), in train or eval mode, gradient checkpointing on or off: it runs in eval mode, without
    gradients, with the KV cache, and every module's train/eval state is put back afterwards.
    Sampling applies temperature, then top_k (0: off), then top_p (1: off), as transformers does."""
    if len(seeds) != len(prompt_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(seeds)} seeds: one seed per prompt row")
    if not prompt_ids or max_new_tokens <= 0:
        return [[] for _ in prompt_ids]
    with rollout_mode(model) as decoder:
        device = next(decoder.parameters()).device
        generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        decode = lambda rows: _decode(decoder, [prompt_ids[i] for i in rows], [generators[i] for i in rows],  # noqa: E731
                                      max_new_tokens, set(eos_ids), pad_id, (temperature, top_p, top_k))
        if attention_windows(decoder) or getattr(decoder, "config", None) is None:
            return decode(range(len(prompt_ids)))
        # a cache of another kind (linear attention, ...) cannot be left-padded: one row at a time
        return [decode([i])[0] for i in range(len(prompt_ids))]


def row_seeds(*key: int, rows: int) -> list[int]:
    """One seed per row from a key of integers (run seed, step, process, ...): the first 63 bits of
    SHA-256 over the key and the row number, so that nearby keys give unrelated streams."""
    return [int.from_bytes(hashlib.sha256(repr((*key, row)).encode()).digest()[:8], "little") >> 1 for row in range(rows)]


@contextlib.contextmanager
def rollout_mode(model) -> Iterator[torch.nn.Module]:
    """The model ready to decode (eval mode, LoRA merged where it can be) -> the module to call.
    On exit every module's train/eval flag and every base weight are restored exactly."""
    training = [(module, module.training) for module in model.modules()]
    model.eval()  # no dropout; transformers' gradient checkpointing only runs in train mode
    merged = _merge_lora(model)
    try:
        # with a PEFT model the LoRA layers sit inside its base model: calling that skips PEFT's wrapper
        yield model.get_base_model() if hasattr(model, "get_base_model") else model
    finally:
        for module, weight in merged:
            module.base_layer.weight.data = weight
            module.merged_adapters = []
        for module, mode in training:
            module.training = mode


def _merge_lora(model) -> list[tuple[torch.nn.Module, torch.Tensor]]:
    """Point each mergeable LoRA linear at a new weight W + delta and mark it merged (its forward is then
    the base layer alone) -> [(module, original weight tensor)] to put back. The original tensors are
    not written to. Left as they are: quantized base layers (their class is not lora.Linear), DoRA
    (its magnitude is not a weight delta) and LoRA biases."""
    try:
        from peft.tuners.lora import Linear
    except ImportError:  # no PEFT: no adapters to merge
        return []
    merged = []
    with torch.no_grad():
        for module in model.modules():
            if type(module) is not Linear or module.merged or module.disable_adapters:
                continue
            active = [a for a in module.active_adapters if a in module.lora_A]
            if not active or any(module.use_dora.get(a) or getattr(module, "lora_bias", {}).get(a) for a in active):
                continue
            weight = module.base_layer.weight.data
            if not weight.is_floating_point():
                continue
            delta = sum(module.get_delta_weight(a) for a in active)
            module.base_layer.weight.data = weight + delta.to(weight.dtype)
            module.merged_adapters = list(active)
            merged.append((module, weight))
    return merged


def _decode(decoder, prompts: list[list[int]], generators: list[torch.Generator], max_new_tokens: int,
            eos_ids: set[int], pad_id: int, sampling: tuple[float, float, int]) -> list[list[int]]:
    """Prefill the prompts left-padded together, then one forward per step over the KV cache until
    every row has stopped -> each row's completion (its eos included)."""
    device = next(decoder.parameters()).device
    keyword = cache_keyword()
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt):] = torch.tensor(prompt, device=device)
        mask[i, width - len(prompt):] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    completions: list[list[int]] = [[] for _ in prompts]
    rows = list(range(len(prompts)))  # the prompt index of each running row, in cache order
    with torch.no_grad():
        out = decoder(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                      **prefill_cache(attention_windows(decoder), keyword))
        cache, positions = getattr(out, keyword), positions[:, -1] + 1
        while True:
            tokens = sample_rows(out.logits[:, -1].float(), [generators[r] for r in rows], *sampling)
            going = []
            for i, (row, token) in enumerate(zip(rows, tokens)):
                completions[row].append(token)
                if token not in eos_ids and len(completions[row]) < max_new_tokens:
                    going.append(i)
            if not going:
                return completions
            if len(going) < len(rows):  # finished rows leave the batch, and their cache with them
                index = torch.tensor(going, device=device)
                keep_rows(cache, index)
                rows, mask, positions = [rows[i] for i in going], mask[index], positions[index]
                padding = int((mask.sum(0) > 0).nonzero()[0])  # columns that are padding in every row left
                mask = mask[:, padding:]
                drop_columns(cache, padding)
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
            step_ids = torch.tensor([[completions[r][-1]] for r in rows], device=device)
            out = decoder(input_ids=step_ids, attention_mask=mask, position_ids=positions[:, None], use_cache=True,
                          **{keyword: cache})
            positions = positions + 1


def sample_rows(logits: torch.Tensor, generators: list[torch.Generator], temperature: float = 1.0,
                top_p: float = 1.0, top_k: int = 0) -> list[int]:
    """One token per row of `logits` [rows, vocab], row i drawn with generators[i]; transformers' own
    warpers in its order (temperature, top-k, top-p), each skipped at its neutral value as `generate` does."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    if temperature != 1.0:
        logits = TemperatureLogitsWarper(temperature)(None, logits)
    if top_k:
        logits = TopKLogitsWarper(top_k)(None, logits)
    if top_p < 1.0:
        logits = TopPLogitsWarper(top_p)(None, logits)
    probs = torch.softmax(logits, dim=-1)
    return [int(torch.multinomial(p, 1, generator=g)) for p, g in zip(probs, generators)]
