"""The kinds of evaluation, one function each: model + rows in, a dict of figures out.

- `multiple_choice`: accuracy by log-likelihood (acc, acc_norm) and by VMLU's protocol (vmlu_acc).
- `conversations`: loss and perplexity on the trained tokens (the masks of training), and with
  `generate` greedy answers scored by exact match, chrF and ROUGE-L (eval/metrics.py).
- `text`: bits per character and perplexity of plain text.
- `preference`: how often the chosen answer wins: the implicit reward of a DPO-style policy against
  its reference, or a reward model's score.
Every function takes a `Scorer` (the model, tokenizer and template it evaluates) and batches its
forward passes; nothing here reads files or prints.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Optional

import torch

from vitune.data.records import Conversation, Message, Rejection
from vitune.data.templates import TemplateRefused
from vitune.data.tokenize import tokenize_conversations
from vitune.eval import multiple_choice as mc
from vitune.models.chunked_loss import next_tokens, token_logps
from vitune.eval.metrics import score_answers
from vitune.infer.batching import Engine, Request, Sampling
from vitune.models.attention import supports_packing


@dataclass
class Scorer:
    model: object
    tokenizer: object
    template: object
    stop_ids: list[int]
    context: int  # the longest sequence the model takes
    batch_size: int = 16

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else (self.tokenizer.eos_token_id or 0)

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
        """Greedy answers of many prompts at once: the serving engine's batching (left padding, one KV cache)."""
        # an adapter run's active adapter (or none, under disable_adapter) applies to every row
        engine = Engine(self.model, self.tokenizer, max_batch=self.batch_size, max_queue=len(prompts) + 1,
                        prefill_together=True)
        texts, done = [""] * len(prompts), threading.Semaphore(0)

        def collect(i):
            def emit(delta):
                texts[i] += delta.text
                if delta.finish_reason:
                    done.release()
            return emit

        engine.start()
        try:
            for i, ids in enumerate(prompts):
                budget = max(1, min(max_new_tokens, self.context - len(ids)))
                engine.submit(Request(ids, Sampling(max_new_tokens=budget, temperature=0), collect(i),
                                      stop_ids=self.stop_ids))
            for _ in prompts:
                done.acquire()
        finally:
            engine.stop()
        return texts

    def chat_prompt(self, text: str) -> list[int]:
        """A user turn rendered with the template, ending where the assistant's answer starts."""
        prompt = self.template.prompt(Conversation([Message("user", text)]))
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start: start + size]


# ---------------------------------------------------------------- multiple choice


def multiple_choice(scorer: Scorer, questions: list[mc.Question], shots: int = 0, protocol: bool = True,
                    max_new_tokens: int = 8) -> tuple[dict, list[Rejection]]:
    """acc / acc_norm by log-likelihood, and (with `protocol`) VMLU's generated-letter accuracy."""
    examples = mc.pick_shots(questions, shots)
    items, kept, rejected = [], [], []
    for q in questions:
        context = mc.likelihood_context(q, examples[q.id])
        pairs = [mc.continuation_ids(scorer.tokenizer, context, " " + c) for c in q.choices]
        longest = max(len(head) + len(cont) for head, cont in pairs)
        if longest > scorer.context or any(not cont for _, cont in pairs):
            why = (f"{longest} tokens with its longest choice, more than the model's context ({scorer.context})"
                   if longest > scorer.context else "a choice adds no token after the question")
            rejected.append(Rejection(q.source, "too long" if longest > scorer.context else "empty choice", why))
            continue
        items.append((pairs[0][0], [cont for _, cont in pairs]))
        kept.append(q)
    # one forward per batch with each question's choices as a tree (shared prefixes once) where the
    # architecture takes a 4-D attention mask; else the context once and the choices on its KV cache
    tree = supports_packing(scorer.model)
    score = mc.tree_logprobs if tree else mc.shared_prefix_logprobs
    size = (lambda i: len(items[i][0]) + len(mc.choice_tree(items[i][1])[0])) if tree else (lambda i: len(items[i][0]))
    order = sorted(range(len(items)), key=size)  # similar lengths share a batch
    by_index = {}
    for batch in _batches(order, scorer.batch_size):
        for i, row in zip(batch, score(scorer.model, [items[i] for i in batch], scorer.pad_id)):
            by_index[i] = row
    sums = [by_index[i] for i in range(len(items))]
    acc = [max(range(len(s)), key=s.__getitem__) == q.answer for q, s in zip(kept, sums)]
    # per character of the choice, as lm-evaluation-harness's acc_norm
    acc_norm = [max(range(len(s)), key=lambda j: s[j] / len(q.choices[j])) == q.answer
                for q, s in zip(kept, sums)]
    correct = {"acc": acc, "acc_norm": acc_norm}
    answers = []
    if protocol and kept:
        prompts = [scorer.chat_prompt(mc.vmlu_prompt(q, examples[q.id])) for q in kept]
        answers = scorer.generate(prompts, max_new_tokens)
        correct["vmlu_acc"] = [mc.first_letter(a, q.letters) == q.letters[q.answer] for q, a in zip(kept, answers)]
    figures = mc.accuracy_table(kept, correct)
    figures["scored"] = len(kept)
    if answers:
        figures["unanswered"] = sum(mc.first_letter(a, q.letters) is None for q, a in zip(kept, answers))
    return figures, rejected


# ---------------------------------------------------------------- loss on trained tokens, plain text


def token_losses(scorer: Scorer, rows: list[tuple[list[int], list[int]]]) -> list[tuple[float, int]]:
    """(sum of negative log-likelihood in nats, number of scored tokens) per (input_ids, labels) row;
    labels are aligned with input_ids and -100 where a token is not scored, as in training."""
    device = next(scorer.model.parameters()).device
    out: dict[int, tuple[float, int]] = {}
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    for batch in _batches(order, scorer.batch_size):
        width = max(len(rows[i][0]) for i in batch)
        ids = torch.full((len(batch), width), scorer.pad_id, dtype=torch.long, device=device)
        labels = torch.full_like(ids, -100)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(batch):
            n = len(rows[i][0])
            ids[r, :n], labels[r, :n], mask[r, :n] = torch.tensor(rows[i][0]), torch.tensor(rows[i][1]), 1
        with torch.inference_mode():  # a chunk of tokens at a time: never the logits of the whole batch
            logps, in_row = token_logps(scorer.model, {"input_ids": ids, "attention_mask": mask},
                                        next_tokens({"labels": labels}))
        nll = torch.zeros(len(batch), dtype=torch.float32, device=logps.device).index_add(0, in_row, -logps)
        counts = torch.bincount(in_row, minlength=len(batch))
        for r, i in enumerate(batch):
            out[i] = (float(nll[r]), int(counts[r]))
    return [out[i] for i in range(len(rows))]


def conversations(scorer: Scorer, convs: list[Conversation], generate: bool = False,
                  max_new_tokens: int = 256) -> tuple[dict, list[Rejection]]:
    """Loss and perplexity on the answer tokens; with `generate`, greedy answers against the references."""
    encoded = tokenize_conversations(convs, scorer.tokenizer, scorer.template, keep_refusals=True)
    rows, kept, rejected = [], [], []
    for conv, row in zip(convs, encoded):
        if isinstance(row, TemplateRefused):
            rejected.append(Rejection(conv.source or "", "template refused", str(row)))
        elif len(row.input_ids) > scorer.context:
            rejected.append(Rejection(conv.source or "", "too long",
                                      f"{len(row.input_ids)} tokens, more than the model's context ({scorer.context})"))
        elif not any(label != -100 for label in row.labels[1:]):
            rejected.append(Rejection(conv.source or "", "nothing to score", "no answer tokens to score"))
        else:
            rows.append((row.input_ids, row.labels))
            kept.append(conv)
    figures: dict = {"scored": len(kept)}
    if rows:
        losses = token_losses(scorer, rows)
        nll, tokens = sum(n for n, _ in losses), sum(t for _, t in losses)
        figures.update(loss=nll / tokens, perplexity=math.exp(nll / tokens), tokens=tokens)
    if generate and kept:
        prompts, references = [], []
        for conv in kept:
            last = max(i for i, m in enumerate(conv.messages) if m.role == "assistant")
            head = Conversation(conv.messages[:last], system=conv.system)
            prompts.append(scorer.tokenizer(scorer.template.prompt(head), add_special_tokens=False)["input_ids"])
            references.append(conv.messages[last].content)
        answers = scorer.generate(prompts, max_new_tokens)
        scores = score_answers([a.strip() for a in answers], references)
        figures.update(exact_match=scores.exact_match, chrf=scores.chrf, rouge_l=scores.rouge_l, repetition=scores.repetition)
        figures["samples"] = [{"reference": r, "answer": a.strip()} for r, a in list(zip(references, answers))[:5]]
    return figures, rejected


def plain_text(scorer: Scorer, docs: list[tuple[str, str]], window: Optional[int] = None) -> tuple[dict, list[Rejection]]:
    """Bits per character and perplexity of (source, text) documents, each cut into windows of the
    model's context: every token after a window's first is predicted from the ones before it."""
    window = min(window or scorer.context, scorer.context)
    rows, characters, rejected = [], 0, []
    for source, text in docs:
        ids = scorer.tokenizer(text, add_special_tokens=True)["input_ids"]
        if len(ids) < 2:
            rejected.append(Rejection(source, "empty text", "fewer than 2 tokens: nothing to predict"))
            continue
        characters += len(text)
        for start in range(0, len(ids), window):
            piece = ids[start: start + window]
            if len(piece) >= 2:
                rows.append((piece, piece))
    figures: dict = {"scored": len(docs) - len(rejected)}
    if rows:
        losses = token_losses(scorer, rows)
        nll, tokens = sum(n for n, _ in losses), sum(t for _, t in losses)
        figures.update(bits_per_char=nll / math.log(2) / characters, perplexity=math.exp(nll / tokens),
                       tokens=tokens, characters=characters)
    return figures, rejected


# ---------------------------------------------------------------- preference pairs


def answer_logprob(scorer: Scorer, convs: list[Conversation]) -> list[float]:
    """Sum of log-probabilities of each conversation's answer tokens (the trained ones)."""
    encoded = tokenize_conversations(convs, scorer.tokenizer, scorer.template)
    return [-nll for nll, _ in token_losses(scorer, [(r.input_ids, r.labels) for r in encoded])]


def preference(scorer: Scorer, pairs: list[tuple[str, Conversation, Conversation]], reference_logprob=None,
               reward_model=None) -> tuple[dict, list[Rejection]]:
    """Accuracy: how often chosen beats rejected. With `reward_model` (a RewardScorer) by its rewards;
    else by the implicit reward log pi(y|x) - log ref(y|x), `reference_logprob(convs)` giving the
    reference's answer log-probabilities (an adapter run's base, or another model)."""
    chosen = [c for _, c, _ in pairs]
    rejected = [r for _, _, r in pairs]
    n = len(pairs)
    if reward_model is not None:
        scores = reward_model.score(chosen + rejected)
        margins = [scores[i] - scores[n + i] for i in range(n)]
        return {"scored": n, "reward_accuracy": sum(m > 0 for m in margins) / n,
                "reward_margin": sum(margins) / n}, []
    policy = answer_logprob(scorer, chosen + rejected)
    ref = reference_logprob(chosen + rejected)
    reward = [p - r for p, r in zip(policy, ref)]
    margins = [reward[i] - reward[n + i] for i in range(n)]
    return {"scored": n, "implicit_reward_accuracy": sum(m > 0 for m in margins) / n,
            "implicit_reward_margin": sum(margins) / n}, []
