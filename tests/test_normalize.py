"""Vietnamese normalisation: one Unicode form, and tone marks moved only where both styles exist."""

from __future__ import annotations

import unicodedata

import pytest
from transformers import AutoTokenizer

from vitune.config import DataConfig
from vitune.data.normalize import OLD_TO_NEW, normalize_text, normalize_with_change
from vitune.data.pipeline import prepare_sft_data
from vitune.data.templates import get_template

from conftest import write_jsonl

# (old style, new style): the tone mark on the first vowel vs on the second.
PAIRS = [
    ("hòa", "hoà"), ("thúy", "thuý"), ("khỏe", "khoẻ"), ("hóa", "hoá"), ("thủy", "thuỷ"),
    ("lòe", "loè"), ("tùy", "tuỳ"), ("họa", "hoạ"), ("xõa", "xoã"), ("ngụy", "nguỵ"),
    ("góa", "goá"), ("đọa", "đoạ"), ("nhòe", "nhoè"), ("ngóe", "ngoé"),
    ("ủy", "uỷ"), ("òa", "oà"), ("ọe", "oẹ"), ("lũy", "luỹ"),
    ("Hòa", "Hoà"), ("HÒA", "HOÀ"), ("Thủy", "Thuỷ"), ("THỦY", "THUỶ"), ("Khỏe", "Khoẻ"),
    ("Òa", "Oà"), ("ĐỌA", "ĐOẠ"), ("Ủy", "Uỷ"), ("ÚY", "UÝ"),
]

# Both styles spell these the same way, or they are not a matter of style at all.
UNCHANGED = [
    "hoàng", "toán", "khoét", "huýt", "thuyền", "tuyết", "quyển", "khuyên",  # final consonant
    "quý", "quỳ", "quỹ", "Quý", "QUÝ", "quà", "quốc",  # qu + vowel: u is part of the onset
    "già", "giá", "gìa",  # gi + vowel; "gìa" is a misspelling, not a style: left alone
    "hoài", "xoáy", "ngoẻo", "khuỷu", "khuya", "oải",  # three-vowel rimes
    "túi", "mọi", "huế", "thuở", "mùa", "hoặc", "xoắn",  # one placement only
    "hòa2", "abc_hòa", "xhòa", "Hòaa",  # not a whole Vietnamese syllable
    "hoa", "thuy", "khoe", "Hello world", "",
]


@pytest.mark.parametrize("old, new", PAIRS)
def test_old_style_becomes_new_style(old, new):
    assert normalize_text(old, vi_tone="new") == new


@pytest.mark.parametrize("old, new", PAIRS)
def test_new_style_becomes_old_style(old, new):
    assert normalize_text(new, vi_tone="old") == old


@pytest.mark.parametrize("word", UNCHANGED)
@pytest.mark.parametrize("vi_tone", ["new", "old"])
def test_words_outside_the_rule_never_change(word, vi_tone):
    assert normalize_text(word, vi_tone=vi_tone) == word


def _letters(text: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFD", text) if not unicodedata.combining(c))


def test_the_table_covers_five_tones_of_three_clusters_and_moves_only_the_mark():
    assert len(OLD_TO_NEW) == 15
    assert {_letters(old) for old in OLD_TO_NEW} == {"oa", "oe", "uy"}
    for old, new in OLD_TO_NEW.items():
        # the same letters and the same tone mark, only on the other vowel
        assert _letters(old) == _letters(new)
        assert sorted(unicodedata.normalize("NFD", old)) == sorted(unicodedata.normalize("NFD", new))


def test_whole_sentences():
    old = "Hòa bình và sức khỏe là điều quý nhất; Thủy đã ủy quyền cho bà Thúy ở Khánh Hòa."
    new = "Hoà bình và sức khoẻ là điều quý nhất; Thuỷ đã uỷ quyền cho bà Thuý ở Khánh Hoà."
    assert normalize_text(old, vi_tone="new") == new
    assert normalize_text(new, vi_tone="old") == old
    assert normalize_text("(hòa)\n«khỏe», \"thủy\"-hóa!", vi_tone="new") == "(hoà)\n«khoẻ», \"thuỷ\"-hoá!"


def test_nfd_input_becomes_nfc_before_the_tone_rule():
    nfd = unicodedata.normalize("NFD", "Hòa bình, sức khỏe")
    assert normalize_text(nfd) == "Hòa bình, sức khỏe"
    assert normalize_text(nfd, vi_tone="new") == "Hoà bình, sức khoẻ"
    # without a Unicode form, decomposed syllables are left exactly as they came
    assert normalize_text(nfd, unicode="none", vi_tone="new") == nfd


def test_nfkc_also_folds_compatibility_characters():
    assert normalize_text("ｈòa", unicode="NFKC", vi_tone="new") == "hoà"  # full-width h


@pytest.mark.parametrize("vi_tone", ["keep", "new", "old"])
def test_normalising_twice_is_normalising_once(vi_tone):
    text = unicodedata.normalize("NFD", "Hòa thuận, khoẻ mạnh, Thủy và Thuý, quý hoàng.")
    once = normalize_text(text, vi_tone=vi_tone)
    assert normalize_text(once, vi_tone=vi_tone) == once


def test_keep_changes_nothing_but_the_unicode_form():
    mixed = "hòa hoà khỏe khoẻ"
    assert normalize_text(mixed, vi_tone="keep") == mixed
    assert normalize_text(unicodedata.normalize("NFD", mixed), vi_tone="keep") == mixed
    assert normalize_text(unicodedata.normalize("NFD", mixed), unicode="none") == unicodedata.normalize("NFD", mixed)


def test_normalize_with_change_reports_whether_the_text_changed():
    assert normalize_with_change("hòa", vi_tone="new") == ("hoà", True)
    assert normalize_with_change("hoà", vi_tone="new") == ("hoà", False)
    assert normalize_with_change(unicodedata.normalize("NFD", "hà")) == ("hà", True)
    assert normalize_with_change("hòa") == ("hòa", False)


def test_unknown_settings_are_refused():
    with pytest.raises(ValueError, match="vi_tone must be one of keep, new, old, got 'modern'"):
        normalize_text("hòa", vi_tone="modern")
    with pytest.raises(ValueError, match="unicode must be one of NFC, NFKC, none, got 'NFD'"):
        normalize_text("hòa", unicode="NFD")


def test_rows_normalized_counts_rows_changed_by_unicode_or_tone(tmp_path, tiny_llama):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    rows = [
        {"instruction": "Hòa là ai?", "input": "", "output": "Một người bạn."},  # tone only
        {"instruction": unicodedata.normalize("NFD", "Hà Nội"), "output": "Thủ đô."},  # NFD only
        {"instruction": "Chào bạn", "output": "Sức khỏe tốt."},  # tone, in the answer
        {"instruction": "Chào bạn", "output": "Quý khách."},  # nothing to do
    ]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    template = get_template("chatml")

    def run(**normalize):
        data = DataConfig(train=[{"path": str(path)}], normalize=normalize)
        train, _, report = prepare_sft_data(data, tokenizer, template, 1)
        return [tokenizer.decode(r.input_ids) for r in train], report

    texts, report = run(vi_tone="new")
    assert report.rows_normalized == 3
    assert report.summary()["rows_normalized"] == 3
    assert any("Hoà là ai?" in t for t in texts) and any("Sức khoẻ tốt." in t for t in texts)
    assert run()[1].rows_normalized == 1  # NFC only
    assert run(unicode="none")[1].rows_normalized == 0
