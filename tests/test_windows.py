"""Sliding-window attention in training: a packed step on rows longer than the window equals the
rows run one at a time, for Mistral's single window and Gemma 3's per-layer pattern (sliding
layers and a global one), so packing never lets a token see further back than the model does."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from test_packing import ALPACA, SHAREGPT, first_step, packed_items
from vitune.config import validate_config
from vitune.data.pipeline import prepare_sft_data
from vitune.data.templates import resolve_template
from vitune.train.collate import PackedCollator, PadCollator

MAX_LENGTH = 384


@pytest.fixture(scope="module")
def windowed(tiny_models, tmp_path_factory):
    """{name: (model folder, window)}: tiny Mistral with a 16-token window, tiny Gemma 3 (32)."""
    mistral = tmp_path_factory.mktemp("windows") / "mistral-w16"
    shutil.copytree(tiny_models["mistral"], mistral)
    config = json.loads((mistral / "config.json").read_text())
    (mistral / "config.json").write_text(json.dumps({**config, "sliding_window": 16}))
    return {"mistral": (mistral, 16), "gemma3": (tiny_models["gemma3"], 32)}


def rows_of(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = validate_config({"model": {"name_or_path": str(model_dir)},
                              "data": {"train": [{"path": str(SHAREGPT), "max_samples": 3}, {"path": str(ALPACA), "max_samples": 4}],
                                       "max_length": MAX_LENGTH}})
    rows, _, _ = prepare_sft_data(config.data, tokenizer, resolve_template("auto", tokenizer), seed=0)
    return rows


@pytest.mark.parametrize("name", ["mistral", "gemma3"])
def test_packed_step_keeps_each_layers_window(windowed, tmp_path, name):
    model_dir, window = windowed[name]
    rows = rows_of(model_dir)
    assert min(len(r.input_ids) for r in rows) > window  # every row crosses the window
    one_by_one = [{"input_ids": r.input_ids, "labels": r.labels} for r in rows]
    bins = packed_items(rows, MAX_LENGTH)
    assert 1 < len(bins) < len(rows)
    single_loss, single_grads = first_step(model_dir, one_by_one, PadCollator(0), 1, len(rows), tmp_path)
    packed_loss, packed_grads = first_step(model_dir, bins, PackedCollator(), len(bins), 1, tmp_path)
    assert packed_loss == pytest.approx(single_loss, abs=1e-5)
    assert packed_grads.keys() == single_grads.keys() and len(packed_grads) > 0
    for key, grad in packed_grads.items():
        assert torch.allclose(grad, single_grads[key], atol=1e-5), key


@pytest.mark.parametrize("name", ["mistral", "gemma3"])
def test_the_window_changes_the_loss(windowed, name):
    """The check above can fail: the same weights without the window give another loss."""
    model_dir, _ = windowed[name]
    row = max(rows_of(model_dir), key=lambda r: len(r.input_ids))
    ids, labels = torch.tensor([row.input_ids]), torch.tensor([row.labels])
    with torch.no_grad():
        model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.float32)
        windowed_loss = model(input_ids=ids, labels=labels).loss.item()
        model.config.sliding_window = 10_000  # wider than the row: every layer sees it all
        for layer in model.model.layers:
            if getattr(layer.self_attn, "sliding_window", None):
                layer.self_attn.sliding_window = 10_000
        unwindowed_loss = model(input_ids=ids, labels=labels).loss.item()
    assert abs(windowed_loss - unwindowed_loss) > 1e-4
