"""Reward models: the reward of a sequence, and `RewardScorer`, a trained one read back.

A vitune reward model (train.stage: rm) is a causal LM's backbone with a scalar head
(`AutoModelForSequenceClassification`, one label). The reward of an answer is the head applied
to the last hidden state at the answer's last trained token: its end-of-turn marker, in the
rendering of the run's chat template. With plain transformers, feed the conversation rendered
up to and including that token, unpadded: the model's own pooling reads the same position.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vitune.config import load_run_config, makes_reward_model
from vitune.data.templates import resolve_template
from vitune.data.tokenize import IGNORE, tokenize_conversations
from vitune.errors import UserError
from vitune.models.loading import load_model, load_tokenizer

# what a packed or padded batch of vitune's collators passes to the model (the rest is for the loss)
MODEL_KEYS = ("input_ids", "attention_mask", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
              "max_length_k", "use_cache", "vitune_prefix")


def model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in MODEL_KEYS if k in batch}


def _head(model):
    """The scalar head of a sequence-classification model, through DDP and PEFT wrappers."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.score


def sequence_rewards(model, batch: dict) -> torch.Tensor:
    """The reward of every sequence of a batch: the head's score at the flat positions
    `sequence_ends` (packed: one row; padded: row * width + column). The whole model runs, through
    its wrapper's forward (DDP syncs gradients only after it); the head scores every position."""
    scores = []
    hook = _head(model).register_forward_hook(lambda module, args, out: scores.append(out))
    try:
        model(**model_inputs(batch))
    finally:
        hook.remove()
    return scores[0].reshape(-1)[batch["sequence_ends"]].float()


class RewardScorer:
    """A trained reward model (a vitune run folder of stage rm), ready to score answers."""

    def __init__(self, model, tokenizer, template, batch_size: int = 8):
        self.model, self.tokenizer, self.template, self.batch_size = model.eval(), tokenizer, template, batch_size

    @classmethod
    def load(cls, run_dir: str) -> "RewardScorer":
        run = Path(run_dir)
        summary = run / "summary.json"
        if not run.is_dir():
            raise UserError(f"reward model not found: {run_dir} (give the run folder of a train.stage: rm run)")
        try:
            stage = json.loads(summary.read_text(encoding="utf-8")).get("stage") if summary.is_file() else None
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            stage = None
        if not makes_reward_model(stage) or not (run / "config.yaml").is_file():
            what = "an unfinished run (no summary.json)" if not summary.is_file() else f"a stage {stage or 'unknown'} run"
            raise UserError(f"{run_dir} is not a reward model: it is {what}; give the folder of a finished "
                            "train.stage: rm run")
        config = load_run_config(run)
        tokenizer = load_tokenizer(str(run))
        template = resolve_template(config.model.template, tokenizer)
        if config.method.type == "full":
            config.model.name_or_path = str(run)
        model = load_model(config.model, config.method, reward_head_pad_id=tokenizer.pad_token_id)
        if config.method.type != "full":
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(run))
        return cls(model, tokenizer, template)

    def score(self, conversations) -> list[float]:
        """The reward of the last answer of each conversation (Conversation objects ending with
        the assistant's turn), rendered with the reward model's chat template."""
        rows = tokenize_conversations(list(conversations), self.tokenizer, self.template, mask_history=True)
        device = next(self.model.parameters()).device
        out: list[float] = []
        with torch.no_grad():
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start:start + self.batch_size]
                width = max(len(r.input_ids) for r in chunk)
                ids = torch.full((len(chunk), width), self.tokenizer.pad_token_id, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                ends = []
                for i, r in enumerate(chunk):
                    ids[i, : len(r.input_ids)] = torch.as_tensor(r.input_ids)
                    mask[i, : len(r.input_ids)] = 1
                    ends.append(i * width + max(k for k, v in enumerate(r.labels) if v != IGNORE))
                batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "use_cache": False,
                         "sequence_ends": torch.tensor(ends, device=device)}
                out += sequence_rewards(self.model, batch).tolist()
        return out
