"""Answer scoring for `vitune eval --generate`: normalisation, exact match, chrF, ROUGE-L."""

from __future__ import annotations

import subprocess
import sys
import unicodedata
from collections import Counter

import pytest
from rouge_score import rouge_scorer
from sacrebleu.metrics import CHRF

from vitune.eval.metrics import (
    AnswerScores,
    chrf,
    exact_match,
    normalize_answer,
    rouge_l,
    repeated_ngrams,
    repetition,
    score_answers,
)


def reference_chrf(hyp: str, ref: str, order: int = 6, beta: float = 2.0) -> float:
    """chrF written from its definition: char n-grams 1..order with whitespace removed,
    precision and recall averaged over the orders both sides have n-grams of, then F-beta."""
    hyp, ref = "".join(hyp.split()), "".join(ref.split())
    precisions, recalls = [], []
    for n in range(1, order + 1):
        h = Counter(hyp[i:i + n] for i in range(len(hyp) - n + 1))
        r = Counter(ref[i:i + n] for i in range(len(ref) - n + 1))
        if not h or not r:
            continue
        match = sum((h & r).values())
        precisions.append(match / sum(h.values()))
        recalls.append(match / sum(r.values()))
    if not precisions:
        return 0.0
    p, r = sum(precisions) / len(precisions), sum(recalls) / len(recalls)
    if p + r == 0:
        return 0.0
    return 100 * (1 + beta**2) * p * r / (beta**2 * p + r)


# normalize_answer

def test_normalize_lowercases_strips_punctuation_and_collapses_spaces():
    # default vi_tone="new": the oa cluster keeps/gets the mark on its second vowel
    assert normalize_answer("  Hoà   BÌNH! ") == "hoà bình"


def test_normalize_old_tone_style_on_request():
    assert normalize_answer("  Hoà   BÌNH! ", vi_tone="old") == "hòa bình"


def test_normalize_composes_decomposed_input():
    decomposed = unicodedata.normalize("NFD", "Thủy")
    assert decomposed != "Thủy"
    assert normalize_answer(decomposed, vi_tone="keep") == "thủy"


def test_normalize_removes_trailing_period():
    assert normalize_answer("Hà Nội.") == "hà nội"


def test_normalize_removes_unicode_punctuation():
    assert normalize_answer("«Việt Nam» – “quê hương”…") == "việt nam quê hương"


def test_normalize_unifies_tone_styles():
    # "thủy" = old style (mark on u), "thuỷ" = new style (mark on y)
    assert normalize_answer("thủy") == normalize_answer("thuỷ") == "thuỷ"


# exact_match

def test_exact_match_ignores_case_and_punctuation():
    assert exact_match("Hà Nội", "hà nội.") == 1.0


def test_exact_match_different_answers():
    assert exact_match("Hà Nội", "Hải Phòng") == 0.0


def test_exact_match_ignores_tone_style():
    assert exact_match("hoà", "hòa") == 1.0


def test_exact_match_both_empty():
    assert exact_match("", " ... ") == 1.0


# rouge_l

def test_rouge_l_reordered_words():
    # p=[thủ,đô,là,hà,nội], r=[hà,nội,là,thủ,đô]: LCS 2 (e.g. "thủ đô"), P=R=2/5, F=0.4
    assert rouge_l("thủ đô là hà nội", "hà nội là thủ đô") == pytest.approx(0.4, abs=1e-9)


def test_rouge_l_unequal_lengths():
    # p=[hà,nội], r=[thủ,đô,là,hà,nội]: LCS 2, P=1, R=2/5, F=2*1*0.4/1.4=4/7
    assert rouge_l("Hà Nội", "Thủ đô là Hà Nội.") == pytest.approx(4 / 7, abs=1e-9)


def test_rouge_l_identical():
    assert rouge_l("Thủ đô là Hà Nội", "thủ đô là hà nội!") == 1.0


def test_rouge_l_disjoint():
    assert rouge_l("Hà Nội", "Hải Phòng") == 0.0


def test_rouge_l_keeps_vietnamese_diacritics():
    assert rouge_l("má", "mà") == 0.0


def test_default_rouge_tokenizer_would_erase_diacritics():
    # why metrics.py passes its own tokenizer: the default one reduces both words to "m"
    default = rouge_scorer.RougeScorer(["rougeL"])
    assert default.score("mà", "má")["rougeL"].fmeasure == 1.0


def test_rouge_l_empty_side():
    assert rouge_l("", "Hà Nội") == 0.0
    assert rouge_l("Hà Nội", "!") == 0.0


def test_rouge_l_both_empty():
    assert rouge_l("", "  ") == 1.0


# chrf

def test_chrf_identical():
    assert chrf("Hà Nội", "hà nội.") == 100.0


def test_chrf_disjoint_characters():
    assert chrf("abc", "xyz") == 0.0


def test_chrf_hand_computed():
    # hyp "hà", ref "hàn": 1-grams P=2/2 R=2/3, 2-grams P=1/1 R=1/2, no 3-grams in hyp.
    # avg P=1, avg R=7/12; F2 = 5*(7/12) / (4 + 7/12) = 7/11
    assert chrf("Hà", "hàn") == pytest.approx(700 / 11, abs=1e-6)
    assert reference_chrf("hà", "hàn") == pytest.approx(700 / 11, abs=1e-6)


def test_chrf_matches_sacrebleu_and_reference_on_normalised_text():
    pred, ref = "Thủ đô của Việt Nam là Hà Nội.", "Hà Nội là thủ đô!"
    value = chrf(pred, ref)
    assert 0.0 < value < 100.0
    p, r = normalize_answer(pred), normalize_answer(ref)
    assert value == pytest.approx(CHRF().sentence_score(p, [r]).score, abs=1e-6)
    assert value == pytest.approx(reference_chrf(p, r), abs=1e-6)


def test_chrf_ignores_tone_style():
    assert chrf("Hoà bình", "hòa bình") == 100.0


def test_chrf_empty_side():
    assert chrf("", "Hà Nội") == 0.0
    assert chrf("Hà Nội", "") == 0.0


def test_chrf_both_empty():
    assert chrf("", "?") == 100.0


# score_answers

PREDICTIONS = ["Hà Nội", "thủ đô là hà nội", "Hoà bình"]
REFERENCES = ["hà nội.", "hà nội là thủ đô", "hòa bình"]


def test_score_answers_three_rows():
    scores = score_answers(PREDICTIONS, REFERENCES)
    assert isinstance(scores, AnswerScores)
    assert scores.count == 3
    assert scores.exact_match == pytest.approx(2 / 3, abs=1e-9)
    assert scores.rouge_l == pytest.approx((1.0 + 0.4 + 1.0) / 3, abs=1e-9)


def test_score_answers_chrf_is_corpus_level():
    scores = score_answers(PREDICTIONS, REFERENCES)
    preds = [normalize_answer(p) for p in PREDICTIONS]
    refs = [normalize_answer(r) for r in REFERENCES]
    assert scores.chrf == pytest.approx(CHRF().corpus_score(preds, [refs]).score, abs=1e-9)
    # corpus chrF pools n-gram counts; it is not the mean of the sentence scores
    mean = sum(chrf(p, r) for p, r in zip(PREDICTIONS, REFERENCES)) / 3
    assert scores.chrf != pytest.approx(mean, abs=1e-6)


def test_score_answers_length_mismatch():
    with pytest.raises(ValueError, match="same length.*2 predictions and 1 references"):
        score_answers(["a", "b"], ["a"])


def test_score_answers_empty():
    with pytest.raises(ValueError, match="empty"):
        score_answers([], [])


def test_import_does_not_load_scoring_libraries():
    code = ("import sys, vitune.eval.metrics; "
            "print('sacrebleu' in sys.modules, 'rouge_score' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_punctuation_between_words_keeps_them_apart():
    assert normalize_answer("Hà Nội,Việt Nam") == "hà nội việt nam"


# repetition: how much an answer loops


def test_repeated_ngrams_of_a_looping_answer():
    # 8 words -> 6 three-grams: (việt nam được) (nam được để) (được để để) (để để để) x3 -> 2 repeats
    assert repeated_ngrams("Việt Nam được để để để để để") == (2, 6)
    assert repeated_ngrams("Thủ đô của Việt Nam là Hà Nội.") == (0, 6)
    assert repeated_ngrams("Hà Nội") == (0, 0)  # fewer than 3 words: nothing to count


def test_repetition_pools_all_answers():
    answers = ["Việt Nam được để để để để để", "Thủ đô của Việt Nam là Hà Nội.", "Hà Nội"]
    assert repetition(answers) == 2 / 12
    assert score_answers(answers, ["x"] * 3).repetition == 2 / 12
    assert repetition(["a b", ""]) == 0.0
    # case, tone-mark style and punctuation do not hide a loop
    assert repeated_ngrams("Hoà bình, hòa bình. HOÀ BÌNH hoà bình") == (4, 6)  # 2 distinct of 6
