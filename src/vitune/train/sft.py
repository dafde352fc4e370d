"""Stage sft: supervised fine-tuning of a causal LM on instructions or conversations.

Its own parts: conversations rendered with the chat template and tokenised with the loss on
the answers (vitune.data.pipeline), packed into bins of max_length (or padded), and
transformers' causal-LM loss, as the mean over every trained token of the optimizer step.
The rest is the shared runner's (vitune.train.runner).
"""

from __future__ import annotations

from vitune.config import RunConfig
from vitune.train.runner import TrainResult, run_training
from vitune.train.stages import Batches, Stage


class SftStage(Stage):
    name = "sft"

    def prepare_data(self, config: RunConfig, tokenizer, template):
        from vitune.data.pipeline import prepare_sft_data

        return prepare_sft_data(config.data, tokenizer, template, config.train.seed)

    def batches(self, config: RunConfig, plan, train_rows, eval_rows, pad_token_id: int, console) -> Batches:
        from vitune.data.packing import pack_rows, packing_efficiency
        from vitune.train.collate import PackedCollator, PadCollator
        from vitune.train.runner import items

        max_length = config.data.max_length
        if not plan.packing:
            return Batches(items(train_rows), items(eval_rows), PadCollator(pad_token_id))
        train_set, eval_set = pack_rows(train_rows, max_length), pack_rows(eval_rows, max_length)
        fill = packing_efficiency(train_set, max_length)
        console.print(f"packing: {len(train_rows):,} rows -> {len(train_set):,} bins of {max_length} tokens, {fill:.1%} full")
        return Batches(items(train_set), items(eval_set), PackedCollator(), fill)

    def make_trainer(self, config: RunConfig, template=None, **kwargs):
        from vitune.train.trainer import VituneTrainer

        return VituneTrainer(**kwargs)


def run_sft(config: RunConfig, console=None) -> TrainResult:
    """Fine-tune with train.stage as the config says (sft unless told otherwise): the shared runner."""
    return run_training(config, console)
