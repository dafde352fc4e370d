"""TRL 1.16 as the correctness oracle of vitune's DPO-family losses.

The two functions below build the real TRL trainer for a loss, collate the given pre-tokenised
examples with that trainer's own data collator, and return ``trainer.compute_loss(trainer.model,
batch)``: a scalar tensor still attached to the graph, so the caller can ``.backward()`` it and read
the ``.grad`` of the model's parameters. None of TRL's formulas is re-written here; the text below
says what TRL's code computes (read in trl 1.16.0: trainer/dpo_trainer.py, trainer/kto_trainer.py,
trainer/utils.py ``add_fused_lm_head``, experimental/cpo/cpo_trainer.py,
experimental/orpo/orpo_trainer.py) so that vitune can be written to match it. Every number was also
checked against an independent hand formula (per-sequence log-probs from one unpadded forward per
sequence): loss values and parameter gradients agree to fp32 rounding (|dloss| <= 1.5e-7, |dgrad|
<= 3e-7, except IPO at beta=0.1 where the loss is ~26: |dloss| 5.7e-6, |dgrad| 2.4e-6, i.e. 2e-7
relative, so compare IPO with a relative tolerance or a larger beta).

Notation (one micro-batch of B pairs / items; "logp" is a log-probability of the policy, "ref" of
the reference; lp_t = log_softmax(logits[t-1])[ids[t]], the log-prob of token t given the tokens
before it; a sequence is prompt + completion, unpadded):

    S(y)  = sum over the completion tokens t of lp_t          (summed log-prob, "sum")
    A(y)  = S(y) / len(completion)                            (per-token average, "avg")
    z_i   = (S_pol(chosen_i) - S_ref(chosen_i)) - (S_pol(rejected_i) - S_ref(rejected_i))

The prompt tokens are never scored in the preference terms; the first completion token is scored
(it is predicted from the last prompt token). Right padding only; no truncation (``max_length=None``
for DPO/KTO; CPO/ORPO never truncate the batch, their max_length only affects their own text
tokenisation, which is bypassed here).

DPO, ``DPOTrainer(loss_type=[loss])``, policy and reference both summed log-probs S:
    sigmoid:  loss = mean_i  -logsigmoid(beta * z_i)
    hinge:    loss = mean_i  relu(1 - beta * z_i)
    ipo:      loss = mean_i  (d_i - 1/(2*beta))**2,   d_i = (S_pol(c_i)-S_ref(c_i))/len(c_i)
                                                       - (S_pol(r_i)-S_ref(r_i))/len(r_i)
              (i.e. each log-ratio is divided by its own completion length, clamp(min=1); the
              square is per pair; then a plain mean over pairs)
    The batch mean is ``per_sequence_loss.mean()``: an unweighted mean over the B pairs, not a
    token-weighted mean. TRL 1.16 does NOT apply ``label_smoothing`` to sigmoid/hinge/ipo (in the
    DPO trainer it only enters the "robust", "exo_pair" and "aot*" losses; cDPO smoothing of
    "sigmoid" is gone), so a non-zero ``label_smoothing`` with these losses raises here instead of
    being silently ignored. Log-probs come from TRL's fused LM head (chunked log-softmax, no full
    logits), fp32 on CPU.

ORPO, ``experimental.orpo.ORPOTrainer``, beta is ORPO's lambda, no reference model:
    a_c = A_pol(chosen_i), a_r = A_pol(rejected_i)            (per-token AVERAGE log-probs)
    log_odds_i = (a_c - a_r) - (log1mexp(a_c) - log1mexp(a_r)),  log1mexp(x) = log(1 - exp(x))
    nll  = CrossEntropy(mean) of the CHOSEN sequences over ALL their non-pad tokens, PROMPT
           INCLUDED: sum over i, over t = 1..len(prompt_i + chosen_i) - 1 of -lp_t, divided by
           the total count of those tokens in the batch (sum_i (len(p_i)+len(c_i)-1)). One token
           mean over the whole batch, not a mean of per-sequence means, and it is NOT restricted
           to the chosen completion (TRL: "orpo chosen nll loss is computed over the full prompt
           and response"; labels = input_ids where attention_mask == 1).
    loss = nll - mean_i(beta * logsigmoid(log_odds_i))
    (the odds term is computed in float32 via ``.float()``).

SimPO, ``experimental.cpo.CPOTrainer(loss_type="simpo", cpo_alpha=0.0)``, no reference model:
    u_i  = A_pol(chosen_i) - A_pol(rejected_i) - simpo_gamma / beta   (per-token AVERAGE log-probs)
    loss = mean_i [ -(1 - ls) * logsigmoid(beta * u_i) - ls * logsigmoid(-beta * u_i) ]
         = mean_i -logsigmoid(beta * (A_c - A_r) - simpo_gamma)   when ls = label_smoothing = 0
    (cpo_alpha=0.0 makes TRL's NLL term an exact constant 0.0; AlphaPO ``alpha`` stays 0.0.)

KTO, ``KTOTrainer(loss_type="kto")``, summed log-probs S:
    r_i  = S_pol(y_i | x_i) - S_ref(y_i | x_i)
    KL pairing: TRL rotates the completions by +1 inside the micro-batch
        (KL_completion_ids = [completion_ids[-1]] + completion_ids[:-1]), so item i's KL sequence is
        prompt_i + completion_{i-1}, and item 0 gets prompt_0 + completion_{B-1}.
    kl   = clamp(mean_i [S_pol(y_{i-1} | x_i) - S_ref(y_{i-1} | x_i)], min=0), DETACHED: the policy KL
           forward runs under torch.no_grad() and the value is ``.detach()``-ed before the clamp, so
           no gradient flows through kl. The mean is over all B items (desirable and undesirable).
    desirable   (label True):  l_i = desirable_weight   * (1 - sigmoid(beta * (r_i - kl)))
    undesirable (label False): l_i = undesirable_weight * (1 - sigmoid(beta * (kl - r_i)))
    loss = mean over all B items of l_i (``torch.cat(...).nanmean()``: the weights multiply the
           per-item losses, the divisor is B, NOT the sum of the weights).
    TRL refuses B == 1 ("Actual (not effective) batch size must be > 1").

Reference model. If ``ref_model`` is given it is the reference. If it is None:
  * plain model: TRL would reload the reference from the Hub by the model's name; instead a
    ``copy.deepcopy(model)`` is passed (= "the initial policy", TRL's documented meaning).
  * ``peft.PeftModel``: TRL 1.16 (with peft >= 0.20) adds a frozen copy of the "default" adapter
    named "ref" at trainer construction and uses it as the reference, which for a trainer built per
    call means "reference = the current adapter" (loss log 2 for sigmoid whatever the adapter
    holds). The helper deletes that "ref" adapter right after construction, so TRL's compute_loss
    takes its other branch, ``use_adapter(model, None)`` = ``model.disable_adapter()``: the
    reference is the base model with the adapter disabled. That is exactly what TRL does for an
    adapter it creates itself from ``peft_config``, and what vitune's LoRA DPO means.

What TRL changes on the objects you pass, and what this helper undoes (all restored before return,
the graph is not affected; the caller's backward works after restoration):
  * ``add_fused_lm_head`` replaces ``model.forward`` (for a PeftModel, the base model's forward)
    and ``ref_model.forward`` with an instance attribute: restored (deleted / reset).
  * ``disable_dropout_in_model`` sets every nn.Dropout's p to 0 (LoRA dropout included): the loss is
    computed with p = 0 (deterministic); the original p values are put back afterwards.
  * ``set_seed(args.seed)`` in the trainers and in transformers.Trainer reseeds the global RNGs:
    the torch (CPU and CUDA), numpy and python RNG states are saved and restored.
  * ``model.config.pad_token_id`` / ``generation_config.pad_token_id`` are set to the tokenizer's
    pad id; ``model_tags`` get "trl"/"dpo"...; PEFT's add/delete adapter touches requires_grad; the
    train/eval flags of model and ref_model: all restored.
  * The tokenizer gets ``pad_token = eos_token`` if it had none (left as TRL sets it).
  * Not undone: accelerate's process-wide ``AcceleratorState`` is created by the first trainer
    (CPU when the model is on the CPU: ``use_cpu`` follows the model's device).
  * No dtype is changed: fp32 stays fp32 (bf16/fp16 off, no autocast), and the model is not moved
    (``use_cpu`` is chosen from the model's device).
  * Debugging aid: ``last_batch`` (module global) holds the last collated batch (CPU tensors).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import random
import tempfile
import warnings

import torch

PREFERENCE_LOSSES = ("sigmoid", "ipo", "hinge", "orpo", "simpo")

last_batch: dict | None = None


# ----------------------------------------------------------------------------------------------
# state that TRL / transformers mutate, saved and put back


@contextlib.contextmanager
def _preserved_rng():
    import numpy as np

    state = (
        torch.get_rng_state(),
        torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        np.random.get_state(),
        random.getstate(),
    )
    try:
        yield
    finally:
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state_all(state[1])
        np.random.set_state(state[2])
        random.setstate(state[3])


class _Snapshot:
    """What TRL changes on a module: forward patch, dropout p, requires_grad, train flag, pad ids."""

    _MISSING = object()

    def __init__(self, module: torch.nn.Module | None):
        self.module = module
        if module is None:
            return
        self.training = {m: m.training for m in module.modules()}
        self.dropout = {m: m.p for m in module.modules() if isinstance(m, torch.nn.Dropout)}
        self.requires_grad = {p: p.requires_grad for p in module.parameters()}
        self.forwards = {m: m.__dict__.get("forward", self._MISSING) for m in self._forward_owners(module)}
        self.configs = []
        for m in module.modules():
            for attr in ("config", "generation_config"):
                cfg = m.__dict__.get(attr)
                if cfg is None or not hasattr(cfg, "pad_token_id"):
                    continue
                self.configs.append((cfg, cfg.pad_token_id))
                text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
                if text is not cfg:
                    self.configs.append((text, getattr(text, "pad_token_id", None)))
        self.tags = {}
        for m in module.modules():
            tags = m.__dict__.get("model_tags", self._MISSING)
            self.tags[m] = tags if tags is self._MISSING or tags is None else list(tags)

    @staticmethod
    def _forward_owners(module):
        owners = [module]
        get_base = getattr(module, "get_base_model", None)
        if callable(get_base):
            owners.append(get_base())
        return owners

    def restore(self):
        m0 = self.module
        if m0 is None:
            return
        for m, fwd in self.forwards.items():
            if fwd is self._MISSING:
                m.__dict__.pop("forward", None)
            else:
                m.__dict__["forward"] = fwd
        for m, p in self.dropout.items():
            m.p = p
        for p, flag in self.requires_grad.items():
            p.requires_grad_(flag)
        for m, flag in self.training.items():
            m.training = flag
        for cfg, pad in self.configs:
            cfg.pad_token_id = pad
        for m, tags in self.tags.items():
            if tags is self._MISSING:
                m.__dict__.pop("model_tags", None)
            else:
                m.__dict__["model_tags"] = tags


def _is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _common_args(model, out_dir: str, batch_size: int) -> dict:
    return dict(
        output_dir=out_dir,
        use_cpu=_device(model).type == "cpu",
        bf16=False,
        fp16=False,
        report_to=[],
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        gradient_checkpointing=False,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        save_strategy="no",
        logging_strategy="no",
    )


@contextlib.contextmanager
def _quiet():
    names = ("trl", "transformers", "accelerate", "datasets", "peft")
    levels = {n: logging.getLogger(n).level for n in names}
    try:
        import datasets

        progress_was_enabled = datasets.utils.logging.is_progress_bar_enabled()
        datasets.utils.logging.disable_progress_bar()
    except Exception:  # pragma: no cover
        progress_was_enabled = None
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for n, lvl in levels.items():
            logging.getLogger(n).setLevel(lvl)
        if progress_was_enabled:
            import datasets

            datasets.utils.logging.enable_progress_bar()


def _no_telemetry(cls):
    """The TRL trainer class itself, with only its Hub telemetry ping (network) switched off."""
    return type(cls.__name__, (cls,), {"_send_telemetry": lambda self: None, "__module__": cls.__module__})


def _dummy_rows(tokenizer, n: int, keys: tuple[str, ...]) -> dict:
    # TRL tokenises its train_dataset at construction; the batch itself is collated from the given
    # ids below, so this text only has to tokenise. The EOS string tokenises with any tokenizer.
    text = tokenizer.eos_token or tokenizer.pad_token
    return {k: [text] * n for k in keys}


def _run(trainer, model, examples: list[dict]):
    global last_batch
    batch = trainer.data_collator(examples)
    last_batch = {k: (v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    inputs = trainer._prepare_inputs(batch)
    model.train()
    with torch.enable_grad(), trainer.compute_loss_context_manager():
        loss = trainer.compute_loss(trainer.model, inputs)
    if not (isinstance(loss, torch.Tensor) and loss.dim() == 0 and loss.requires_grad):
        raise AssertionError(f"TRL returned {loss!r}, expected a scalar tensor with grad")
    return loss


def _use_disabled_adapter_as_ref(model, ref_model):
    """With a PeftModel and no ref_model, make TRL's reference the adapter-disabled base model."""
    if _is_peft(model) and ref_model is None and "ref" in model.peft_config:
        model.delete_adapter("ref")


# ----------------------------------------------------------------------------------------------
# public API


def trl_preference_loss(
    model,
    tokenizer,
    pairs,
    loss: str,
    beta: float,
    *,
    ref_model=None,
    simpo_gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """TRL's loss of one micro-batch of preference pairs [(prompt_ids, chosen_ids, rejected_ids)].

    sigmoid/ipo/hinge: trl.DPOTrainer(loss_type=[loss]); orpo: ORPOTrainer (beta = lambda);
    simpo: CPOTrainer(loss_type="simpo", cpo_alpha=0.0). Formulas: see the module docstring.
    Returns a scalar tensor with grad, computed in train mode (dropout p = 0, as TRL sets it).
    """
    from datasets import Dataset

    if loss not in PREFERENCE_LOSSES:
        raise ValueError(f"loss must be one of {PREFERENCE_LOSSES}, got {loss!r}")
    if not pairs:
        raise ValueError("pairs is empty")
    if label_smoothing and loss not in ("simpo",):
        raise ValueError(
            f"TRL 1.16 does not apply label_smoothing to the {loss!r} loss (DPOTrainer only uses it for "
            "'robust', 'exo_pair' and 'aot*'; ORPO has none); there is no TRL oracle for it"
        )
    pairs = [(list(map(int, p)), list(map(int, c)), list(map(int, r))) for p, c, r in pairs]
    if any(not c or not r for _, c, r in pairs):
        raise ValueError("every chosen and rejected completion needs at least one token")
    n = len(pairs)
    peft = _is_peft(model)
    if loss in ("sigmoid", "ipo", "hinge") and ref_model is None and not peft:
        ref_model = copy.deepcopy(model)  # TRL would reload the reference from the Hub by name

    snaps = [_Snapshot(model), _Snapshot(ref_model)]
    try:
        with _quiet(), _preserved_rng(), tempfile.TemporaryDirectory(prefix="trl-oracle-") as out_dir:
            common = _common_args(model, out_dir, n)
            if loss in ("sigmoid", "ipo", "hinge"):
                from trl import DPOConfig, DPOTrainer

                args = DPOConfig(
                    **common, beta=beta, loss_type=[loss], max_length=None, label_smoothing=label_smoothing,
                    precompute_ref_log_probs=False, padding_free=False, use_weighting=False,
                )
                ds = Dataset.from_dict(_dummy_rows(tokenizer, n, ("prompt", "chosen", "rejected")))
                trainer = _no_telemetry(DPOTrainer)(
                    model=model, ref_model=ref_model, args=args, train_dataset=ds, processing_class=tokenizer
                )
                _use_disabled_adapter_as_ref(model, ref_model)
                examples = [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in pairs]
            else:
                if ref_model is not None:
                    raise ValueError(f"{loss!r} is reference-free; do not pass ref_model")
                max_len = max(len(p) + max(len(c), len(r)) for p, c, r in pairs) + 8
                if loss == "orpo":
                    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

                    args = ORPOConfig(**common, beta=beta, max_length=max_len)
                    cls = ORPOTrainer
                else:
                    from trl.experimental.cpo import CPOConfig, CPOTrainer

                    args = CPOConfig(
                        **common, beta=beta, loss_type="simpo", cpo_alpha=0.0, simpo_gamma=simpo_gamma,
                        label_smoothing=label_smoothing, alpha=0.0, max_length=max_len,
                    )
                    cls = CPOTrainer
                ds = Dataset.from_dict(_dummy_rows(tokenizer, n, ("prompt", "chosen", "rejected")))
                trainer = _no_telemetry(cls)(model=model, args=args, train_dataset=ds, processing_class=tokenizer)
                # The features TRL's tokenize_row would produce, from the given ids as they are (no BOS/EOS
                # added): labels are -100 over the prompt. Collated by TRL's DPODataCollatorWithPadding.
                examples = []
                for p, c, r in pairs:
                    examples.append(
                        {
                            "prompt_input_ids": p,
                            "prompt_attention_mask": [1] * len(p),
                            "chosen_input_ids": p + c,
                            "chosen_attention_mask": [1] * (len(p) + len(c)),
                            "chosen_labels": [-100] * len(p) + c,
                            "rejected_input_ids": p + r,
                            "rejected_attention_mask": [1] * (len(p) + len(r)),
                            "rejected_labels": [-100] * len(p) + r,
                        }
                    )
            if trainer.model is not model:
                raise AssertionError("TRL wrapped the model; its parameters would not get the gradients")
            return _run(trainer, model, examples)
    finally:
        for s in snaps:
            s.restore()


def trl_kto_loss(
    model,
    tokenizer,
    items,
    beta: float,
    *,
    ref_model=None,
    desirable_weight=1.0,
    undesirable_weight=1.0,
) -> torch.Tensor:
    """TRL KTOTrainer(loss_type="kto") loss of one micro-batch [(prompt_ids, completion_ids, label)].

    KL pairing (TRL's own rotation, KL_completion_ids = [completion_ids[-1]] + completion_ids[:-1]):
    item i's KL sequence is prompt_i + completion_{i-1}; item 0 is paired with the LAST item's
    completion, prompt_0 + completion_{B-1}. kl = clamp(mean_i(S_pol - S_ref of those B KL
    sequences), min=0), computed without grad and detached. loss = mean over the B items of
    desirable_weight*(1-sigmoid(beta*(r-kl))) for label True and
    undesirable_weight*(1-sigmoid(beta*(kl-r))) for label False, r = S_pol - S_ref (summed
    completion log-probs). B must be > 1 (TRL refuses B == 1). See the module docstring.
    """
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    items = [(list(map(int, p)), list(map(int, c)), bool(lab)) for p, c, lab in items]
    if any(not c for _, c, _ in items):
        raise ValueError("every completion needs at least one token")
    n = len(items)
    if ref_model is None and not _is_peft(model):
        ref_model = copy.deepcopy(model)

    snaps = [_Snapshot(model), _Snapshot(ref_model)]
    try:
        with _quiet(), _preserved_rng(), tempfile.TemporaryDirectory(prefix="trl-oracle-") as out_dir:
            args = KTOConfig(
                **_common_args(model, out_dir, n), beta=beta, loss_type="kto", max_length=None,
                desirable_weight=desirable_weight, undesirable_weight=undesirable_weight,
                precompute_ref_log_probs=False, train_sampling_strategy="sequential",
            )
            rows = _dummy_rows(tokenizer, n, ("prompt", "completion"))
            rows["label"] = [lab for _, _, lab in items]
            trainer = _no_telemetry(KTOTrainer)(
                model=model, ref_model=ref_model, args=args, train_dataset=Dataset.from_dict(rows),
                processing_class=tokenizer,
            )
            _use_disabled_adapter_as_ref(model, ref_model)
            if trainer.model is not model:
                raise AssertionError("TRL wrapped the model; its parameters would not get the gradients")
            completions = [c for _, c, _ in items]
            kl_completions = [completions[-1]] + completions[:-1]  # TRL's add_kl_completion_ids
            examples = [
                {"prompt_ids": p, "completion_ids": c, "KL_completion_ids": kc, "label": lab}
                for (p, c, lab), kc in zip(items, kl_completions, strict=True)
            ]
            return _run(trainer, model, examples)
    finally:
        for s in snaps:
            s.restore()
