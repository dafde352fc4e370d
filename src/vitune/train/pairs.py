"""What the pair stages (rm and dpo) share: preference rows as dataset items, the collator that
lays every sequence of a micro-batch into one forward pass, the per-sequence log-probabilities,
and the trainer base whose loss is a mean over the micro-batch's pairs.

Packed (default), the chosen and rejected sequences of every pair of a micro-batch lie end to end
in ONE padding-free row, attention kept within each sequence (what TRL's DPOTrainer switched off),
and the LM head runs only where a token is trained; with vitune's row-wise SDPA the prompt of a
pair runs once for both answers.
"""

from __future__ import annotations

import torch
from transformers import DataCollatorWithFlattening

from vitune.data.tokenize import IGNORE
from vitune.models.chunked_loss import next_tokens, token_logps
from vitune.models.reward_model import model_inputs
from vitune.train.stage import start_to_end
from vitune.train.trainer import VituneTrainer

PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin")


# ---------------------------------------------------------------- batches


def pair_items(pairs) -> list[dict]:
    """TokenizedPairs -> dataset items: the sequences in order (chosen first) and which is which."""
    out = []
    for pair in pairs:
        item = {"sequences": [(s.input_ids, s.labels) for s in pair.sequences], "margin": pair.margin}
        item["desirable"] = [pair.chosen is not None] if len(item["sequences"]) == 1 else [True, False]
        out.append(item)
    return out


def answer_items(pairs) -> list[dict]:
    """KTO: every answer its own item (a pair gives a desirable and an undesirable one)."""
    out = []
    for pair in pairs:
        for seq, good in ((pair.chosen, True), (pair.rejected, False)):
            if seq is not None:
                out.append({"sequences": [(seq.input_ids, seq.labels)], "margin": 0.0, "desirable": [good]})
    return out


def kl_sequences(sequences: list[tuple[list[int], list[int]]]) -> list[tuple[list[int], list[int]]]:
    """KTO's mismatched pairs: the prompt of answer i with the answer of answer i-1 (the first with
    the last), as TRL's KTOTrainer pairs them within a batch."""
    split = []
    for ids, labels in sequences:
        n = next((i for i, label in enumerate(labels) if label != IGNORE), len(labels))
        split.append((ids[:n], ids[n:], labels[n:]))
    out = []
    for i, (prompt, _, _) in enumerate(split):
        _, answer, answer_labels = split[i - 1]
        out.append((prompt + answer, [IGNORE] * len(prompt) + answer_labels))
    return out


class PreferenceCollator:
    """A micro-batch of preference items -> one forward pass over all their sequences.

    Packed (default): every sequence laid end to end in one padding-free row (transformers'
    `DataCollatorWithFlattening`: position ids restart per sequence, `cu_seq_lens_*` mark the
    boundaries); the LM head runs only at positions whose next token is trained
    (`logits_to_keep`), and `sequence_index` says which sequence each of them belongs to.
    Padded: the sequences as rows, right-padded. Either way `sequence_ends` is the flat position
    of each sequence's last trained token (where a reward model reads its score), and
    `ref_logps` the precomputed reference log-probs when the items carry them.
    """

    def __init__(self, packed: bool, pad_token_id: int, kto: bool = False, share_prompt: bool = False):
        self.packed = packed
        self.pad = pad_token_id
        self.kto = kto
        # the prompt of a pair run once for both answers (vitune's row-wise SDPA only; see `_shared`)
        self.share_prompt = share_prompt and packed and not kto
        self.flatten = DataCollatorWithFlattening(return_flash_attn_kwargs=True, separator_id=IGNORE)

    def __call__(self, items: list[dict]) -> dict:
        sequences = [s for item in items for s in item["sequences"]]
        n_answers = len(sequences)
        if self.kto:
            sequences = sequences + kl_sequences(sequences)
        if self.share_prompt:
            batch = self._shared(items)
        else:
            batch = self._packed(sequences) if self.packed else self._padded(sequences)
        batch["use_cache"] = False
        batch["desirable"] = torch.tensor([d for item in items for d in item["desirable"]], dtype=torch.bool)
        batch["margin"] = torch.tensor([item["margin"] for item in items], dtype=torch.float32)
        batch["n_answers"] = n_answers
        if "ref_logps" in items[0]:
            batch["ref_logps"] = torch.tensor([v for item in items for v in item["ref_logps"]], dtype=torch.float32)
        return batch

    def _packed(self, sequences) -> dict:
        batch = self.flatten([{"input_ids": ids, "labels": labels} for ids, labels in sequences])
        labels = batch["labels"]
        shifted = torch.full_like(labels, IGNORE)
        shifted[:, :-1] = labels[:, 1:]
        keep = (shifted[0] != IGNORE).nonzero().squeeze(1)
        batch["logits_to_keep"] = keep
        batch["shift_labels"] = shifted[:, keep]
        cu = batch["cu_seq_lens_q"]
        batch["sequence_index"] = torch.searchsorted(cu, keep, right=True) - 1
        batch["sequence_ends"] = _last_trained(labels[0], cu)
        batch["n_sequences"] = len(sequences)
        return batch

    def _shared(self, items) -> dict:
        """Packed, with the prompt of each pair run once: the row holds [prompt, chosen] as one
        segment and [rejected] as the next, whose tokens also attend to the prompt at the start of
        the segment before (`vitune_prefix`, read by vitune.models.attention) and whose positions
        continue after the prompt. Every hidden state is the one the unshared layout computes, so
        the losses are the same, with about a fifth fewer tokens through the model on chat data.
        Tokens after an answer's last trained token (e.g. the newline after <|im_end|>) influence
        no trained logit and are left out. A pair whose two prompts tokenise differently keeps
        one segment per sequence."""
        ids, positions, segments, prefix = [], [], [], []
        keep, targets, index, ends, delivered = [], [], [], [], []
        s = 0  # sequence number: chosen 2i, rejected 2i+1
        for item in items:
            seqs = item["sequences"]
            starts = [next(i for i, v in enumerate(lab) if v != IGNORE) for _, lab in seqs]
            shared = len(seqs) == 2 and starts[0] == starts[1] and seqs[0][0][:starts[0]] == seqs[1][0][:starts[1]]
            first_offset = None
            for k, (seq_ids, labels) in enumerate(seqs):
                last = max(i for i, v in enumerate(labels) if v != IGNORE)
                delivered.append(len(seq_ids))
                offset = len(ids)
                if shared and k == 1:  # the rejected answer after the chosen segment's prompt
                    p = starts[1]
                    part = seq_ids[p:last + 1]
                    flat = list(range(first_offset, first_offset + p)) + list(range(offset, offset + len(part)))
                    positions += range(p, p + len(part))
                    prefix.append(p)
                else:
                    part = seq_ids[:last + 1]
                    flat = list(range(offset, offset + len(part)))
                    positions += range(len(part))
                    prefix.append(0)
                    first_offset = offset
                ids += part
                segments.append(len(part))
                for j in range(last):
                    if labels[j + 1] != IGNORE:
                        keep.append(flat[j])
                        targets.append(seq_ids[j + 1])
                        index.append(s)
                ends.append(flat[last])
                s += 1
        cu = torch.tensor([0, *segments], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        longest = max(segments)
        return {"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([positions]),
                "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest,
                "vitune_prefix": prefix, "logits_to_keep": torch.tensor(keep), "shift_labels": torch.tensor([targets]),
                "sequence_index": torch.tensor(index), "sequence_ends": torch.tensor(ends), "n_sequences": s,
                "delivered_lengths": torch.tensor(delivered)}

    def _padded(self, sequences) -> dict:
        longest = max(len(ids) for ids, _ in sequences)
        ids = torch.full((len(sequences), longest), self.pad, dtype=torch.long)
        labels = torch.full((len(sequences), longest), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(sequences), longest), dtype=torch.long)
        for i, (row_ids, row_labels) in enumerate(sequences):
            ids[i, : len(row_ids)] = torch.as_tensor(row_ids)
            labels[i, : len(row_labels)] = torch.as_tensor(row_labels)
            mask[i, : len(row_ids)] = 1
        last = torch.tensor([max(i for i, v in enumerate(r) if v != IGNORE) for _, r in sequences])
        return {"input_ids": ids, "labels": labels, "attention_mask": mask, "n_sequences": len(sequences),
                "sequence_ends": torch.arange(len(sequences)) * longest + last}


def _last_trained(labels: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    ends = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        trained = (labels[a:b] != IGNORE).nonzero()
        ends.append(a + int(trained[-1]) if len(trained) else b - 1)
    return torch.tensor(ends)


def disable_dropout(model):
    """Dropout off (the model's and LoRA's), as TRL's preference trainers do by default: with it,
    the log-ratio of policy to reference would be noise even where the two are the same weights."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def sequence_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence of the batch: the summed log-probability of its trained tokens and their count.
    The log-probabilities come a chunk of tokens at a time (vitune.models.chunked_loss), never the
    logits of the whole batch at once."""
    n = batch["n_sequences"]
    inputs = model_inputs(batch)
    if "logits_to_keep" in batch:  # packed: the head runs only where a token is trained
        inputs["logits_to_keep"] = batch["logits_to_keep"]
    logps, rows = token_logps(model, inputs, next_tokens(batch))
    index = batch["sequence_index"] if "logits_to_keep" in batch else rows  # padded: a sequence per row
    sums = torch.zeros(n, dtype=logps.dtype, device=logps.device).index_add(0, index, logps)
    counts = torch.zeros(n, dtype=logps.dtype, device=logps.device).index_add(
        0, index, torch.ones_like(logps))
    return sums, counts


# ---------------------------------------------------------------- trainer


class PairTrainer(VituneTrainer):
    """What the rm and dpo trainers share: a loss that is the mean over the pairs of the optimizer
    step (each micro-batch's mean scaled by `scale_to_step`, so any split of the step's pairs over
    micro-batches and processes gives the same loss), and the tokens of the pairs counted as delivered."""

    loss_is_scaled_for_ga = True  # scale_to_step normalises by the step's pairs: Trainer divides by nothing

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False

    def loss_items(self, batch: dict) -> int:
        return len(batch["margin"])  # pairs (kto: answers)

    def _row_lengths(self, inputs: dict):
        if "delivered_lengths" in inputs:  # a shared prompt counts for both answers, as TRL counts it
            lengths = inputs["delivered_lengths"]
            return lengths, int(lengths.sum())
        return super()._row_lengths(inputs)


def pair_lines(summary: dict) -> list[str]:
    """The held-out pairs at the end of an rm or dpo run, as `vitune train` prints them."""
    if summary.get("eval_rewards_accuracy_end") is None:
        return []
    return [f"held-out pairs: chosen preferred in {start_to_end(summary, 'eval_rewards_accuracy', '.1%')}, "
            f"mean margin {summary['eval_rewards_margin_end']:.3f}"]
