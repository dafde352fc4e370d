"""Stage pt: continued pretraining on raw text -- documents ending with the end-of-text token,
long documents split (never dropped), .txt files, byte-range shares, normalisation, bad input in
one line, runs with LoRA / QLoRA / full, and streaming: bins, shares, exact resume, bounded memory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import unicodedata
from itertools import islice
from pathlib import Path

import pytest
from safetensors.torch import load_file
from transformers import AutoTokenizer

from vitune.cli import main
from vitune.config import DataConfig
from vitune.data.pretrain import document_end_id, prepare_pretrain_data
from vitune.data.sources import read_range, read_rows
from vitune.data.stream import StreamPosition, TextStream
from vitune.train.checkpoint import MARKER, complete_checkpoints

from conftest import ROOT, write_config, write_jsonl

CORPUS = ROOT / "data" / "corpus_vi.jsonl"
HELD_OUT = ROOT / "data" / "corpus_vi_eval.jsonl"


@pytest.fixture(scope="module")
def tok(tiny_llama):
    return AutoTokenizer.from_pretrained(tiny_llama)


def texts_file(path: Path, texts: list[str]) -> Path:
    return write_jsonl(path, [{"text": t} for t in texts])


def pt_config(tmp_path: Path, model: Path, out: Path, data: dict, method: str = "lora", **train) -> Path:
    return write_config(
        tmp_path / f"{out.name}.yaml",
        model={"name_or_path": str(model)},
        method={"type": method},
        data={"max_length": 64, **data},
        train={"stage": "pt", "max_steps": 3, "micro_batch_size": 2, "learning_rate": 1e-3, "output_dir": str(out),
               "logging_steps": 1, "report_to": ["none"], **train},
    )


def error_of(capsys) -> str:
    return " ".join(capsys.readouterr().err.split())


# ---------------------------------------------------------------- documents -> tokens


def test_each_document_ends_with_the_end_of_text_token_and_every_token_is_trained(tok, tmp_path):
    path = texts_file(tmp_path / "c.jsonl", ["Xin chào Hà Nội", "Phở bò"])
    data = DataConfig(train=[{"path": str(path)}], max_length=64)
    train, evaluation, report = prepare_pretrain_data(data, tok, seed=0)
    end = document_end_id(tok)
    assert tok.convert_ids_to_tokens(end) == "<|end_of_text|>"  # not the instruct EOS <|eot_id|>
    expected = sorted([tok("Xin chào Hà Nội")["input_ids"] + [end], tok("Phở bò")["input_ids"] + [end]])
    assert sorted(r.input_ids for r in train) == expected
    assert all(r.labels == r.input_ids for r in train)
    assert (report.rows_read, report.rows_kept, report.rows_split, report.total_tokens, report.trained_tokens) == (
        2, 2, 0, sum(map(len, expected)), sum(map(len, expected)))
    assert evaluation == []


def test_the_real_smollm2_tokenizer_ends_documents_with_endoftext(smollm2):
    from vitune.data.pretrain import document_ids

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    assert tokenizer.eos_token == "<|im_end|>"  # the instruct model's end of turn ...
    assert document_ids(tokenizer, ["Xin chào"]) == [[72, 254, 410, 16739, 95, 0]]  # ... but 0 = <|endoftext|>


def test_a_long_document_is_split_into_chunks_and_nothing_is_dropped(tok, tmp_path):
    long = "một hai ba bốn năm sáu bảy tám chín mười " * 3
    ids = tok(long)["input_ids"] + [document_end_id(tok)]
    assert len(ids) == 33
    path = texts_file(tmp_path / "c.jsonl", [long, "ngắn"])
    data = DataConfig(train=[{"path": str(path)}], max_length=8)
    train, _, report = prepare_pretrain_data(data, tok, seed=0)
    short = tok("ngắn")["input_ids"] + [document_end_id(tok)]
    assert len(short) == 3
    # 33 = 8 + 8 + 8 + 8 + 1, in order, each chunk a row of its own
    assert sorted(r.input_ids for r in train) == sorted([ids[0:8], ids[8:16], ids[16:24], ids[24:32], ids[32:], short])
    assert (report.rows_split, report.total_tokens, report.rows_kept) == (1, 36, 2)


def test_text_is_normalised_to_nfc_as_for_sft(tok, tmp_path):
    nfd = unicodedata.normalize("NFD", "Tiếng Việt")
    path = texts_file(tmp_path / "c.jsonl", [nfd])
    train, _, report = prepare_pretrain_data(DataConfig(train=[{"path": str(path)}]), tok, seed=0)
    assert train[0].input_ids == tok("Tiếng Việt")["input_ids"] + [document_end_id(tok)]
    assert report.rows_normalized == 1


def test_txt_files_are_documents_separated_by_blank_lines(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("Một hai\nba bốn\n\n\nnăm sáu\n  \nbảy\ntám\n", encoding="utf-8")
    rows = list(read_rows(str(path)))
    assert [(r.source, r.row) for r in rows] == [
        (f"{path}:1", {"text": "Một hai\nba bốn"}), (f"{path}:5", {"text": "năm sáu"}), (f"{path}:7", {"text": "bảy\ntám"})]


@pytest.mark.parametrize("suffix", [".jsonl", ".txt"])
def test_byte_ranges_that_tile_a_file_read_every_row_exactly_once(tmp_path, suffix):
    path = tmp_path / f"c{suffix}"
    docs = [f"đoạn {i} " + "chữ " * (i % 9) for i in range(60)]
    if suffix == ".jsonl":
        texts_file(path, docs)
    else:
        path.write_text("\n\n".join(d.replace(" chữ", "\nchữ", 1) for d in docs) + "\n", encoding="utf-8")
    every = [r.row["text"] for r in read_rows(str(path))]
    assert len(every) == 60
    size = path.stat().st_size
    for shares in (2, 3, 7, 16):
        cuts = [size * i // shares for i in range(shares + 1)]
        parts = [[r.row["text"] for r in read_range(path, cuts[i], cuts[i + 1])] for i in range(shares)]
        assert sum(parts, []) == every, shares
        assert all(parts), shares  # each share holds rows of its own


# ---------------------------------------------------------------- bad input


def test_a_txt_file_that_is_not_utf8_is_one_line_naming_the_file_and_byte(tiny_llama, tmp_path, capsys):
    path = tmp_path / "c.txt"
    path.write_bytes("Xin chào\n\nHà ".encode() + b"\xff\xfe" + " Nội\n".encode())
    config = pt_config(tmp_path, tiny_llama, tmp_path / "out", {"train": [{"path": str(path)}]})
    assert main(["train", str(config)]) == 2
    assert error_of(capsys) == f"error: {path}: not UTF-8 at byte 15; save the file as UTF-8"
    assert not (tmp_path / "out").exists()


def test_conversation_rows_cannot_train_stage_pt(tiny_llama, tmp_path, capsys):
    config = pt_config(tmp_path, tiny_llama, tmp_path / "out", {"train": [{"path": str(ROOT / "data" / "alpaca_vi.jsonl")}]})
    assert main(["train", str(config)]) == 2
    err = error_of(capsys)
    assert err.startswith(f"error: {ROOT / 'data' / 'alpaca_vi.jsonl'}:1: alpaca rows cannot train stage pt")
    assert "give rows with a text column or .txt files" in err


def test_an_empty_corpus_is_one_line(tiny_llama, tmp_path, capsys):
    path = texts_file(tmp_path / "c.jsonl", ["", "   "])
    config = pt_config(tmp_path, tiny_llama, tmp_path / "out", {"train": [{"path": str(path)}]})
    assert main(["train", str(config)]) == 2
    err = error_of(capsys)
    assert err.startswith("error: 2 bad row(s):") and "empty" in err


@pytest.mark.parametrize("data, train, message", [
    ({"streaming": True}, {"max_steps": None}, "data.streaming needs train.max_steps"),
    ({"streaming": True, "val_size": 2}, {}, "data.val_size cannot hold rows out of a stream; give held-out text as data.eval"),
])
def test_streaming_config_mistakes_are_one_line(tiny_llama, tmp_path, capsys, data, train, message):
    path = texts_file(tmp_path / "c.jsonl", ["Xin chào"])
    config = pt_config(tmp_path, tiny_llama, tmp_path / "out", {"train": [{"path": str(path)}], **data}, **train)
    assert main(["train", str(config)]) == 2
    assert message in error_of(capsys)


def test_streaming_is_only_for_stage_pt(tiny_llama, tmp_path, capsys):
    config = pt_config(tmp_path, tiny_llama, tmp_path / "out",
                       {"train": [{"path": str(ROOT / "data" / "alpaca_vi.jsonl")}], "streaming": True}, stage="sft")
    assert main(["train", str(config)]) == 2
    assert "data.streaming is for continued pretraining (train.stage: pt), not stage sft" in error_of(capsys)


def test_streaming_a_parquet_file_is_one_line(tiny_llama, tmp_path, capsys):
    path = tmp_path / "c.parquet"
    path.write_bytes(b"PAR1")
    config = pt_config(tmp_path, tiny_llama, tmp_path / "out", {"train": [{"path": str(path)}], "streaming": True})
    assert main(["train", str(config)]) == 2
    assert error_of(capsys) == (f"error: {path}: data.streaming reads .jsonl and .txt files, not .parquet; convert it to "
                                '.jsonl (one {"text": ...} per line) or set data.streaming: false')


# ---------------------------------------------------------------- runs


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_pt_runs_with_every_method_and_writes_a_complete_run_folder(method, tiny_llama, tmp_path):
    out = tmp_path / method
    config = pt_config(tmp_path, tiny_llama, out, {"train": [{"path": str(CORPUS), "max_samples": 12}],
                                                  "eval": [{"path": str(HELD_OUT), "max_samples": 2}]}, method=method)
    assert main(["train", str(config)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["stage"], summary["steps"], summary["template"]) == ("pt", 3, None)
    assert summary["eval_loss_start"] > 0 and summary["eval_loss_end"] > 0
    report = json.loads((out / "data_report.json").read_text())
    assert (report["rows_read"], report["rows_kept"]) == (14, 14)  # 12 training + 2 held-out documents
    assert report["rows_split"] == 12  # every document of ~1,000 characters is longer than 64 tokens
    weights = "model.safetensors" if method == "full" else "adapter_model.safetensors"
    assert (out / weights).is_file()
    # the model's own chat template is kept as it was (pt renders no conversations)
    before = AutoTokenizer.from_pretrained(tiny_llama).chat_template
    assert AutoTokenizer.from_pretrained(out).chat_template == before


# ---------------------------------------------------------------- streaming


def stream_data(path: Path, max_length: int = 16) -> DataConfig:
    return DataConfig(train=[{"path": str(path)}], max_length=max_length, streaming=True)


def numbered(tmp_path: Path, n: int = 40) -> Path:
    return texts_file(tmp_path / "s.jsonl", [f"văn bản số {i} " * (i % 5 + 1) for i in range(n)])


def test_a_stream_packs_documents_end_to_end_into_full_bins(tok, tmp_path):
    path = numbered(tmp_path)
    stream = TextStream(stream_data(path), tok)
    bins = list(islice(iter(stream), 12))
    end = document_end_id(tok)
    docs = [tok(f"văn bản số {i} " * (i % 5 + 1))["input_ids"] + [end] for i in range(40)]
    flat = sum(docs, [])
    assert [b["input_ids"] for b in bins] == [flat[i * 16:(i + 1) * 16] for i in range(12)]
    assert all(b["labels"] == b["input_ids"] and sum(b["seq_lengths"]) == 16 for b in bins)
    # pieces follow document boundaries: the first bin holds document 0 whole, then the start of document 1
    assert bins[0]["seq_lengths"] == [len(docs[0]), 16 - len(docs[0])]
    last = bins[-1]["stream_position"]
    assert last["tokens"] == 192 and last["epoch"] == 0
    whole = next(k for k in range(40) if sum(map(len, docs[:k + 1])) > 192)
    assert last["documents"] == whole  # documents finished within the 192 tokens


def test_a_stream_resumes_from_a_saved_position_without_reading_again(tok, tmp_path):
    path = numbered(tmp_path)
    # 626 tokens a pass: 45 bins of 16 run into the second epoch
    bins = list(islice(iter(TextStream(stream_data(path), tok)), 45))
    epochs = [b["stream_position"]["epoch"] for b in bins]
    assert epochs == [0] * 40 + [1] * 5
    for at in (0, 4, 11, 38, 40):
        resumed = TextStream(stream_data(path), tok, position=StreamPosition(**bins[at]["stream_position"]))
        again = list(islice(iter(resumed), 44 - at))
        assert [b["input_ids"] for b in again] == [b["input_ids"] for b in bins[at + 1:]], at
        assert again[-1]["stream_position"] == bins[-1]["stream_position"]


def test_two_processes_stream_disjoint_shares_that_cover_the_corpus(tok, tmp_path):
    path = numbered(tmp_path, 41)
    read = []
    for rank in (0, 1):
        stream = TextStream(stream_data(path), tok, rank=rank, world=2)
        docs = []
        for _, offset, ids in stream.documents(StreamPosition()):
            if stream.epoch > 0:
                break
            docs.append(offset)
        read.append(docs)
    every = [r.offset for r in read_rows(str(path))]
    assert read[0] and read[1] and not set(read[0]) & set(read[1])
    assert read[0] + read[1] == every


def test_a_streaming_run_saves_its_position_and_resumes_to_the_same_weights(tiny_llama, tmp_path):
    data = {"train": [{"path": str(numbered(tmp_path, 60))}], "max_length": 32, "streaming": True}

    def run(out: Path) -> Path:
        return pt_config(tmp_path, tiny_llama, out, data, method="full", max_steps=6, save_steps=3)

    reference = tmp_path / "uninterrupted"
    assert main(["train", str(run(reference))]) == 0
    saved = json.loads((reference / "checkpoint-3" / "stream-0.json").read_text())
    assert saved["tokens"] == 3 * 2 * 32  # 3 steps x 2 bins x 32 tokens, none replayed or skipped
    report = json.loads((reference / "data_report.json").read_text())["stream"]
    assert (report["processes"], report["tokens"]) == (1, 6 * 2 * 32)
    # a run that stopped after checkpoint-3 (its later checkpoints gone) resumes to the same weights
    out = tmp_path / "resumed"
    out.mkdir()
    import shutil

    shutil.copytree(reference / "checkpoint-3", out / "checkpoint-3")
    for name in ("config.yaml", "data_report.json", "metrics.jsonl"):
        shutil.copy(reference / name, out / name)
    assert main(["train", str(run(out)), "--set", "train.resume=auto"]) == 0
    a, b = load_file(out / "model.safetensors"), load_file(reference / "model.safetensors")
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


@pytest.mark.slow
def test_kill_9_then_resume_of_a_stream_reaches_the_weights_of_an_uninterrupted_run(tiny_llama, tmp_path):
    data = {"train": [{"path": str(numbered(tmp_path, 200))}], "max_length": 32, "streaming": True}

    def run(out: Path) -> Path:
        return pt_config(tmp_path, tiny_llama, out, data, method="full", max_steps=12, save_steps=4)

    reference = tmp_path / "uninterrupted"
    assert main(["train", str(run(reference))]) == 0
    out = tmp_path / "killed"
    config = run(out)
    proc = subprocess.Popen([sys.executable, "-m", "vitune", "train", str(config)],
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    while not (out / "checkpoint-4" / MARKER).exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "summary.json").exists() and complete_checkpoints(out)
    assert main(["train", str(config), "--set", "train.resume=auto"]) == 0
    a, b = load_file(out / "model.safetensors"), load_file(reference / "model.safetensors")
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


@pytest.mark.slow
def test_two_process_streaming_run_reads_disjoint_shares(tiny_llama, tmp_path):
    path = numbered(tmp_path, 400)
    out = tmp_path / "two"
    config = pt_config(tmp_path, tiny_llama, out, {"train": [{"path": str(path)}], "max_length": 32,
                                                  "streaming": True}, max_steps=3, micro_batch_size=1)
    assert main(["train", str(config), "--nproc", "2"]) == 0
    stream = json.loads((out / "data_report.json").read_text())["stream"]
    assert stream["processes"] == 2 and stream["tokens"] == 2 * 3 * 32
    size = path.stat().st_size
    first, second = stream["per_process"]
    assert first["offset"] < size // 2 <= second["offset"]  # each process is within its own half


STREAM_MEMORY = r'''
import json, resource, sys
from itertools import islice
from transformers import AutoTokenizer
from vitune.config import DataConfig
from vitune.data.stream import TextStream
tok = AutoTokenizer.from_pretrained(sys.argv[1])
stream = iter(TextStream(DataConfig(train=[{"path": sys.argv[2]}], max_length=256, streaming=True), tok))
for b in islice(stream, 50):
    pass
start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
n = 50
for b in stream:
    n += 1
    if b["stream_position"]["epoch"] > 0:
        break
print(json.dumps({"bins": n, "growth_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start}))
'''


@pytest.mark.slow
def test_streaming_memory_stays_bounded_on_a_corpus_much_larger_than_the_bound(tiny_llama, tmp_path):
    corpus = tmp_path / "big.jsonl"
    with open(corpus, "w", encoding="utf-8") as fh:
        for i in range(40_000):
            fh.write(json.dumps({"text": f"Đoạn văn số {i}: " + "người Việt Nam yêu tiếng mẹ đẻ. " * 30},
                                ensure_ascii=False) + "\n")
    size_mib = corpus.stat().st_size / 2**20
    assert size_mib > 40
    result = subprocess.run([sys.executable, "-c", STREAM_MEMORY, str(tiny_llama), str(corpus)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout)
    assert measured["bins"] > 10_000  # the whole corpus went through
    assert measured["growth_kib"] < 8 * 1024  # bound: 8 MiB of growth for a corpus of more than 40 MiB


def test_held_out_bits_per_character_is_the_summed_nll_over_the_characters(tiny_llama, tmp_path, tok):
    import math

    import torch
    from transformers import AutoModelForCausalLM

    held_out = ["Hà Nội là thủ đô của Việt Nam.", "Sông Hồng bồi đắp phù sa cho đồng bằng Bắc Bộ."]
    out = tmp_path / "bpc"
    config = pt_config(tmp_path, tiny_llama, out, {"train": [{"path": str(CORPUS), "max_samples": 4}],
                                                  "eval": [{"path": str(texts_file(tmp_path / "h.jsonl", held_out))}]},
                       method="full", max_steps=3, warmup_ratio=0.0, learning_rate=1e-3)
    assert main(["train", str(config)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    # by hand: every token of each document, after the end-of-text token that precedes it in training
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    end = document_end_id(tok)
    nats = 0.0
    for text in held_out:
        ids = torch.tensor([[end] + tok(text)["input_ids"] + [end]])
        with torch.no_grad():
            logits = model(ids).logits[0, :-1]
        nats += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
    expected = nats / math.log(2) / sum(len(t) for t in held_out)
    assert summary["eval_bits_per_char_start"] == pytest.approx(expected, rel=1e-5)
    assert summary["eval_bits_per_char_end"] < summary["eval_bits_per_char_start"]


def test_train_tokens_new_trains_only_the_rows_vocab_extend_added(tiny_llama, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    extended = tmp_path / "extended"
    assert main(["vocab", "extend", str(tiny_llama), "--corpus", str(CORPUS), "--new-tokens", "64",
                 "--out", str(extended)]) == 0
    new_ids = json.loads((extended / "vocab_report.json").read_text())["new_token_ids"]
    assert len(new_ids) == 64 and new_ids == list(range(new_ids[0], new_ids[0] + 64))
    out = tmp_path / "pt"
    config = pt_config(tmp_path, extended, out, {"train": [{"path": str(CORPUS), "max_samples": 8}]},
                       learning_rate=1e-2, warmup_ratio=0.0)
    assert main(["train", str(config), "--set", "method.lora.train_tokens=new"]) == 0
    saved = load_file(out / "adapter_model.safetensors")
    deltas = [k for k in saved if "trainable_tokens" in k]
    assert deltas and all(saved[k].shape[0] == 64 for k in deltas)  # the new rows only, saved small
    base = AutoModelForCausalLM.from_pretrained(extended)
    before = base.get_input_embeddings().weight.detach().clone()
    trained = PeftModel.from_pretrained(base, out).merge_and_unload()
    after = trained.get_input_embeddings().weight.detach()
    changed = (after != before).any(dim=1).nonzero().squeeze(1).tolist()
    assert changed and set(changed) <= set(new_ids)


def test_train_tokens_new_without_a_vocab_report_is_one_line(tiny_llama, tmp_path, capsys):
    config = pt_config(tmp_path, tiny_llama, tmp_path / "out", {"train": [{"path": str(CORPUS), "max_samples": 2}]})
    assert main(["train", str(config), "--set", "method.lora.train_tokens=new"]) == 2
    assert error_of(capsys) == (f"error: method.lora.train_tokens: new needs a model made by `vitune vocab extend`; "
                                f"{tiny_llama} has no vocab_report.json (give a list of token ids instead)")


def test_data_inspect_shows_pt_documents_with_their_end_of_text_token(tiny_llama, tmp_path, capsys):
    path = texts_file(tmp_path / "c.jsonl", ["Xin chào Hà Nội", "Phở bò"])
    config = pt_config(tmp_path, tiny_llama, tmp_path / "out", {"train": [{"path": str(path)}]})
    assert main(["data", "inspect", str(config)]) == 0
    shown = capsys.readouterr().out
    assert "Xin chào Hà Nội<|end_of_text|>" in shown and "Phở bò<|end_of_text|>" in shown
    assert "2 / 2 / 0" in shown  # rows read / kept / rejected


def test_streamed_bins_unpack_into_padded_rows_for_models_that_cannot_pack(tok, tmp_path):
    from vitune.train.collate import PadCollator
    from vitune.train.stages.pt import StreamCollator

    bins = list(islice(iter(TextStream(stream_data(numbered(tmp_path)), tok)), 2))
    batch = StreamCollator(PadCollator(pad_token_id=0), unpack=True)(bins)
    pieces = [n for b in bins for n in b["seq_lengths"]]
    assert batch["input_ids"].shape == (len(pieces), max(pieces))
    assert batch["attention_mask"].sum(dim=1).tolist() == pieces  # every piece its own row, no attention across
    assert batch["input_ids"][0, :pieces[0]].tolist() == bins[0]["input_ids"][:pieces[0]]
    assert batch["stream_position"] == bins[-1]["stream_position"]  # the position after the last bin


def test_a_folder_of_txt_files_is_a_corpus_but_notes_beside_data_files_are_not_read(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "b.txt").write_text("Hai\n\nBa\n", encoding="utf-8")
    (corpus / "a.txt").write_text("Một\n", encoding="utf-8")
    assert [r.row["text"] for r in read_rows(str(corpus))] == ["Một", "Hai", "Ba"]
    texts_file(corpus / "c.jsonl", ["Bốn"])
    assert [r.row["text"] for r in read_rows(str(corpus))] == ["Bốn"]  # a.txt and b.txt are now notes


def test_data_inspect_of_a_streaming_config_shows_the_first_bins(tiny_llama, tmp_path, capsys):
    config = pt_config(tmp_path, tiny_llama, tmp_path / "out", {"train": [{"path": str(numbered(tmp_path))}],
                                                              "max_length": 16, "streaming": True})
    assert main(["data", "inspect", str(config), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    # 626 tokens a pass, bins of 16: the preview reads 200 bins (into later epochs), every bin full
    assert stats["streaming_preview_bins"] == 200 and stats["train_rows"] == 200
    assert stats["length_percentiles"] == {"p50": 16, "p90": 16, "p99": 16, "min": 16, "max": 16}
    assert stats["template"] is None  # pt renders no conversations
