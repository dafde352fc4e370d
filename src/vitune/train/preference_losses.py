"""The preference losses of stage dpo, as functions of sequence log-probabilities.

Every function takes the summed log-probabilities of each answer's trained tokens under the
policy (`chosen`, `rejected`), their token counts and, where the loss has one, the same sums
under the reference model, and returns the loss of the micro-batch (the mean over its pairs)
and the implicit rewards logged as rewards/chosen and rewards/rejected. The formulas and
their batch conventions are TRL 1.16's (tests/test_preference_oracle.py checks loss and
gradients against TRL's trainers in fp32); the papers:

- sigmoid  DPO, Rafailov et al. 2023 (arXiv 2305.18290); `label_smoothing` = conservative
           DPO (Mitchell 2023): -(1-e) log s(b d) - e log s(-b d)
- ipo      IPO, Azar et al. 2023 (arXiv 2310.12036), on per-token average log-ratios
- hinge    SLiC-HF's hinge loss, Zhao et al. 2023 (arXiv 2305.10425): relu(1 - b d)
- orpo     ORPO, Hong et al. 2024 (arXiv 2403.07691): NLL of chosen + b * odds-ratio term; no reference
- simpo    SimPO, Meng et al. 2024 (arXiv 2405.14734): average log-probs, margin gamma; no reference
- kto      KTO, Ethayarajh et al. 2024 (arXiv 2402.01306): desirable / undesirable answers against
           a KL estimate from mismatched prompt/answer pairs

Hand-written rather than called from TRL: TRL computes these inside its trainers on padded
batches; vitune's trainer feeds packed, padding-free batches to the same formulas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

NEEDS_REFERENCE = {"sigmoid": True, "ipo": True, "hinge": True, "orpo": False, "simpo": False, "kto": True}


@dataclass
class PairLoss:
    loss: torch.Tensor  # scalar: the micro-batch's loss
    chosen_rewards: torch.Tensor  # per pair (detached)
    rejected_rewards: torch.Tensor


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation (branch at -ln 2, Maechler 2012)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def pair_loss(kind: str, beta: float, chosen: torch.Tensor, rejected: torch.Tensor, chosen_tokens: torch.Tensor,
              rejected_tokens: torch.Tensor, ref_chosen: torch.Tensor | None = None,
              ref_rejected: torch.Tensor | None = None, *, label_smoothing: float = 0.0, simpo_gamma: float = 0.5,
              chosen_nll: torch.Tensor | None = None) -> PairLoss:
    """The loss of one micro-batch of pairs. `chosen_nll`: ORPO's NLL term, the mean negative
    log-probability over every chosen token of the micro-batch."""
    if kind in ("sigmoid", "ipo", "hinge"):
        chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
        if kind == "ipo":
            delta = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
            losses = (delta - 1 / (2 * beta)) ** 2
        else:
            delta = chosen_ratio - rejected_ratio
            if kind == "hinge":
                losses = torch.relu(1 - beta * delta)
            else:
                losses = -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)
        return PairLoss(losses.mean(), beta * chosen_ratio.detach(), beta * rejected_ratio.detach())
    chosen_avg = chosen / chosen_tokens.clamp(min=1)
    rejected_avg = rejected / rejected_tokens.clamp(min=1)
    if kind == "orpo":
        log_odds = (chosen_avg - rejected_avg) - (log1mexp(chosen_avg) - log1mexp(rejected_avg))
        loss = chosen_nll - beta * F.logsigmoid(log_odds).mean()
        return PairLoss(loss, beta * chosen_avg.detach(), beta * rejected_avg.detach())
    if kind == "simpo":
        logits = (chosen_avg - rejected_avg) - simpo_gamma / beta
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * logits) - label_smoothing * F.logsigmoid(-beta * logits)
        return PairLoss(losses.mean(), beta * chosen_avg.detach(), beta * rejected_avg.detach())
    raise ValueError(f"unknown preference loss {kind!r}")


def kto_loss(beta: float, logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor,
             kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KTO on one micro-batch of answers -> (loss, rewards per answer (detached), kl).

    The KL estimate is the mean log-ratio of mismatched prompt/answer sequences, detached and
    clamped at 0; the loss is the mean over every answer of its weighted loss."""
    kl = (kl_logps - ref_kl_logps).mean().detach().clamp(min=0)
    ratio = logps - ref_logps
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))))
    return losses.mean(), beta * ratio.detach(), kl
