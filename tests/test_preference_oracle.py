"""vitune's preference losses against TRL 1.16's trainers, the oracle (tests/trl_oracle.py).

On fixed batches of a tiny random Llama in fp32, vitune's loss (its packed, padding-free
batch: every sequence of the micro-batch in one row) and the gradients of every parameter
equal TRL's (padded batches, TRL's own collators and compute_loss) within 1e-5.
"""

from __future__ import annotations

import contextlib
import copy
import random

import pytest
import torch

pytest.importorskip("trl")

from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments  # noqa: E402

from trl_oracle import trl_kto_loss, trl_preference_loss  # noqa: E402
from vitune.config import DpoConfig  # noqa: E402
from vitune.data.tokenize import IGNORE  # noqa: E402
from vitune.models.attention import packed_attention  # noqa: E402
from vitune.train.pairs import PreferenceCollator
from vitune.train.stages.dpo import PreferenceTrainer  # noqa: E402

TOLERANCE = 1e-5


def _pairs(vocab: int, n: int = 3, prompt_tokens=None, seed: int = 0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p = prompt_tokens or rng.randint(3, 9)
        out.append(([rng.randrange(4, vocab) for _ in range(p)],
                    [rng.randrange(4, vocab) for _ in range(rng.randint(2, 8))],
                    [rng.randrange(4, vocab) for _ in range(rng.randint(2, 8))]))
    return out


def _sequence(prompt, answer):
    return (prompt + answer, [IGNORE] * len(prompt) + answer)


@pytest.fixture(scope="module")
def models(tiny_models):
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32)
    reference = copy.deepcopy(policy)
    with torch.no_grad():  # a reference that differs from the policy, so the log-ratios are not 0
        for p in reference.parameters():
            p.add_(0.02 * torch.randn_like(p))
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    return policy, reference.eval(), tokenizer


def _vitune(model, reference, items, settings, tmp_path, kto=False, packed=True, shared=True):
    args = TrainingArguments(output_dir=str(tmp_path / "vitune"), use_cpu=True, report_to="none",
                             per_device_train_batch_size=len(items))
    trainer = PreferenceTrainer(model=model, args=args, settings=settings, reference_model=reference)
    batch = PreferenceCollator(packed=packed, pad_token_id=0, kto=kto, share_prompt=shared)(items)
    model.train()
    with packed_attention(model) if packed else contextlib.nullcontext():
        return trainer.compute_loss(model, batch)


def _grads(model, loss) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def _assert_same(ours, theirs, model, relative=False):
    ours_grads = _grads(model, ours)
    theirs_grads = _grads(model, theirs)
    scale = max(1.0, abs(float(theirs))) if relative else 1.0
    assert abs(float(ours) - float(theirs)) <= TOLERANCE * scale, (float(ours), float(theirs))
    assert ours_grads.keys() == theirs_grads.keys() and ours_grads
    worst = max(float((ours_grads[k] - theirs_grads[k]).abs().max()) for k in ours_grads)
    assert worst <= TOLERANCE * scale, worst


@pytest.mark.parametrize("loss,beta", [("sigmoid", 0.1), ("hinge", 0.1), ("ipo", 0.5), ("simpo", 2.0)])
@pytest.mark.parametrize("layout", ["shared prompt", "packed", "padded"])
def test_pair_losses_and_gradients_equal_trl(models, tmp_path, loss, beta, layout):
    """Every layout vitune trains with: one padding-free row with each pair's prompt run once
    (the default on SDPA), one row with every sequence whole (flash-attn's varlen), padded rows."""
    policy, reference, tokenizer = models
    pairs = _pairs(policy.config.vocab_size)
    items = [{"sequences": [_sequence(p, c), _sequence(p, r)], "margin": 0.0, "desirable": [True, False]}
             for p, c, r in pairs]
    settings = DpoConfig(loss=loss, beta=beta, simpo_gamma=0.5)
    ours = _vitune(policy, reference if loss != "simpo" else None, items, settings, tmp_path,
                   packed=layout != "padded", shared=layout == "shared prompt")
    theirs = trl_preference_loss(policy, tokenizer, pairs, loss, beta, simpo_gamma=0.5,
                                 ref_model=reference if loss != "simpo" else None)
    _assert_same(ours, theirs, policy, relative=loss == "ipo")


def test_simpo_label_smoothing_equals_trl(models, tmp_path):
    policy, _, tokenizer = models
    pairs = _pairs(policy.config.vocab_size, seed=3)
    items = [{"sequences": [_sequence(p, c), _sequence(p, r)], "margin": 0.0, "desirable": [True, False]}
             for p, c, r in pairs]
    ours = _vitune(policy, None, items, DpoConfig(loss="simpo", beta=2.0, simpo_gamma=0.3, label_smoothing=0.1), tmp_path)
    theirs = trl_preference_loss(policy, tokenizer, pairs, "simpo", 2.0, simpo_gamma=0.3, label_smoothing=0.1)
    _assert_same(ours, theirs, policy)


def test_orpo_equals_trl_where_their_nll_is_the_answers(models, tmp_path):
    """TRL's ORPO puts the prompt tokens in its NLL term; vitune's NLL is the answer's, as SFT's
    loss and the ORPO paper's L_SFT are. With a one-token prompt (never predicted) they coincide."""
    policy, _, tokenizer = models
    pairs = _pairs(policy.config.vocab_size, prompt_tokens=1, seed=5)
    items = [{"sequences": [_sequence(p, c), _sequence(p, r)], "margin": 0.0, "desirable": [True, False]}
             for p, c, r in pairs]
    ours = _vitune(policy, None, items, DpoConfig(loss="orpo", beta=0.1), tmp_path)
    theirs = trl_preference_loss(policy, tokenizer, pairs, "orpo", 0.1)
    _assert_same(ours, theirs, policy)


@pytest.mark.parametrize("beta,weights", [(0.1, (1.0, 1.0)), (0.5, (1.3, 0.7))])
def test_kto_equals_trl(models, tmp_path, beta, weights):
    policy, reference, tokenizer = models
    pairs = _pairs(policy.config.vocab_size, n=4, seed=11)
    answers = [(p, c if k % 2 == 0 else r, k % 3 != 1) for k, (p, c, r) in enumerate(pairs)]
    items = [{"sequences": [_sequence(p, a)], "margin": 0.0, "desirable": [good]} for p, a, good in answers]
    settings = DpoConfig(loss="kto", beta=beta, desirable_weight=weights[0], undesirable_weight=weights[1])
    ours = _vitune(policy, reference, items, settings, tmp_path, kto=True)
    theirs = trl_kto_loss(policy, tokenizer, answers, beta, ref_model=reference, desirable_weight=weights[0],
                          undesirable_weight=weights[1])
    _assert_same(ours, theirs, policy)


def test_lora_reference_is_the_adapter_disabled_as_in_trl(models, tmp_path):
    from peft import LoraConfig, get_peft_model

    policy, _, tokenizer = models
    model = get_peft_model(copy.deepcopy(policy), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                             lora_dropout=0.0))
    torch.manual_seed(1)
    with torch.no_grad():  # a trained-looking adapter: B != 0, so policy and reference differ
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    pairs = _pairs(policy.config.vocab_size, seed=9)
    items = [{"sequences": [_sequence(p, c), _sequence(p, r)], "margin": 0.0, "desirable": [True, False]}
             for p, c, r in pairs]
    ours = _vitune(model, None, items, DpoConfig(loss="sigmoid", beta=0.1), tmp_path)
    theirs = trl_preference_loss(model, tokenizer, pairs, "sigmoid", 0.1)
    assert abs(float(ours) - 0.693147) > 1e-3  # not the loss of a reference equal to the policy
    _assert_same(ours, theirs, model)


def test_conservative_dpo_label_smoothing_is_the_papers_formula(models, tmp_path):
    """TRL 1.16 dropped label smoothing from its sigmoid loss; vitune keeps cDPO's formula."""
    policy, reference, _ = models
    pairs = _pairs(policy.config.vocab_size, seed=13)
    items = [{"sequences": [_sequence(p, c), _sequence(p, r)], "margin": 0.0, "desirable": [True, False]}
             for p, c, r in pairs]
    plain = float(_vitune(policy, reference, items, DpoConfig(loss="sigmoid", beta=0.1), tmp_path))
    flipped = float(_vitune(policy, reference, [{**i, "sequences": i["sequences"][::-1]} for i in items],
                            DpoConfig(loss="sigmoid", beta=0.1), tmp_path))
    smoothed = float(_vitune(policy, reference, items, DpoConfig(loss="sigmoid", beta=0.1, label_smoothing=0.2),
                             tmp_path))
    # the mix holds per pair, so also for the mean over the pairs
    assert smoothed == pytest.approx(0.8 * plain + 0.2 * flipped, abs=1e-6)
