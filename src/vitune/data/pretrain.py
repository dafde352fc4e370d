"""Continued-pretraining data (train.stage: pt): text documents -> token chunks of at most max_length.

A document is one `text` row (.jsonl/.json/.parquet/.csv with a text column, a Hub dataset) or
one blank-line-separated block of a .txt file (vitune.data.sources). Each is normalised as SFT
text is (data.normalize), tokenised as the model's tokenizer does by default (Llama-style
tokenizers put their BOS first), and ends with one end-of-document token, so the model learns
where a document stops: the vocabulary's end-of-text token where it has one (`<|end_of_text|>`
of Llama 3, `<|endoftext|>` of Qwen2, SmolLM2, GPT-2 -- what their pretraining used; an instruct
model's EOS is its end-of-turn marker, `<|eot_id|>` or `<|im_end|>`, which would teach the model
to close a chat turn after prose), else the tokenizer's EOS (`</s>` of Llama 2, Mistral). Every
token is trained.

A document longer than data.max_length is split into chunks of max_length tokens (the last one
shorter), never dropped; each chunk is a row of its own, so packing (vitune.data.packing) lays
whole chunks into bins and attention never crosses a document or a chunk boundary. The report
counts documents read, kept, rejected (empty or unreadable rows) and split, and tokens.

With data.streaming the same steps run on the fly (vitune.data.stream); this module reads the
whole corpus into memory, which is right for anything that fits.
"""

from __future__ import annotations

from typing import Iterable, Iterator

from vitune.config import DataConfig, DatasetSpec
from vitune.data.formats import RowProblem, parse_text
from vitune.data.normalize import normalize_with_change
from vitune.data.pipeline import DataReport, formatted_rows, load_records, raise_for_bad_rows
from vitune.data.records import Rejection, Text
from vitune.data.tokenize import TokenizedRow
from vitune.errors import ConfigError, DataError


def read_texts(spec: DatasetSpec, data: DataConfig, report) -> list[Text]:
    """One dataset entry -> its documents (normalised); unusable rows go to the report."""
    texts: list[Text] = []
    for raw, row_format in formatted_rows(spec, report, "text", lambda: len(texts)):
        text = text_of(raw, row_format, spec, report)
        if text is not None:
            texts.append(normalised(text, data, report))
    return texts


def text_of(raw, row_format: str, spec: DatasetSpec, report):
    """A raw row -> Text, or None (the problem recorded in the report)."""
    if row_format != "text":
        raise DataError(
            f"{raw.source}: {row_format} rows cannot train stage pt (continued pretraining reads raw text); "
            "give rows with a text column or .txt files, or use train.stage: sft for instructions and conversations"
        )
    try:
        text = parse_text(raw.row, spec.columns)
    except RowProblem as problem:
        report.rejections.append(Rejection(raw.source, problem.reason, f"text row: {problem.detail}", raw.row))
        return None
    text.source = raw.source
    return text


def normalised(text: Text, data: DataConfig, report) -> Text:
    value, changed = normalize_with_change(text.text, data.normalize.unicode, data.normalize.vi_tone)
    report.rows_normalized += changed
    return Text(value, text.source)


END_OF_TEXT = ("<|end_of_text|>", "<|endoftext|>")  # base models' document separators


def document_end_id(tokenizer) -> int:
    """The token that ends every document: the vocabulary's end-of-text token, else EOS."""
    vocab = tokenizer.get_vocab()
    for token in END_OF_TEXT:
        if token in vocab:
            return vocab[token]
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no EOS token, which ends every pretraining document; give the model "
                          "folder's tokenizer_config.json an eos_token")
    return tokenizer.eos_token_id


def document_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each document as the tokenizer writes it by default, ending with one end-of-document token."""
    eos = document_end_id(tokenizer)
    encoded = tokenizer(texts, add_special_tokens=True)["input_ids"] if texts else []
    return [ids if ids and ids[-1] == eos else ids + [eos] for ids in encoded]


def chunks(ids: list[int], max_length: int) -> Iterator[list[int]]:
    """A document's ids in pieces of max_length tokens (the last one shorter)."""
    for start in range(0, len(ids), max_length):
        yield ids[start:start + max_length]


def tokenize_texts(texts: Iterable[Text], tokenizer, max_length: int, report, count_tokens: bool = True,
                   batch: int = 256, scored: bool = False) -> list[TokenizedRow]:
    """Documents -> rows of at most max_length tokens, every token trained (labels = ids).

    `scored` (held-out text): a document that does not start with a BOS gets the end-of-document
    token before it, as the previous document's end precedes it in training, so its first token
    is predicted too and the held-out loss covers every character (bits per character)."""
    texts = list(texts)
    rows: list[TokenizedRow] = []
    context = [document_end_id(tokenizer)] if scored else []
    bos = tokenizer.bos_token_id
    for at in range(0, len(texts), batch):
        for ids in document_ids(tokenizer, [t.text for t in texts[at:at + batch]]):
            if context and ids[0] != bos:
                ids = context + ids
            if len(ids) > max_length and count_tokens:
                report.rows_split += 1
            for piece in chunks(ids, max_length):
                rows.append(TokenizedRow(piece, list(piece)))
            if count_tokens:
                report.total_tokens += len(ids)
                report.trained_tokens += len(ids)
    return rows


def prepare_pretrain_data(data: DataConfig, tokenizer, seed: int):
    """-> (train rows, eval rows, report): documents read, normalised, tokenised and chunked."""
    report = DataReport()
    train_texts, eval_texts = load_records(data, seed, report, lambda spec: read_texts(spec, data, report),
                                           what="text")
    train = tokenize_texts(train_texts, tokenizer, data.max_length, report)
    evaluation = tokenize_texts(eval_texts, tokenizer, data.max_length, report, count_tokens=False, scored=True)
    raise_for_bad_rows(report, data.on_error)
    report.rows_kept = report.rows_read - report.rows_rejected
    report.eval_characters = sum(len(t.text) for t in eval_texts)
    return train, evaluation, report
