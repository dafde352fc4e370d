"""Vietnamese text normalisation: one Unicode form and, optionally, one tone-mark style.

The same Vietnamese word can reach a model as different code points, and a tokenizer
sees those as different text:

- Unicode form. "hòa" may be precomposed (NFC: `ò` is one code point) or decomposed
  (NFD: `o` + U+0300). NFD costs Llama-2 and Llama-3 tokenizers far more tokens per
  syllable; `unicode: NFC` (the default) composes everything.
- Tone-mark placement. In the open syllables (no final consonant) spelled with the vowel
  clusters "oa", "oe" and "uy", two spellings are in common use:

      old style: the tone mark on the first vowel   hòa  thúy  khỏe  hóa  Thủy  ủy
      new style: the tone mark on the second vowel  hoà  thuý  khoẻ  hoá  Thuỷ  uỷ

  In vitune `vi_tone: old` rewrites new-style syllables to the old style, `vi_tone: new`
  rewrites old-style syllables to the new style, and `vi_tone: keep` (the default) leaves
  every mark where it is.

The conversion is deliberately narrow. A syllable is rewritten only when all of these hold:

- it is a whole word-character run (letters next to letters, digits or "_" never match);
- it is an optional onset consonant from `ONSETS` followed by exactly one entry of
  `OLD_TO_NEW` (or its reverse) and nothing else: the cluster ends the syllable;
- the text is precomposed (NFC/NFKC); decomposed syllables (`unicode: none` on NFD data)
  are left untouched.

Everything else keeps its spelling, because both styles agree on it or the case is not
a matter of style:

- a final consonant: hoàng, toán, khoét, huýt, thuyền (the mark is on the main vowel);
- a three-vowel rime: hoài, xoáy, ngoẻo, khuỷu, khuya;
- "qu" + y: in quý, quỳ, quỹ the u belongs to the onset, so y is the only vowel;
- "gi" + vowel: in già, giá the i belongs to the onset (a form like "gìa" is a misspelling,
  not a style, and is not touched); "g" + oa is a real cluster: góa <-> goá;
- other rimes (ui, oi, ưa, uê, uơ, ...): one placement only.

Letters are never added, removed or re-cased; only the tone mark moves between the two
vowels, each keeping its own case (HÒA <-> HOÀ, Òa <-> Oà).
"""

from __future__ import annotations

import re
import unicodedata

UNICODE_FORMS = ("NFC", "NFKC", "none")
TONE_STYLES = ("keep", "new", "old")

# The whole conversion, lowercase: old style -> new style, five tones per cluster
# (grave, acute, hook above, tilde, dot below). Case variants are derived below.
OLD_TO_NEW: dict[str, str] = {
    "òa": "oà", "óa": "oá", "ỏa": "oả", "õa": "oã", "ọa": "oạ",
    "òe": "oè", "óe": "oé", "ỏe": "oẻ", "õe": "oẽ", "ọe": "oẹ",
    "ùy": "uỳ", "úy": "uý", "ủy": "uỷ", "ũy": "uỹ", "ụy": "uỵ",
}

# Vietnamese initial consonants that may precede these clusters. "qu" is left out on
# purpose (its u is not a vowel of the rime) and so is "gi" (its i is not either).
ONSETS = ("ngh", "ng", "nh", "ch", "kh", "ph", "th", "tr", "gh",
          "b", "c", "d", "đ", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "x")


def _case_variants(old: str, new: str) -> dict[str, str]:
    """hòa-style pair -> the same pair in all four letter casings (òa, Òa, òA, ÒA)."""
    out = {}
    for first_upper in (False, True):
        for second_upper in (False, True):
            def cased(pair: str) -> str:
                a, b = pair
                return (a.upper() if first_upper else a) + (b.upper() if second_upper else b)
            out[cased(old)] = cased(new)
    return out


def _table(pairs: dict[str, str]) -> dict[str, str]:
    table: dict[str, str] = {}
    for old, new in pairs.items():
        table.update(_case_variants(old, new))
    return table


_TO_NEW = _table(OLD_TO_NEW)
_TO_OLD = {new: old for old, new in _TO_NEW.items()}


_COMBINING = "\u0300-\u036f"  # combining diacritical marks, as in NFD text


def _cluster_regex(table: dict[str, str]) -> re.Pattern:
    # The match starts at the toned vowel (a character class the regex engine can scan
    # for quickly) and must end the word (open syllable). A combining mark after it
    # counts as part of the word, so stray decomposed marks are never split off.
    return re.compile(rf"({'|'.join(sorted(table))})(?![\w{_COMBINING}])")


_OLD_CLUSTER = _cluster_regex(_TO_NEW)
_NEW_CLUSTER = _cluster_regex(_TO_OLD)
# What may stand before the cluster: a word start, optionally followed by one onset.
# Checked on the (at most) 4 characters before the cluster: a non-word character (or the
# start of the text) plus an onset of up to 3 letters.
_ONSET_BEFORE = re.compile(rf"(?:[^\w{_COMBINING}]|\A)(?i:{'|'.join(ONSETS)})?\Z")


def _move_tones(text: str, clusters: re.Pattern, table: dict[str, str]) -> str:
    def replace(m: re.Match) -> str:
        start = m.start()
        # \A can only match when the slice is the real start of the text: a 4-character
        # slice would need a 4-letter onset, and none exists.
        if _ONSET_BEFORE.search(text[max(0, start - 4):start]) is None:
            return m.group(1)
        return table[m.group(1)]

    return clusters.sub(replace, text)


def _check(unicode: str, vi_tone: str) -> None:
    if unicode not in UNICODE_FORMS:
        raise ValueError(f"unicode must be one of {', '.join(UNICODE_FORMS)}, got {unicode!r}")
    if vi_tone not in TONE_STYLES:
        raise ValueError(f"vi_tone must be one of {', '.join(TONE_STYLES)}, got {vi_tone!r}")


def normalize_text(text: str, unicode: str = "NFC", vi_tone: str = "keep") -> str:
    """Text in one Unicode form (`NFC`, `NFKC` or `none` = as is) and, unless `vi_tone`
    is `keep`, with the tone marks of oa/oe/uy open syllables in the `new` or `old` style.
    Unicode normalisation runs first, so decomposed input is converted too."""
    _check(unicode, vi_tone)
    # is_normalized is a fast check in C; most text is already NFC
    if unicode != "none" and not unicodedata.is_normalized(unicode, text):
        text = unicodedata.normalize(unicode, text)
    if vi_tone == "new":
        text = _move_tones(text, _OLD_CLUSTER, _TO_NEW)
    elif vi_tone == "old":
        text = _move_tones(text, _NEW_CLUSTER, _TO_OLD)
    return text


def normalize_with_change(text: str, unicode: str = "NFC", vi_tone: str = "keep") -> tuple[str, bool]:
    """`normalize_text`, plus whether the result differs from the input."""
    out = normalize_text(text, unicode, vi_tone)
    return out, out != text
