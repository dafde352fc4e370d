"""PPO's formulas (vitune.train.ppo_math) against values computed by hand or by the textbook formula
written out here, independently of the module."""

from __future__ import annotations

import math

import pytest
import torch

from vitune.train import ppo_math as F
from vitune.train.ppo import minibatch_rows, pack_rollout, rollout_seeds

MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])  # row 0: three tokens; row 1: one, then padding


def test_gae_and_returns_on_a_hand_computed_trajectory():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 7.0, 7.0]])  # padding's values are ignored
    values = torch.tensor([[0.1, 0.2, 0.3], [0.4, 9.0, 9.0]])
    advantages, returns = F.gae(rewards, values, MASK, gamma=0.9, lam=0.8)
    # row 0, backwards: d2 = 1 - 0.3 = 0.7; d1 = 0.9*0.3 - 0.2 = 0.07, A1 = 0.07 + 0.72*0.7 = 0.574;
    # d0 = 0.9*0.2 - 0.1 = 0.08, A0 = 0.08 + 0.72*0.574 = 0.49328. Row 1 ends at once: d0 = 0.5 - 0.4
    expected = torch.tensor([[0.49328, 0.574, 0.7], [0.1, 0.0, 0.0]])
    assert torch.allclose(advantages, expected, atol=1e-6)
    assert torch.allclose(returns, torch.tensor([[0.59328, 0.774, 1.0], [0.5, 0.0, 0.0]]), atol=1e-6)


def test_gae_with_gamma_and_lambda_one_is_the_reward_to_go_minus_the_value():
    rewards = torch.tensor([[1.0, 2.0, 3.0]])
    values = torch.tensor([[0.5, 0.25, 0.125]])
    advantages, returns = F.gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    assert torch.allclose(returns, torch.tensor([[6.0, 5.0, 3.0]]))
    assert torch.allclose(advantages, torch.tensor([[5.5, 4.75, 2.875]]))


def test_token_rewards_put_the_kl_penalty_on_every_token_and_the_score_on_the_last():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.7, 0.0]])
    rewards = F.token_rewards(torch.tensor([2.0, -1.0]), kl, MASK, beta=0.1)
    assert torch.allclose(rewards, torch.tensor([[-0.01, -0.02, 1.97], [-1.05, 0.0, 0.0]]))


def test_kl_estimators():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert F.kl_per_token(logp, ref, "k1").item() == pytest.approx(math.log(2))  # log pi - log ref
    assert F.kl_per_token(logp, ref, "k3").item() == pytest.approx(0.5 - 1 - math.log(0.5))  # r - 1 - log r, r = 1/2
    assert F.kl_per_token(ref, logp, "k1").item() == pytest.approx(-math.log(2))  # k1 can be negative ...
    assert F.kl_per_token(ref, logp, "k3").item() == pytest.approx(2 - 1 - math.log(2))  # ... k3 cannot
    with pytest.raises(ValueError, match="k2"):
        F.kl_per_token(logp, ref, "k2")


@pytest.mark.parametrize("ratio, advantage, loss, clipped", [
    (1.5, 2.0, -2.4, 1.0),   # a good action pushed past 1 + eps: the clip holds it
    (1.5, -2.0, 3.0, 0.0),   # a bad action made likelier: the unclipped (larger) loss counts
    (0.5, 2.0, -1.0, 0.0),   # a good action made rarer: unclipped
    (0.5, -2.0, 1.6, 1.0),   # a bad action pushed below 1 - eps: clipped
    (1.1, 1.0, -1.1, 0.0),   # inside the range
])
def test_clipped_policy_loss(ratio, advantage, loss, clipped):
    old = torch.tensor([-1.0])
    new = old + math.log(ratio)
    got, was_clipped = F.policy_loss(new, old, torch.tensor([advantage]), cliprange=0.2)
    assert got.item() == pytest.approx(max(-advantage * ratio, -advantage * min(max(ratio, 0.8), 1.2)))
    assert got.item() == pytest.approx(loss)
    assert was_clipped.item() == clipped


@pytest.mark.parametrize("value, old, ret, loss, clipped", [
    (1.5, 1.0, 2.0, 0.32, 1.0),    # moved 0.5 towards the return: clipped at 1.2, whose error (0.8) is larger
    (1.1, 1.0, 2.0, 0.405, 0.0),   # inside the range: both terms equal
    (0.5, 1.0, 2.0, 1.125, 0.0),   # moved away: the unclipped error (1.5) is the larger
])
def test_clipped_value_loss(value, old, ret, loss, clipped):
    got, was_clipped = F.value_loss(torch.tensor([value]), torch.tensor([old]), torch.tensor([ret]), cliprange_value=0.2)
    vclip = old + min(max(value - old, -0.2), 0.2)
    assert got.item() == pytest.approx(0.5 * max((value - ret) ** 2, (vclip - ret) ** 2))
    assert got.item() == pytest.approx(loss)
    assert was_clipped.item() == clipped


def test_approx_kl_and_entropy():
    assert F.approx_kl(torch.tensor([math.log(1.5)]), torch.tensor([0.0])).item() == pytest.approx(0.5 - math.log(1.5))
    assert F.approx_kl(torch.tensor([-0.3]), torch.tensor([-0.3])).item() == 0.0
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]]])
    assert torch.allclose(F.entropy(logits), torch.tensor([[math.log(4), 0.0]]), atol=1e-6)


def test_whitening_and_explained_variance_over_the_masked_tokens():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    std = math.sqrt(5 / 3)  # unbiased, of 1, 2, 3, 4
    expected = torch.tensor([[-1.5 / std, -0.5 / std, 0.5 / std], [1.5 / std, 0.0, 0.0]])
    assert torch.allclose(F.whiten(x, mask), expected, atol=1e-5)
    assert F.explained_variance(x, x, mask) == pytest.approx(1.0)
    assert F.explained_variance(torch.zeros_like(x), x, mask) == pytest.approx(0.0)
    halves = torch.tensor([[2.0, 2.0, 3.0], [3.0, 0.0, 0.0]])  # errors -1, 0, 0, 1: variance 2/3 of 5/3
    assert F.explained_variance(halves, x, mask) == pytest.approx(1 - (2 / 3) / (5 / 3))


def test_means_over_processes_are_the_means_of_the_whole_batch():
    """`total` sums across processes: two halves give what the whole gives."""
    x = torch.tensor([[1.0, 2.0], [3.0, 10.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    other = torch.stack([(x[1:] * mask[1:]).sum(), mask[1:].sum()]).double()
    other_sq = torch.stack([(x[1:] * mask[1:]).sum(), (x[1:] ** 2 * mask[1:]).sum(), mask[1:].sum()]).double()

    def total(t):  # this process holds row 0, the other row 1
        return t + (other if t.numel() == 2 else other_sq)

    assert F.masked_mean(x[:1], mask[:1], total).item() == pytest.approx(2.0)
    assert F.masked_var(x[:1], mask[:1], total).item() == pytest.approx(1.0)


def test_minibatches_take_the_same_rows_of_every_micro_batch():
    order = torch.tensor([2, 0, 3, 1])
    assert minibatch_rows(8, 4, 2, 0, order).tolist() == [2, 0, 6, 4]
    assert minibatch_rows(8, 4, 2, 1, order).tolist() == [3, 1, 7, 5]
    assert minibatch_rows(4, 4, 1, 0, order).tolist() == [2, 0, 3, 1]
    # two processes, each holding one micro-batch (rows 0-3, 4-7), take together one process's rows
    two = set(minibatch_rows(4, 4, 2, 0, order).tolist()) | {4 + i for i in minibatch_rows(4, 4, 2, 0, order).tolist()}
    assert two == set(minibatch_rows(8, 4, 2, 0, order).tolist())


def test_rollout_rows_are_prompt_then_completion_right_padded():
    batch = pack_rollout([[5, 6], [7]], [[1, 2, 3], [4]], pad=0, device="cpu")
    assert batch["ids"].tolist() == [[5, 6, 1, 2, 3], [7, 4, 0, 0, 0]]
    assert batch["attention"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert batch["starts"].tolist() == [2, 1]
    assert batch["completion"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_rollout_seeds_number_the_rows_of_the_whole_step_and_held_out_seeds_stay_fixed():
    whole = rollout_seeds(42, 3, 0, 8)
    assert rollout_seeds(42, 3, 0, 4) + rollout_seeds(42, 3, 4, 4) == whole  # two processes, four rows each
    assert len(set(whole) | set(rollout_seeds(42, 4, 0, 8)) | set(rollout_seeds(42, -1, 0, 8))) == 24
    assert rollout_seeds(42, -1, 0, 3) == rollout_seeds(42, -1, 0, 3) != rollout_seeds(43, -1, 0, 3)
