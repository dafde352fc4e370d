"""The formulas of classic PPO for language models (InstructGPT's RLHF step), as plain functions of
tensors, so that each can be tested against a hand-computed value.

Shapes: (B, T) = rollout rows x completion tokens; `mask` is 1 on a completion's tokens and 0 on
the padding after it ends. A completion is one episode: token t is an action, the reward is
-beta x KL(t) on every token plus the rewards' score on the last one, and the episode ends after
the last token (its next value is 0).

Every mean here is over the tokens of the whole rollout batch, across processes: `total` (by
default the identity) sums a tensor over the processes, so N processes compute what one process
computes over the same rows.
"""

from __future__ import annotations

from typing import Callable

import torch

Reduce = Callable[[torch.Tensor], torch.Tensor]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """The KL of the policy to the reference, estimated on each sampled token (Schulman, "Approximating
    KL divergence", 2020): k1 = log pi - log ref (unbiased, can be negative: InstructGPT's penalty);
    k3 = (r - 1) - log r with r = ref / pi (unbiased and never negative)."""
    log_ratio = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_ratio
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r} (k1 or k3)")


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-token rewards: -beta x KL on every completion token, and each row's score added on its
    last token. scores: (B,), kl and mask: (B, T); every row has at least one token."""
    rewards = -beta * kl * mask
    last = mask.sum(dim=1).long() - 1
    rewards[torch.arange(rewards.shape[0]), last] += scores
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) -> (advantages, returns), both (B, T):
    delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}, returns = A + V; the
    value after a row's last token is 0 (the episode ends), and padding stays 0."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    following = torch.zeros_like(rewards[:, 0])  # A_{t+1}
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(following)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        following = (delta + gamma * lam * following) * mask[:, t]
        advantages[:, t] = following
    return advantages, (advantages + values) * mask


def masked_mean(x: torch.Tensor, mask: torch.Tensor, total: Reduce = _local) -> torch.Tensor:
    """Mean of x over the tokens where mask is 1, over every process."""
    parts = total(torch.stack([(x * mask).sum(), mask.sum()]).to(torch.float64))
    return (parts[0] / parts[1].clamp(min=1)).to(x.dtype)


def masked_var(x: torch.Tensor, mask: torch.Tensor, total: Reduce = _local) -> torch.Tensor:
    """Unbiased variance of x over the tokens where mask is 1, over every process."""
    parts = total(torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()]).to(torch.float64))
    n = parts[2].clamp(min=2)
    mean = parts[0] / n
    return ((parts[1] / n - mean * mean) * n / (n - 1)).clamp(min=0).to(x.dtype)


def whiten(x: torch.Tensor, mask: torch.Tensor, total: Reduce = _local) -> torch.Tensor:
    """(x - mean) / std over the masked tokens of every process; 0 on padding."""
    mean, var = masked_mean(x, mask, total), masked_var(x, mask, total)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                cliprange: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token -> (loss, clipped): max(-A r, -A clip(r, 1-e, 1+e)) with
    r = pi / pi_old, and 1.0 where the clipped term was the larger (the clip fraction's numerator)."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).to(logprobs.dtype)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               cliprange_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped value loss per token -> (loss, clipped): 0.5 max((V - R)^2, (V_clip - R)^2) with
    V_clip = V_old + clip(V - V_old, -e, e), and 1.0 where the clipped term was the larger."""
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    return 0.5 * torch.maximum(unclipped, clipped), (clipped > unclipped).to(values.dtype)


def approx_kl(logprobs: torch.Tensor, old_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(pi_old || pi) per token, by the k3 estimator with r = pi / pi_old: (r - 1) - log r. The early
    stop compares its mean with rl.target_kl."""
    log_ratio = logprobs - old_logprobs
    return torch.expm1(log_ratio) - log_ratio


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each position's next-token distribution (nats), (B, T, V) -> (B, T)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       total: Reduce = _local) -> float:
    """1 - Var(returns - values) / Var(returns) over the masked tokens: 1 = the value head predicts the
    returns exactly, 0 = no better than their mean, negative = worse."""
    var_returns = masked_var(returns, mask, total)
    if float(var_returns) == 0:
        return 0.0
    return float(1 - masked_var(returns - values, mask, total) / var_returns)
