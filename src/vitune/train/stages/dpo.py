"""Stage dpo: preference optimisation (DPO, IPO, hinge, ORPO, SimPO, KTO) on the shared runner.

- records: preference rows (prompt, chosen, rejected; vitune.data.preference), each answer
  rendered as SFT renders an answer; KTO takes each answer alone, desirable or not;
- batches: every sequence of a micro-batch in one padding-free forward pass, the prompt of a pair
  run once for both answers (`PreferenceCollator`, vitune.train.pairs);
- the reference model: the same weights with the adapter disabled (LoRA/QLoRA: no second copy),
  the starting adapter of `model.adapter` (an SFT run: the reference is that SFT model, not the
  bare base), a frozen copy for full fine-tuning, or log-probs computed once before training
  (`dpo.precompute_reference`); ORPO and SimPO need none;
- the loss (vitune.train.preference_losses, checked against TRL's trainers) on per-sequence
  log-probabilities, as the mean over the micro-batch's pairs (`PreferenceTrainer`);
- logs: rewards/chosen, rewards/rejected, rewards/accuracy, rewards/margin (and kl for KTO), in
  training and on the held-out pairs; saves nothing beyond the runner's.

`micro_batch_size` counts pairs (KTO: answers).
"""

from __future__ import annotations

import contextlib
import copy

import torch
from transformers import TrainerCallback

from vitune.config import RunConfig
from vitune.data.preference import prepare_preference_data
from vitune.errors import ConfigError
from vitune.models.attention import PACKED_SDPA, packed_attention
from vitune.train.pairs import (PAIR_METRICS, PairTrainer, PreferenceCollator, answer_items, disable_dropout,
                                pair_items, pair_lines, sequence_logps)
from vitune.train.preference_losses import NEEDS_REFERENCE, kto_loss, pair_loss
from vitune.train.stage import Batches, Stage

REFERENCE_ADAPTER = "reference"


class DpoStage(Stage):
    name = "dpo"
    metric_keys = PAIR_METRICS + ("kl",)
    progress_fields = (("acc", "rewards/accuracy"), ("margin", "rewards/margin"))

    def check(self, config: RunConfig) -> None:
        super().check(config)
        d = config.dpo
        if d.loss == "kto" and config.train.micro_batch_size < 2:
            raise ConfigError("dpo.loss: kto estimates its KL term from the other answers of a micro-batch; set "
                              "train.micro_batch_size to 2 or more")
        if d.label_smoothing and d.loss not in ("sigmoid", "simpo"):
            raise ConfigError(f"dpo.label_smoothing is used by the sigmoid and simpo losses, not by {d.loss}")
        if d.precompute_reference and not NEEDS_REFERENCE[d.loss]:
            raise ConfigError(f"dpo.loss: {d.loss} needs no reference model; remove dpo.precompute_reference")
        if d.precompute_reference and d.loss == "kto":
            raise ConfigError("dpo.precompute_reference does not work with dpo.loss: kto (its KL pairs change with "
                              "every shuffled micro-batch); remove it")

    def prepare_data(self, config: RunConfig, tokenizer, template, data_key=None, resume_from=None):
        return prepare_preference_data(config.data, tokenizer, template, config.train.seed, "dpo",
                                       unpaired=config.dpo.loss == "kto")

    def describe_rows(self, report, train_rows, eval_rows) -> str:
        return f"{len(train_rows):,} train / {len(eval_rows):,} eval pairs, "

    def adapt_model(self, model, config: RunConfig, gradient_checkpointing: bool):
        model = super().adapt_model(model, config, gradient_checkpointing)
        if config.model.adapter and NEEDS_REFERENCE[config.dpo.loss]:
            # the starting adapter, frozen, is the reference: the SFT model, not the bare base
            model.load_adapter(config.model.adapter, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
        return disable_dropout(model)

    def batches(self, config: RunConfig, plan, train_rows, eval_rows, pad_token_id: int, console) -> Batches:
        to_items = answer_items if config.dpo.loss == "kto" else pair_items
        collator = PreferenceCollator(plan.packing, pad_token_id, kto=config.dpo.loss == "kto",
                                      share_prompt=plan.attention.startswith("sdpa"))
        return Batches(to_items(train_rows), to_items(eval_rows), collator)

    def make_trainer(self, config: RunConfig, run, **kwargs):
        d = config.dpo
        model = kwargs["model"]
        reference = None
        if NEEDS_REFERENCE[d.loss] and not d.precompute_reference and not hasattr(model, "peft_config"):
            reference = copy.deepcopy(model).eval().requires_grad_(False)  # full fine-tuning: a frozen copy
        trainer = PreferenceTrainer(settings=d, reference_model=reference, **kwargs)
        if d.precompute_reference:
            trainer.add_callback(_Precompute(trainer, kwargs["train_dataset"], kwargs["eval_dataset"] or [],
                                             kwargs["data_collator"]))
        return trainer

    def held_out_lines(self, summary: dict) -> list[str]:
        return pair_lines(summary)


class _Precompute(TrainerCallback):
    """Runs the reference once over every item when training begins (before the first step and the
    first evaluation), under the packed-attention context the runner sets up."""

    def __init__(self, trainer, train_items, eval_items, collator):
        self.trainer, self.sets, self.collator = trainer, [train_items, eval_items], collator

    def on_train_begin(self, args, state, control, **kwargs):
        for items in self.sets:
            if items and "ref_logps" not in items[0]:
                self.trainer.precompute(items, self.collator)


# ---------------------------------------------------------------- trainer


class PreferenceTrainer(PairTrainer):
    """The preference loss of `dpo.loss` on packed (or padded) pair batches."""

    def __init__(self, *args, settings, reference_model=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.settings = settings
        self.reference_model = reference_model  # full fine-tuning without precomputed log-probs
        self.kto = settings.loss == "kto"

    # ------------------------------------------------------------ reference

    @contextlib.contextmanager
    def _reference(self):
        """The model as the reference: its starting adapter, or with no adapter (the base)."""
        model = self.accelerator.unwrap_model(self.model)
        if self.reference_model is not None:
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            packed = base.config._attn_implementation == PACKED_SDPA  # the reference reads packed batches too
            with packed_attention(self.reference_model) if packed else contextlib.nullcontext():
                yield self.reference_model
        elif hasattr(model, "peft_config") and REFERENCE_ADAPTER in model.peft_config:
            active = model.active_adapter
            model.set_adapter(REFERENCE_ADAPTER)
            try:
                yield self.model
            finally:
                model.set_adapter(active)  # also makes the trained adapter trainable again
        elif hasattr(model, "disable_adapter"):
            with model.disable_adapter():
                yield self.model
        else:
            raise RuntimeError("no reference model")  # prevented by DpoStage.check

    def reference_logps(self, batch: dict) -> torch.Tensor:
        with torch.no_grad(), self._reference() as reference:
            return sequence_logps(reference, batch)[0]

    def precompute(self, dataset: list[dict], collator) -> None:
        """dpo.precompute_reference: each item's reference log-probs, once, in eval mode."""
        was_training = self.model.training
        self.model.eval()
        size = self.args.per_device_train_batch_size
        for start in range(0, len(dataset), size):
            chunk = dataset[start:start + size]
            logps = self.reference_logps(self._prepare_inputs(collator(chunk))).tolist()
            for k, item in enumerate(chunk):
                item["ref_logps"] = logps[2 * k:2 * k + 2]
        self.model.train(was_training)

    # ------------------------------------------------------------ loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self._count(inputs)
        s = self.settings
        logps, counts = sequence_logps(model, inputs)
        ref = None
        if NEEDS_REFERENCE[s.loss]:
            ref = inputs["ref_logps"] if "ref_logps" in inputs else self.reference_logps(inputs)
        if self.kto:
            loss = self._kto(logps, ref, inputs)
        else:
            loss = self._pairs(logps, counts, ref, inputs)
        loss = self.scale_to_step(loss, inputs, num_items_in_batch)
        return (loss, {}) if return_outputs else loss

    def _pairs(self, logps, counts, ref, inputs) -> torch.Tensor:
        s = self.settings
        chosen, rejected = logps[0::2], logps[1::2]
        nll = None
        if s.loss == "orpo":
            nll = -chosen.sum() / counts[0::2].sum().clamp(min=1)
        out = pair_loss(s.loss, s.beta, chosen, rejected, counts[0::2], counts[1::2],
                        ref[0::2] if ref is not None else None, ref[1::2] if ref is not None else None,
                        label_smoothing=s.label_smoothing, simpo_gamma=s.simpo_gamma, chosen_nll=nll)
        self._record_pairs(out.chosen_rewards, out.rejected_rewards)
        return out.loss

    def _kto(self, logps, ref, inputs) -> torch.Tensor:
        s = self.settings
        n = inputs["n_answers"]
        loss, rewards, kl = kto_loss(s.beta, logps[:n], ref[:n], inputs["desirable"], logps[n:].detach(), ref[n:],
                                     s.desirable_weight, s.undesirable_weight)
        good = inputs["desirable"]
        self.record_metric("rewards/chosen", float(rewards[good].sum()), int(good.sum()))
        self.record_metric("rewards/rejected", float(rewards[~good].sum()), int((~good).sum()))
        self.record_metric("kl", float(kl), 1)
        return loss

    def _record_pairs(self, chosen_rewards, rejected_rewards) -> None:
        n = len(chosen_rewards)
        self.record_metric("rewards/chosen", float(chosen_rewards.sum()), n)
        self.record_metric("rewards/rejected", float(rejected_rewards.sum()), n)
        # a tie (policy = reference at the start: every reward is 0) counts as half right, not wrong
        right = (chosen_rewards > rejected_rewards).float() + 0.5 * (chosen_rewards == rejected_rewards).float()
        self.record_metric("rewards/accuracy", float(right.sum()), n)
        self.record_metric("rewards/margin", float((chosen_rewards - rejected_rewards).sum()), n)
