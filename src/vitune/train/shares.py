"""Each process's share of a global batch, so that N processes train exactly what one process
trains with the same global batch (processes x micro_batch_size x gradient_accumulation), at every
step, the epoch's last included.

accelerate's sampler (`even_batches`) fills the short last batch of an epoch by repeating items
from its start: one item is trained twice per epoch and that step's loss is another. Here the
last global batch is split unevenly instead, every item exactly once (`split_batch`,
`RankShares`). That stays exact because every vitune loss is normalised by the count of its
items over the whole optimizer step, across micro-batches and processes: trained tokens for the
causal-LM losses (transformers' `num_items_in_batch`), pairs for rm and dpo (`scale_to_step`).

A process whose share is empty still runs a micro-batch, a "filler" (any real item, marked
`FILLER` by `FillEmptyShares`), because the step's collectives need every rank: DDP all-reduces
gradients in backward, FSDP and DeepSpeed ZeRO-3 gather parameters in forward. Its loss is
multiplied by zero, so it adds nothing to the loss or the gradient, and it is left out of the
item counts, the token and FLOP counters and the stage's metrics (`filling`).

Held-out loss is the mean over every held-out item (token or pair) of the whole evaluation,
whatever the batch size or the number of processes; evaluation batches are shared out the
same way (no repeats), with fillers where a share is empty.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler, SequentialSampler
from transformers.trainer_utils import has_length, seed_worker

from vitune.data.tokenize import IGNORE

FILLER = "vitune_filler"  # batch key: an empty share's stand-in micro-batch (taken out before the forward)


def split_batch(batch: list, processes: int) -> list[list]:
    """A global batch -> each process's share, in order and contiguous: [0:m], [m:2m], ... when the
    batch is full (as accelerate deals them), as even as possible when it is short (the first
    processes take one more), some empty when it holds fewer items than processes."""
    base, extra = divmod(len(batch), processes)
    shares, start = [], 0
    for rank in range(processes):
        size = base + (rank < extra)
        shares.append(batch[start:start + size])
        start += size
    return shares


class RankShares(Sampler):
    """A batch sampler for one process: the items of `sampler` in global batches of
    micro_batch_size x processes, and this process's share of each (`split_batch`). Every process
    gets the same number of micro-batches per epoch; a share may be empty (an empty list), which
    `FillEmptyShares` turns into a filler. `drop_last` drops a short last global batch.

    No `batch_size` attribute: accelerate's BatchSamplerShard (which the prepared data loader
    still wraps around it, passing every batch through) would otherwise re-shard or pad it."""

    def __init__(self, sampler, micro_batch_size: int, processes: int, rank: int, drop_last: bool = False):
        self.sampler = sampler  # accelerate swaps a RandomSampler for its seeded one, as for one process
        self.micro_batch_size = micro_batch_size
        self.processes = processes
        self.rank = rank
        self.drop_last = drop_last

    def __iter__(self):
        size = self.micro_batch_size * self.processes
        batch = []
        for index in self.sampler:
            batch.append(index)
            if len(batch) == size:
                yield split_batch(batch, self.processes)[self.rank]
                batch = []
        if batch and not self.drop_last:
            yield split_batch(batch, self.processes)[self.rank]

    def __len__(self) -> int:
        size = self.micro_batch_size * self.processes
        return len(self.sampler) // size if self.drop_last else math.ceil(len(self.sampler) / size)


class FillEmptyShares:
    """The stage's collator, with an empty share collated as a filler: the dataset's first item,
    marked FILLER."""

    def __init__(self, collator, dataset):
        self.collator = collator
        self.dataset = dataset

    def __call__(self, items: list) -> dict:
        if items:
            return self.collator(items)
        batch = self.collator([self.dataset[0]])  # read now: a stage may add to its items (dpo's reference log-probs)
        batch[FILLER] = True
        return batch


class ExactSharesMixin:
    """Trainer methods that make N processes train (and evaluate) exactly what one process does: the
    data loaders deal `RankShares`, fillers count nothing and weigh zero, the item counts of a step
    leave fillers out, and the held-out loss is the mean over every held-out item. With one process
    the data loaders are transformers' own.

    A stage whose loss is a mean over its micro-batch's items (pairs) calls `scale_to_step`, names
    the items in `loss_items` and sets `loss_is_scaled_for_ga = True` (transformers then leaves the
    loss to it instead of dividing by the accumulation steps).
    """

    filling = False  # True while a filler micro-batch runs
    _held_out: list | None = None  # [sum, count] of the held-out loss, during evaluation_loop

    # ------------------------------------------------------------ batches

    def _shares_out(self, dataset) -> bool:
        return (self.accelerator.num_processes > 1 and self.args.n_gpu <= 1 and dataset is not None
                and has_length(dataset) and not isinstance(dataset, IterableDataset))

    def get_train_dataloader(self):
        # batch_rebalance: transformers' own rank-aware batch sampler, which deals out whole batches
        if not self._shares_out(self.train_dataset) or self.args.train_sampling_strategy == "batch_rebalance":
            return super().get_train_dataloader()
        return self._share_loader(self.train_dataset, self._train_batch_size,
                                  self._get_train_sampler(self.train_dataset), "Training")

    def get_eval_dataloader(self, eval_dataset=None):
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if isinstance(eval_dataset, str) or isinstance(dataset, dict) or not self._shares_out(dataset):
            return super().get_eval_dataloader(eval_dataset)
        return self._share_loader(dataset, self.args.eval_batch_size, SequentialSampler(dataset), "Evaluation")

    def _share_loader(self, dataset, micro_batch_size: int, sampler, description: str) -> DataLoader:
        args = self.args
        shares = RankShares(sampler, micro_batch_size, self.accelerator.num_processes, self.accelerator.process_index,
                            args.dataloader_drop_last)
        collator = FillEmptyShares(self._get_collator_with_removed_columns(self.data_collator, description), dataset)
        extra = {}
        if description == "Training":
            extra["worker_init_fn"] = partial(seed_worker, num_workers=args.dataloader_num_workers,
                                              rank=args.process_index)
        loader = DataLoader(dataset, batch_sampler=shares, collate_fn=collator, num_workers=args.dataloader_num_workers,
                            pin_memory=args.dataloader_pin_memory, persistent_workers=args.dataloader_persistent_workers,
                            prefetch_factor=args.dataloader_prefetch_factor, in_order=args.dataloader_in_order, **extra)
        # accelerate: device placement, the seeded sampler, set_epoch, skipping batches on resume (its
        # data-loader preparation alone: prepare() would have DeepSpeed read a batch size off the loader).
        # It wraps the batch sampler in a BatchSamplerShard, which would deal it out again: made a
        # pass-through (as transformers does for its own rank-aware BatchRebalanceSampler).
        loader = self.accelerator.prepare_data_loader(loader)
        wrapper = loader.batch_sampler
        assert wrapper.batch_sampler is shares, type(wrapper)
        wrapper.num_processes, wrapper.process_index = 1, 0
        return loader

    # ------------------------------------------------------------ training

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.filling = bool(inputs.pop(FILLER, False))
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            self.filling = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if not self.filling:
            return out
        # zero, yet computed from every parameter: backward still joins the gradient all-reduce
        return (out[0] * 0, out[1]) if return_outputs else out * 0

    def loss_items(self, batch: dict) -> int:
        """How many items the loss of `batch` is a mean over: its trained tokens (after the shift of a
        causal LM, as transformers counts them). Pair stages count pairs."""
        if "shift_labels" in batch:
            labels = batch["shift_labels"]
        elif "labels" in batch:
            labels = batch["labels"][..., 1:] if self._loss_shifts_labels else batch["labels"]
        else:
            return 0
        return int((labels != IGNORE).sum())

    def _normalised_by_items(self) -> bool:
        """Whether the loss is divided by the step's item count (num_items_in_batch) rather than
        being a mean per micro-batch."""
        return bool(self.model_accepts_loss_kwargs or self.compute_loss_func is not None or self.loss_is_scaled_for_ga)

    def _items_scale(self) -> int:
        # transformers multiplies such a loss by the processes (their gradients are averaged, not summed)
        return self.accelerator.num_processes if self.args.average_tokens_across_devices else 1

    def _get_num_items_in_batch(self, batch_samples: list, device):
        """The items of one optimizer step: every micro-batch of every process, fillers left out."""
        if self.args.n_gpu > 1 or not self._normalised_by_items():  # DataParallel in one process: transformers' rule
            return super()._get_num_items_in_batch(batch_samples, device)
        count = torch.tensor(sum(self.loss_items(b) for b in batch_samples if not b.get(FILLER)), device=device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            count = self.accelerator.gather(count).sum()
        return count

    def scale_to_step(self, loss: torch.Tensor, inputs: dict, num_items_in_batch) -> torch.Tensor:
        """A micro-batch's mean over its `loss_items` -> its part of the mean over the optimizer step's
        items (num_items_in_batch, counted over micro-batches and processes); zero for a filler."""
        if num_items_in_batch is None:
            return loss
        items = 0 if self.filling else self.loss_items(inputs)
        return loss * (items * self._items_scale()) / num_items_in_batch

    # ------------------------------------------------------------ evaluation

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The loss of one held-out micro-batch, as the mean over its items; their sum and count are kept
        for the mean over the whole evaluation (`evaluation_loop`)."""
        if not prediction_loss_only:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        self.filling = bool(inputs.pop(FILLER, False))
        try:
            inputs = self._prepare_inputs(inputs)
            items = self.loss_items(inputs)
            kwargs = {}
            if self._normalised_by_items():  # normalised by this micro-batch's own items: its mean
                kwargs["num_items_in_batch"] = torch.tensor(max(items, 1) * self._items_scale(), device=self.args.device)
            if self.args.use_liger_kernel and "labels" in inputs:
                inputs = {**inputs, "skip_logits": True}  # as transformers evaluates with Liger: the loss only
            with torch.no_grad(), self.compute_loss_context_manager():
                loss = self.compute_loss(model, inputs, **kwargs).detach()
            if not self.filling and self._held_out is not None:
                self._held_out[0] += float(loss) * items
                self._held_out[1] += items
        finally:
            self.filling = False
        return loss, None, None

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        self._held_out = [0.0, 0]
        try:
            output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                             metric_key_prefix)
            total = torch.tensor(self._held_out, dtype=torch.float64, device=self.accelerator.device)
        finally:
            self._held_out = None
        if self.accelerator.num_processes > 1:
            total = self.accelerator.reduce(total, reduction="sum")
        if total[1] > 0:  # transformers' figure is a mean of per-batch means, over batches that repeat items
            output.metrics[f"{metric_key_prefix}_loss"] = float(total[0] / total[1])
        return output
