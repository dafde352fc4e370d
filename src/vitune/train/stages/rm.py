"""Stage rm: a reward model trained on preference pairs (read back by vitune.models.reward_model.RewardScorer).

- records and rows: preference pairs, chosen and rejected rendered exactly as SFT renders an answer
  (vitune.data.preference), packed padding-free like the dpo stage's pairs (vitune.train.pairs);
- the model: the base with a scalar head instead of the LM head
  (`AutoModelForSequenceClassification`, one label); with LoRA/QLoRA the head is trained in
  full beside the adapter and saved with it (PEFT's task SEQ_CLS puts it in modules_to_save),
  so plain transformers + PEFT reload it with its trained head;
- the reward of a sequence: the head applied to the last hidden state at the answer's last
  trained token -- its end-of-turn marker;
- the loss: Bradley-Terry, -log sigmoid(r_chosen - r_rejected - margin), with the row's optional
  `margin` (Llama 2's margin loss; 0 without one), as the mean over the micro-batch's pairs;
- logs: rewards/chosen, rewards/rejected, rewards/accuracy (r_chosen > r_rejected; a tie counts
  half), rewards/margin, in training and on the held-out pairs.
"""

from __future__ import annotations

import torch.nn.functional as F

from vitune.config import RunConfig
from vitune.data.preference import prepare_preference_data
from vitune.errors import ConfigError
from vitune.models.loading import adapt_model, load_model
from vitune.models.reward_model import sequence_rewards
from vitune.train.pairs import PAIR_METRICS, PairTrainer, PreferenceCollator, disable_dropout, pair_items, pair_lines
from vitune.train.stage import Batches, Stage


class RmStage(Stage):
    name = "rm"
    metric_keys = PAIR_METRICS
    progress_fields = (("acc", "rewards/accuracy"), ("margin", "rewards/margin"))
    next_step = "score answers with it: vitune score {out} --data FILE"

    def check(self, config: RunConfig) -> None:
        if config.model.adapter:
            raise ConfigError("model.adapter (a LoRA adapter of a causal LM) cannot start a reward model, whose head "
                              "differs; start from the base, or set model.name_or_path to a fully fine-tuned model")

    def prepare_data(self, config: RunConfig, tokenizer, template, data_key=None, resume_from=None):
        return prepare_preference_data(config.data, tokenizer, template, config.train.seed, "rm")

    def describe_rows(self, report, train_rows, eval_rows) -> str:
        return f"{len(train_rows):,} train / {len(eval_rows):,} eval pairs, "

    def load_model(self, config: RunConfig, tokenizer):
        return load_model(config.model, config.method, reward_head_pad_id=tokenizer.pad_token_id)

    def adapt_model(self, model, config: RunConfig, gradient_checkpointing: bool):
        return disable_dropout(adapt_model(model, config.method, gradient_checkpointing, task_type="SEQ_CLS"))

    def batches(self, config: RunConfig, plan, train_rows, eval_rows, pad_token_id: int, console) -> Batches:
        collator = PreferenceCollator(plan.packing, pad_token_id, share_prompt=plan.attention.startswith("sdpa"))
        return Batches(pair_items(train_rows), pair_items(eval_rows), collator)

    def make_trainer(self, config: RunConfig, run, **kwargs):
        return RewardTrainer(**kwargs)

    def held_out_lines(self, summary: dict) -> list[str]:
        return pair_lines(summary)


class RewardTrainer(PairTrainer):
    """The Bradley-Terry loss on packed (or padded) pair batches."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self._count(inputs)
        rewards = sequence_rewards(model, inputs)
        chosen, rejected = rewards[0::2], rewards[1::2]
        loss = -F.logsigmoid(chosen - rejected - inputs["margin"].to(chosen)).mean()
        n = len(chosen)
        c, r = chosen.detach(), rejected.detach()
        self.record_metric("rewards/chosen", float(c.sum()), n)
        self.record_metric("rewards/rejected", float(r.sum()), n)
        self.record_metric("rewards/accuracy", float(((c > r).float() + 0.5 * (c == r).float()).sum()), n)
        self.record_metric("rewards/margin", float((c - r).sum()), n)
        loss = self.scale_to_step(loss, inputs, num_items_in_batch)
        return (loss, {}) if return_outputs else loss
