"""Stage pt: continued pretraining of a causal LM on raw text (Vietnamese corpora, mostly).

- records: text rows (a `text` column) and .txt files (vitune.data.pretrain); no chat template;
- rows: each document ends with an end-of-document token and every token is trained; a document
  longer than data.max_length is split into chunks rather than dropped;
- batches: sft's (packed with attention kept within each document, or padded); with
  data.streaming (vitune.data.stream) the corpus is read, tokenised and packed on the fly, each
  process from its own share, and `StreamTrainer` saves the stream position of the last trained
  bin in every checkpoint, so a resume continues where the run stopped;
- loss: sft's (the mean over every trained token of the optimizer step);
- logs: held-out bits per character (`PretrainTrainer`), which compares across tokenizers;
- saves: a stream's counts, gathered from every process, into data_report.json ("stream").
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from accelerate.utils import gather_object
from torch.utils.data import DataLoader

from vitune.config import RunConfig
from vitune.data.packing import pack_rows
from vitune.data.pipeline import DataReport, raise_for_bad_rows
from vitune.data.pretrain import prepare_pretrain_data, read_texts, tokenize_texts
from vitune.data.stream import POSITION_FILE, TextStream, read_position
from vitune.data.tokenize import IGNORE
from vitune.train.collate import PackedCollator, PadCollator, items, rows_of_bins
from vitune.train.sharding import process_state
from vitune.train.stage import Batches, start_to_end
from vitune.train.stages.sft import SftStage
from vitune.train.trainer import VituneTrainer


class PretrainStage(SftStage):
    name = "pt"
    uses_template = False  # raw text: the model's own chat template (if any) stays as it is
    # held-out bits per character: comparable across tokenizers (before / after vocabulary extension)
    metric_keys = ("bits_per_char",)

    def prepare_data(self, config: RunConfig, tokenizer, template, data_key: str | None = None,
                     resume_from: Path | None = None):
        if config.data.streaming:
            return self._stream(config, tokenizer, resume_from)
        return prepare_pretrain_data(config.data, tokenizer, config.train.seed)

    def _stream(self, config: RunConfig, tokenizer, resume_from: Path | None):
        """This process's stream (from the checkpoint's position on a resume) and the held-out text, read whole."""
        state = process_state()
        stream = TextStream(config.data, tokenizer, state.process_index, state.num_processes,
                            read_position(resume_from, state.process_index))
        report = DataReport()
        held_out = [t for spec in config.data.eval or [] for t in read_texts(spec, config.data, report)]
        raise_for_bad_rows(report, config.data.on_error)
        evaluation = tokenize_texts(held_out, tokenizer, config.data.max_length, report, count_tokens=False,
                                    scored=True)
        report.rows_kept = report.rows_read - report.rows_rejected
        report.eval_characters = sum(len(t.text) for t in held_out)
        return stream, evaluation, report

    def describe_rows(self, report, train_rows, eval_rows) -> str:
        held = f" + {len(eval_rows):,} held out" if eval_rows else ""
        return (f"{report.rows_split:,} documents split; {len(train_rows):,} chunks of at most data.max_length "
                f"tokens{held}, ")

    def data_line(self, report, train_rows, eval_rows, template) -> str:
        if not isinstance(train_rows, TextStream):
            return super().data_line(report, train_rows, eval_rows, template)
        files = train_rows.files
        size = sum(f.stat().st_size for f, _ in files)
        held = f"; {report.rows_kept} held-out documents ({len(eval_rows)} chunks)" if eval_rows else ""
        share = f", this process reads 1/{train_rows.world} of each" if train_rows.world > 1 else ""
        return (f"data: streaming {len(files)} file(s), {size / 1e6:,.1f} MB, in bins of {train_rows.max_length} "
                f"tokens{share}{held}")

    def batches(self, config: RunConfig, plan, train_rows, eval_rows, pad_token_id: int, console) -> Batches:
        if not config.data.streaming:
            return super().batches(config, plan, train_rows, eval_rows, pad_token_id, console)
        if plan.packing:
            return Batches(train_rows, items(pack_rows(eval_rows, config.data.max_length)),
                           StreamCollator(PackedCollator()), 1.0)
        return Batches(train_rows, items(eval_rows), StreamCollator(PadCollator(pad_token_id), unpack=True))

    def training_arguments(self, config: RunConfig, run, output_dir: Path, plan, has_eval: bool):
        args = super().training_arguments(config, run, output_dir, plan, has_eval)
        # a resumed stream seeks to its saved position: Trainer must not replay batches to skip them
        args.ignore_data_skip = bool(config.data.streaming)
        return args

    def make_trainer(self, config: RunConfig, run, **kwargs):
        trainer_class = StreamTrainer if config.data.streaming else PretrainTrainer
        return trainer_class(eval_characters=run.report.eval_characters, **kwargs)

    def report_after_training(self, config: RunConfig) -> bool:
        return bool(config.data.streaming)  # what a stream read is known once it has been read

    def report_extras(self, trainer) -> dict:
        positions = getattr(trainer, "stream_positions", None)
        if not positions:
            return {}
        keys = ("documents", "tokens", "split", "rejected")
        return {"stream": {
            "processes": len(positions),
            **{k: sum(p[k] for p in positions) for k in keys},
            "epochs_started": max(p["epoch"] for p in positions) + 1,
            "per_process": positions,
        }}

    def held_out_lines(self, summary: dict) -> list[str]:
        if summary.get("eval_bits_per_char_end") is None:
            return []
        return [f"held-out bits per character {start_to_end(summary, 'eval_bits_per_char')}"]


# ---------------------------------------------------------------- batches of a stream


class StreamCollator:
    """The collator of streamed bins: the inner collator's batch plus the stream position after
    its last bin (which the trainer takes out before the forward). `unpack`: every piece of a bin
    becomes a padded row of its own (architectures that cannot take row boundaries)."""

    def __init__(self, inner, unpack: bool = False):
        self.inner = inner
        self.unpack = unpack

    def __call__(self, bins: list[dict]) -> dict:
        batch = self.inner(rows_of_bins(bins) if self.unpack else bins)
        if "stream_position" in bins[-1]:
            batch["stream_position"] = bins[-1]["stream_position"]
        return batch


# ---------------------------------------------------------------- trainers


class PretrainTrainer(VituneTrainer):
    """VituneTrainer that also measures held-out bits per character: the summed negative
    log-likelihood of the held-out tokens, in bits, over the characters of the held-out text.
    Unlike the loss per token it does not depend on the tokenizer, so a model with an extended
    vocabulary (fewer, longer tokens) compares with its original. A held-out document longer than
    data.max_length is scored in windows of max_length whose first token is not predicted (raise
    data.max_length above the longest held-out document to score every character)."""

    def __init__(self, *args, eval_characters: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_characters = eval_characters

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training or not self.eval_characters:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        predicted = predicted_tokens(inputs)
        # the loss is the mean over the micro-batch's predicted tokens: times their count = its sum
        self.record_metric("bits_per_char", float(loss.detach()) * predicted / math.log(2), 0)
        return (loss, outputs) if return_outputs else loss

    def evaluate(self, *args, **kwargs):
        if self.eval_characters and self.accelerator.is_main_process:
            # the denominator, once per evaluation: the numerators of every process add up to the held-out text
            self._stage_metrics["eval"].setdefault("bits_per_char", []).append((0.0, self.eval_characters))
        return super().evaluate(*args, **kwargs)


def predicted_tokens(inputs: dict) -> int:
    """How many tokens of a batch the loss predicts (labels other than -100, after the shift)."""
    if "shift_labels" in inputs:
        return int((inputs["shift_labels"] != IGNORE).sum())
    return int((inputs["labels"][..., 1:] != IGNORE).sum())


class StreamTrainer(PretrainTrainer):
    """VituneTrainer over a TextStream: each process iterates its own share (no accelerate
    dispatching or re-sharding, which would have one process read everything), the position of
    the last trained bin is saved in every checkpoint, and the counts are gathered at the end."""

    stream_position: dict | None = None
    stream_positions: list | None = None

    def get_train_dataloader(self):
        # not accelerator.prepare(): its IterableDataset handling would dispatch from, or read
        # everything on, every process; _prepare_inputs moves each batch to the device
        return DataLoader(self.train_dataset, batch_size=self.args.per_device_train_batch_size,
                          collate_fn=self.data_collator, num_workers=0)

    def training_step(self, model, inputs, num_items_in_batch=None):
        position = inputs.pop("stream_position", None)
        if position is not None:
            self.stream_position = position
        return super().training_step(model, inputs, num_items_in_batch)

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        if self.stream_position is not None:
            path = Path(output_dir) / POSITION_FILE.format(rank=self.args.process_index)
            path.write_text(json.dumps(self.stream_position), encoding="utf-8")

    def train(self, resume_from_checkpoint=None, **kwargs):
        result = super().train(resume_from_checkpoint, **kwargs)
        position = self.stream_position or self.train_dataset.start.to_json()
        self.stream_positions = gather_object([position]) if self.accelerator.num_processes > 1 else [position]
        return result
