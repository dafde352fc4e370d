"""Scores of generated answers against reference answers, for `vitune eval --generate`.

In: two equal-length lists of strings (model predictions, reference answers).
Out: per-pair floats (`exact_match` 0/1, `chrf` 0..100, `rouge_l` 0..1) and, over a whole
set, an `AnswerScores` with the row count, mean exact match, corpus chrF, mean ROUGE-L and the
share of repeated word 3-grams in the predictions (`repetition`: how much a model loops).

Both sides go through `normalize_answer` first, so Unicode form, tone-mark style
("hoà" vs "hòa"), case, punctuation and spacing never count as a difference.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from functools import lru_cache

from vitune.data.normalize import normalize_text


def normalize_answer(text: str, vi_tone: str = "new") -> str:
    """Lower-cased NFC text with one tone-mark style (`vi_tone`), Unicode punctuation
    (categories P*) replaced by spaces and whitespace collapsed to single spaces, stripped."""
    # Lower-case first so the NFC step in normalize_text also composes what lower() yields.
    text = normalize_text(text.lower(), "NFC", vi_tone)
    # punctuation becomes a space, so "Hà Nội,Việt Nam" keeps its two words apart
    text = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text)
    return " ".join(text.split())


class WhitespaceTokenizer:
    """Tokens = the whitespace-separated words of already normalised text."""

    def tokenize(self, text: str) -> list[str]:
        return text.split()


@lru_cache(maxsize=1)
def _chrf_metric():
    # Imported here, not at module level, so `import vitune.eval.metrics` stays cheap.
    from sacrebleu.metrics import CHRF

    return CHRF()  # chrF2: char n-grams 1..6, beta=2, whitespace ignored


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    # The default tokenizer keeps only [a-z0-9], turning "Hà Nội" into "h n i": split on spaces.
    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=WhitespaceTokenizer())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 if both normalise to the same string, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def _empty_score(pred: str, ref: str, full: float) -> float | None:
    """The score when either normalised side is empty (sacrebleu/rouge would say 0 for
    both-empty too); None when neither is."""
    if pred and ref:
        return None
    return full if pred == ref else 0.0


def _chrf_normalised(pred: str, ref: str) -> float:
    empty = _empty_score(pred, ref, 100.0)
    if empty is not None:
        return empty
    return _chrf_metric().sentence_score(pred, [ref]).score


def _rouge_l_normalised(pred: str, ref: str) -> float:
    empty = _empty_score(pred, ref, 1.0)
    if empty is not None:
        return empty
    # rouge_score's argument order is (target, prediction)
    return _rouge_scorer().score(ref, pred)["rougeL"].fmeasure


def chrf(prediction: str, reference: str) -> float:
    """Sentence chrF (0..100) of the normalised prediction against the normalised reference."""
    return _chrf_normalised(normalize_answer(prediction), normalize_answer(reference))


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (0..1) over whitespace tokens of the normalised strings."""
    return _rouge_l_normalised(normalize_answer(prediction), normalize_answer(reference))


@dataclass
class AnswerScores:
    count: int
    exact_match: float  # mean over rows, 0..1
    chrf: float  # corpus-level chrF over all rows, 0..100
    rouge_l: float  # mean of sentence ROUGE-L F over rows, 0..1
    repetition: float  # repeated word 3-grams / all word 3-grams of the predictions, 0..1


def repeated_ngrams(text: str, n: int = 3) -> tuple[int, int]:
    """(repeated, total) word n-grams of one normalised answer: an n-gram counts as repeated each
    time it occurs again after its first occurrence. A looping answer ("để để để ...") is near 1."""
    words = normalize_answer(text).split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(grams) - len(set(grams)), len(grams)


def repetition(predictions: list[str], n: int = 3) -> float:
    """The share of repeated word n-grams over all predictions (pooled, so long answers weigh
    more); 0.0 when no prediction has n words."""
    counts = [repeated_ngrams(p, n) for p in predictions]
    total = sum(t for _, t in counts)
    return sum(r for r, _ in counts) / total if total else 0.0


def score_answers(predictions: list[str], references: list[str]) -> AnswerScores:
    """Scores of a whole answer set; chrF is corpus-level (n-gram counts summed over rows,
    so long answers weigh more), exact match and ROUGE-L are row means."""
    if len(predictions) != len(references):
        raise ValueError(
            f"predictions and references must have the same length, "
            f"got {len(predictions)} predictions and {len(references)} references"
        )
    if not predictions:
        raise ValueError("no answers to score: predictions and references are empty")
    preds = [normalize_answer(p) for p in predictions]
    refs = [normalize_answer(r) for r in references]
    n = len(preds)
    em = sum(p == r for p, r in zip(preds, refs)) / n
    rl = sum(_rouge_l_normalised(p, r) for p, r in zip(preds, refs)) / n
    if all(not p and not r for p, r in zip(preds, refs)):
        corpus_chrf = 100.0  # nothing to miss on either side, as in the sentence case
    else:
        # Both-empty rows add no n-grams, so they neither help nor hurt the corpus score.
        corpus_chrf = _chrf_metric().corpus_score(preds, [refs]).score
    return AnswerScores(count=n, exact_match=em, chrf=corpus_chrf, rouge_l=rl, repetition=repetition(predictions))
