"""Example reward functions for train.stage: rl (see examples/grpo.yaml).

A reward function takes the prompt (the text of the last user message) and the completion (the
answer the model generated, without its end-of-turn marker), both strings, and returns a number:
higher is better. Name it in the config as module:function, e.g.

    rl:
      rewards:
        - function: examples.rewards:vietnamese

(vitune imports `examples.rewards` from the folder it runs in, like `python -c "import examples.rewards"`).
Keep rewards deterministic and fast: each is called once for every completion of every step.
"""

from __future__ import annotations

import re
import unicodedata

# Letters only Vietnamese writes among Latin-script languages: the modified vowels and đ ...
VIETNAMESE_LETTERS = set("ăâđêôơư")
# ... and the five tone marks (grave, acute, hook above, tilde, dot below) on any vowel
TONE_MARKS = {"\u0300", "\u0301", "\u0309", "\u0303", "\u0323"}
WORD = re.compile(r"[^\W\d_]+")  # a run of letters (any script)


def is_vietnamese_word(word: str) -> bool:
    """True if the word carries a Vietnamese letter or tone mark (`tiếng`, `đi`, `của`), False
    for words without (`ba`, `con`, and every English word)."""
    lower = word.lower()
    if any(ch in VIETNAMESE_LETTERS for ch in unicodedata.normalize("NFC", lower)):
        return True
    return any(ch in TONE_MARKS for ch in unicodedata.normalize("NFD", lower))


def vietnamese(prompt: str, completion: str) -> float:
    """How clearly the answer is written in Vietnamese with its diacritics, from 0 to 1.

    The share of the answer's words that carry a Vietnamese letter or tone mark, divided by 0.5
    and capped at 1: in ordinary Vietnamese prose more than half of the syllables do (the rest
    are words like `ba`, `con`, `cho`), so Vietnamese scores 1, Vietnamese typed without
    diacritics and English score 0, and a mix lands in between. Answers of fewer than five words
    earn a fifth of that per word, so an empty or one-word answer cannot win. The prompt is not
    used.

    >>> vietnamese("", "Phở là món ăn truyền thống của Việt Nam.")
    1.0
    >>> vietnamese("", "Pho is a traditional Vietnamese dish.")
    0.0
    >>> vietnamese("", "Pho la mon an truyen thong cua Viet Nam.")
    0.0
    """
    words = WORD.findall(completion)
    if not words:
        return 0.0
    share = sum(is_vietnamese_word(w) for w in words) / len(words)
    return round(min(1.0, share / 0.5) * min(1.0, len(words) / 5), 6)


def brevity(prompt: str, completion: str) -> float:
    """1 for an empty answer, falling linearly to 0 at 400 characters: a counterweight to rewards
    that longer answers can game (give it a small weight)."""
    return max(0.0, 1.0 - len(completion) / 400)


def short_vietnamese(prompt: str, completion: str, words: int = 12) -> float:
    """A short answer in Vietnamese, from 0 to 1: `vietnamese` times min(1, words / the answer's words),
    so up to 12 words keep the full Vietnamese score and 24 words halve it. The reward of
    examples/ppo.yaml: SmolLM2-135M-Instruct answers Vietnamese questions at length and is cut off
    mid-sentence; this asks it to say less, and to end its turn.

    >>> short_vietnamese("", "Phở là món ăn truyền thống của Việt Nam.")
    1.0
    >>> short_vietnamese("", "Phở là món ăn truyền thống của Việt Nam, " * 3)
    0.444444
    >>> short_vietnamese("", "Pho is a Vietnamese dish.")
    0.0
    """
    count = len(WORD.findall(completion))
    return round(vietnamese(prompt, completion) * min(1.0, words / max(count, 1)), 6)
