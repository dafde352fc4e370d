"""`vitune vocab extend`: new Vietnamese tokens as real vocabulary entries with appended merges,
embeddings grown with mean-initialised rows; real tokenizers (Llama-2, Llama-3, Qwen2,
SmolLM2) and tiny models of real architectures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from vitune.cli import main
from vitune.models.vocab import extend_tokenizer_json, extend_vocabulary, held_out_counts, learn_extension, read_corpus

ROOT = Path(__file__).resolve().parents[1]
CORPUS = [str(ROOT / "data" / f) for f in ("alpaca_vi.jsonl", "sharegpt_vi.jsonl", "preference_vi.jsonl")]
HELD_OUT = str(ROOT / "data" / "preference_vi_eval.jsonl")
# text the Vietnamese merges do not touch: same ids as before
OTHER_TEXT = [
    "The quick brown fox jumps over the lazy dog. It was 3:45 pm on 2024-05-01.",
    "def main(argv):\n    return sum(x * 2 for x in range(10))  # comment\n",
    "Hello 😀 world 🇻🇳 12345678 3.14159 -42 1e-9",
    "if (a != b) { printf(\"%d\\n\", a); }",
]


@pytest.fixture(scope="module")
def corpus_docs():
    return read_corpus(CORPUS)[0]


@pytest.fixture(scope="module")
def bundled_vietnamese():
    return read_corpus([str(ROOT / "data" / "alpaca_vi.jsonl"), str(ROOT / "data" / "sharegpt_vi.jsonl")])[0]


def error_of(capsys) -> str:
    return " ".join(capsys.readouterr().err.split())


def tokenizer_only(source: Path, folder: Path) -> Path:
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(source / name, folder / name)
    return folder


@pytest.mark.parametrize("fixture", ["llama_spm", pytest.param("llama_bpe", marks=pytest.mark.slow),  # ~13 s each
                                     pytest.param("qwen2", marks=pytest.mark.slow)])
def test_real_tokenizers_extended_round_trip_and_keep_other_text(fixture, request, corpus_docs, bundled_vietnamese):
    from tokenizers import Tokenizer

    spec = json.loads(request.getfixturevalue(fixture).backend_tokenizer.to_str())
    ext = learn_extension(spec, corpus_docs, 1000)
    assert len(ext.new_tokens) == 1000
    new_spec = extend_tokenizer_json(spec, ext)
    old, new = Tokenizer.from_str(json.dumps(spec)), Tokenizer.from_str(json.dumps(new_spec))
    for text in bundled_vietnamese + OTHER_TEXT:
        assert new.decode(new.encode(text, add_special_tokens=False).ids) == text
    for text in OTHER_TEXT:
        assert new.encode(text, add_special_tokens=False).ids == old.encode(text, add_special_tokens=False).ids
    # real vocabulary entries with contiguous ids after the old ones, not added tokens
    added = {t["content"] for t in new_spec["added_tokens"]}
    first = 1 + max([*spec["model"]["vocab"].values(), *(t["id"] for t in spec["added_tokens"])])
    assert [t.id for t in ext.new_tokens] == list(range(first, first + 1000))
    assert all(new.token_to_id(t.content) == t.id and t.content not in added for t in ext.new_tokens)
    assert new.get_vocab_size() == old.get_vocab_size() + 1000
    assert all(new.token_to_id(t["content"]) == t["id"] for t in spec["added_tokens"])
    # the old merges keep their places; the new ones come after
    assert new_spec["model"]["merges"][: len(spec["model"]["merges"])] == [
        m if isinstance(m, list) else m.split(" ", 1) for m in spec["model"]["merges"]]
    held = read_corpus([HELD_OUT])[0]
    assert held_out_counts(new_spec, held)[0] < held_out_counts(spec, held)[0]


def test_smollm2_tokens_on_held_out_text_drop_by_more_than_half(smollm2, tmp_path):
    folder = tokenizer_only(smollm2, tmp_path / "smollm2-tokenizer")
    report = extend_vocabulary(str(folder), CORPUS, 8000, tmp_path / "out", held_out=HELD_OUT, at_most=True)
    held = report["held_out"]
    assert (report["new_tokens"], held["syllables"], held["tokens_before"], held["tokens_after"]) == (3048, 4137, 13811, 5422)
    assert held["reduction_percent"] == 60.74
    assert (report["corpus"]["documents"], report["corpus"]["bytes"]) == (2094, 318458)
    assert len(report["sample_new_tokens"]) == 20 and report["embedding_rows"] is None
    assert not (tmp_path / "out" / "model.safetensors").exists()


def extend_tiny(folder: Path, out: Path, *extra: str) -> int:
    return main(["vocab", "extend", str(folder), "--corpus", CORPUS[0], "--new-tokens", "40", "--out", str(out), *extra])


@pytest.mark.parametrize("arch", ["llama", "bloom"])  # llama: untied embeddings; bloom: tied
def test_tiny_model_extended_keeps_old_logits_and_mean_initialises_new_rows(arch, tiny_models, tmp_path, capsys):
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    assert extend_tiny(tiny_models[arch], out, "--pad-to-multiple-of", "64", "--held-out", HELD_OUT) == 0
    assert f"wrote {out}" in " ".join(capsys.readouterr().out.split())
    report = json.loads((out / "vocab_report.json").read_text(encoding="utf-8"))
    assert report["new_tokens"] == 40 and report["vocab_size_before"] == 4096
    assert report["embedding_rows"] == {"before": 4096, "after": 4160, "tied": arch == "bloom", "pad_to_multiple_of": 64}
    old_model = AutoModelForCausalLM.from_pretrained(tiny_models[arch])
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape[0] == model.config.vocab_size == 4160
    tied = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert tied == (arch == "bloom")

    old_tok, tok = AutoTokenizer.from_pretrained(tiny_models[arch]), AutoTokenizer.from_pretrained(out)
    fast = Tokenizer.from_file(str(out / "tokenizer.json"))
    text = "Hà Nội là thủ đô của Việt Nam, một thành phố nghìn năm tuổi."
    assert tok(text, add_special_tokens=False).input_ids == fast.encode(text, add_special_tokens=False).ids
    assert len(tok) == len(old_tok) + 40 and not set(tok.get_added_vocab()) - set(old_tok.get_added_vocab())

    ids = torch.tensor([old_tok(text).input_ids])
    with torch.no_grad():
        before, after = old_model(ids).logits, model(ids).logits
    torch.testing.assert_close(after[..., :4096], before, rtol=0, atol=1e-5)

    old_spec = json.loads((tiny_models[arch] / "tokenizer.json").read_text(encoding="utf-8"))
    ext = learn_extension(old_spec, read_corpus([CORPUS[0]])[0], 40)  # deterministic: the same tokens
    assert [t.id for t in ext.new_tokens] == list(range(4096, 4136))
    for token in ext.new_tokens:
        word = tok.decode([token.id])
        assert old_tok.decode(list(token.spelling)) == word and len(token.spelling) > 1
        assert tok(word, add_special_tokens=False).input_ids == [token.id]
    for layer in ("get_input_embeddings", "get_output_embeddings"):
        old_rows, rows = getattr(old_model, layer)().weight, getattr(model, layer)().weight
        for token in ext.new_tokens:
            torch.testing.assert_close(rows[token.id], old_rows[list(token.spelling)].mean(0), rtol=0, atol=1e-7)
        torch.testing.assert_close(rows[4136:], old_rows.mean(0).expand(24, -1), rtol=0, atol=1e-7)  # padding rows
        assert torch.equal(rows[:4096], old_rows)


def test_a_sentencepiece_model_file_is_left_out_and_said_so(tiny_llama, tmp_path, capsys):
    folder = tokenizer_only(tiny_llama, tmp_path / "tok")
    (folder / "tokenizer.model").write_bytes(b"\x0a\x00")
    assert extend_tiny(folder, tmp_path / "out") == 0
    assert "left out tokenizer.model" in " ".join(capsys.readouterr().out.split())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["tokenizer.json", "tokenizer_config.json", "vocab_report.json"]


def wordpiece_folder(folder: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder.mkdir()
    tok = Tokenizer(models.WordPiece({"[UNK]": 0, "xin": 1, "chào": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}', encoding="utf-8")
    return folder


@pytest.mark.parametrize("case, expected", [
    ("empty", "empty.txt: no text found"),
    ("binary", "binary.txt: not UTF-8 text at byte 3 (of 7)"),
    ("too_many", "the corpus can supply only"),
    ("wordpiece", "the tokenizer is WordPiece, which vocab extension does not handle; supported: BPE tokenizers"),
    ("huge", "over the 2147483647 ids an embedding index can hold"),
    ("out_not_empty", "already exists and is not empty"),
])
def test_bad_input_is_one_line_and_exit_2(case, expected, tiny_llama, tmp_path, capsys):
    folder, corpus, n, out = tokenizer_only(tiny_llama, tmp_path / "tok"), CORPUS[0], "40", tmp_path / "out"
    if case == "empty":
        corpus = tmp_path / "empty.txt"
        corpus.write_text("\n\n  \n", encoding="utf-8")
    elif case == "binary":
        corpus = tmp_path / "binary.txt"
        corpus.write_bytes(b"abc\xff\xfe\x00z")
    elif case == "too_many":
        n = "100000"
    elif case == "wordpiece":
        folder = wordpiece_folder(tmp_path / "wp")
    elif case == "huge":
        n = str(2**31)
    elif case == "out_not_empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine", encoding="utf-8")
    code = main(["vocab", "extend", str(folder), "--corpus", str(corpus), "--new-tokens", n, "--out", str(out)])
    message = error_of(capsys)
    assert code == 2 and expected in message and message.count("error:") == 1
    if case == "too_many":
        could = int(message.split("supply only ")[1].split()[0])
        assert 0 < could < 100000 and f"--new-tokens {could} or fewer" in message
    # nothing half-written is left beside --out
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert not out.exists() or sorted(p.name for p in out.iterdir()) == ["keep.txt"]
