"""Stage sft: supervised fine-tuning of a causal LM on instructions or conversations.

- records: conversations (Alpaca, ShareGPT, OpenAI messages; vitune.data.formats), each rendered
  with the run's chat template;
- rows: tokenised with the loss on the answers and their end-of-turn markers
  (vitune.data.pipeline.prepare_sft_data, cached by the contents of the files);
- batches: packed best-fit into bins of data.max_length (one padding-free row per micro-batch,
  attention kept within each conversation), or padded to the longest row with packing off;
- loss and trainer: the causal-LM cross-entropy as the mean over every trained token of the
  optimizer step (`VituneTrainer`), computed a chunk of tokens at a time (vitune.models.chunked_loss)
  or by Liger's fused kernels on a GPU;
- saves and logs: nothing beyond the runner's (weights, tokenizer with the template, metrics).
"""

from __future__ import annotations

from pathlib import Path

from vitune.config import RunConfig
from vitune.data.packing import pack_rows, packing_efficiency
from vitune.data.pipeline import prepare_sft_data
from vitune.train.collate import PackedCollator, PadCollator, items
from vitune.train.stage import Batches, Stage
from vitune.train.trainer import VituneTrainer


class SftStage(Stage):
    name = "sft"
    liger = True

    def prepare_data(self, config: RunConfig, tokenizer, template, data_key: str | None = None,
                     resume_from: Path | None = None):
        return prepare_sft_data(config.data, tokenizer, template, config.train.seed, key=data_key)

    def batches(self, config: RunConfig, plan, train_rows, eval_rows, pad_token_id: int, console) -> Batches:
        max_length = config.data.max_length
        if not plan.packing:
            return Batches(items(train_rows), items(eval_rows), PadCollator(pad_token_id))
        train_set, eval_set = pack_rows(train_rows, max_length), pack_rows(eval_rows, max_length)
        fill = packing_efficiency(train_set, max_length)
        console.print(f"packing: {len(train_rows):,} rows -> {len(train_set):,} bins of {max_length} tokens, {fill:.1%} full")
        return Batches(items(train_set), items(eval_set), PackedCollator(), fill)

    def make_trainer(self, config: RunConfig, run, **kwargs):
        return VituneTrainer(**kwargs)
