"""`vitune merge`: merged logits equal base + adapter (LoRA exactly, QLoRA against its de-quantised
base), plain transformers loads the folder, it stops at the template's end of turn, extended
vocabularies keep their new rows, and bad input is one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from vitune.cli import main

from conftest import ROOT, train_run as train

ALPACA = ROOT / "data" / "alpaca_vi.jsonl"
CORPUS = ROOT / "data" / "corpus_vi.jsonl"


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def error_of(capsys) -> str:
    return " ".join(capsys.readouterr().err.split())


@pytest.fixture(scope="module")
def lora_run(tiny_llama, tmp_path_factory) -> Path:
    return train(tmp_path_factory.mktemp("merge"), tiny_llama, "lora")


def test_merged_lora_logits_equal_base_plus_adapter_and_it_stops_at_the_end_of_turn(lora_run, tiny_llama, tmp_path):
    from peft import PeftModel

    out = tmp_path / "merged"
    assert main(["merge", str(lora_run), "--out", str(out)]) == 0
    assert not (out / "adapter_config.json").exists() and (out / "model.safetensors").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out)  # plain transformers
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), lora_run).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("Thủ đô của Việt Nam là Hà Nội.")["input_ids"]
    assert torch.allclose(logits(merged, ids), logits(reference, ids), atol=1e-4, rtol=0)
    assert (logits(merged, ids) - logits(AutoModelForCausalLM.from_pretrained(tiny_llama), ids)).abs().max() > 1e-3
    # the training template travels with the tokenizer; generation stops at its end of turn and at EOS
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(lora_run).chat_template
    stops = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert tokenizer.convert_ids_to_tokens(stops) == ["<|eot_id|>"]  # llama3 template: its end of turn is the EOS
    assert json.loads((out / "vitune_merge.json").read_text())["dtype"] == "float32"


def test_a_chatml_run_stops_at_im_end_and_at_eos(tiny_models, tmp_path):
    run = train(tmp_path, tiny_models["qwen2"], "qwen2")
    out = tmp_path / "merged"
    assert main(["merge", str(run), "--out", str(out)]) == 0
    stops = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    tokens = AutoTokenizer.from_pretrained(out).convert_ids_to_tokens(stops)
    assert "<|im_end|>" in tokens and len(stops) == len(set(stops))


def test_a_gemma3_run_merges_exactly_and_keeps_its_embedding_tied(tiny_models, tmp_path):
    # Gemma 3 ties its output matrix to the embedding: the merge must neither untie them nor save
    # a second copy that a loader could read instead
    from peft import PeftModel

    base = tiny_models["gemma3"]
    run = train(tmp_path, base, "gemma3")
    out = tmp_path / "merged"
    assert main(["merge", str(run), "--out", str(out), "--dtype", "float32"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out)
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), run).eval()
    ids = AutoTokenizer.from_pretrained(out)("Thủ đô của Việt Nam là Hà Nội, thành phố nghìn năm văn hiến.")["input_ids"]
    assert (logits(merged, ids) - logits(reference, ids)).abs().max() < 1e-5
    assert (logits(merged, ids) - logits(AutoModelForCausalLM.from_pretrained(base), ids)).abs().max() > 1e-3
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert merged.lm_head.weight.data_ptr() == merged.get_input_embeddings().weight.data_ptr()
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as weights:
        assert "lm_head.weight" not in weights.keys()
        embedding = weights.get_tensor("model.embed_tokens.weight")
    assert torch.equal(embedding, AutoModelForCausalLM.from_pretrained(base).get_input_embeddings().weight)
    stops = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert AutoTokenizer.from_pretrained(out).convert_ids_to_tokens(stops) == ["<end_of_turn>", "<eos>"]


def test_merge_with_dtype_bfloat16(lora_run, tmp_path):
    out = tmp_path / "bf16"
    assert main(["merge", str(lora_run), "--out", str(out), "--dtype", "bfloat16"]) == 0
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16


def dequantised_copy(folder: Path):
    """The model with every linear layer bitsandbytes quantises (all but lm_head) rounded to NF4 with
    double quantisation and back, in fp32: the weights a QLoRA run trains against, exactly."""
    import bitsandbytes.functional as bnbf

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
            packed, state = bnbf.quantize_4bit(module.weight.data, quant_type="nf4", compress_statistics=True)
            module.weight.data = bnbf.dequantize_4bit(packed, state).to(torch.float32)
    return model


def test_merged_qlora_equals_its_dequantised_4bit_base_plus_adapter(tiny_llama, tmp_path):
    from peft import PeftModel
    from transformers import BitsAndBytesConfig

    run = train(tmp_path, tiny_llama, "qlora", method="qlora")
    out = tmp_path / "merged"
    assert main(["merge", str(run), "--out", str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out)
    ids = AutoTokenizer.from_pretrained(out)("Sông Hồng chảy qua Hà Nội.")["input_ids"]
    # what the run trained: the de-quantised 4-bit base + the adapter, built here independently
    reference = PeftModel.from_pretrained(dequantised_copy(tiny_llama), run).eval()
    gap = (logits(merged, ids) - logits(reference, ids)).abs().max()
    assert gap < 1e-4, gap
    # bitsandbytes' own 4-bit forward agrees within its kernels' precision: on CPUs with AVX512-BF16
    # it multiplies in bf16 (measured gaps 0.008-0.02 on tiny models), elsewhere in fp32 (< 1e-3)
    four_bit = AutoModelForCausalLM.from_pretrained(tiny_llama, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32))
    in_4bit = PeftModel.from_pretrained(four_bit, run).eval()
    assert (logits(merged, ids) - logits(in_4bit, ids)).abs().max() < 5e-2
    # the 16-bit original is further from what was trained
    original = tmp_path / "original"
    assert main(["merge", str(run), "--out", str(original), "--qlora-base", "original"]) == 0
    far = (logits(AutoModelForCausalLM.from_pretrained(original), ids) - logits(reference, ids)).abs().max()
    assert far > 100 * gap and far > 1e-3


def test_the_two_stage_vocabulary_recipe_extend_pt_merge_then_lora(tiny_llama, tmp_path):
    """The recipe of docs/stages/pt.md: extend the vocabulary, train the new rows (pt + train_tokens),
    merge, then an ordinary LoRA fine-tune of the merged folder, whose adapter carries no embedding copies."""
    extended = tmp_path / "extended"
    assert main(["vocab", "extend", str(tiny_llama), "--corpus", str(CORPUS), "--new-tokens", "64",
                 "--out", str(extended)]) == 0
    run = train(tmp_path, extended, "pt", stage="pt", data=CORPUS, train_tokens="new")
    out = tmp_path / "merged"
    assert main(["merge", str(run), "--out", str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(extended)
    new_ids = json.loads((extended / "vocab_report.json").read_text())["new_token_ids"]
    rows, before = merged.get_input_embeddings().weight, base.get_input_embeddings().weight
    assert rows.shape == before.shape  # every new row kept
    changed = (rows != before).any(dim=1).nonzero().squeeze(1).tolist()
    assert changed and set(changed) <= set(new_ids)  # the trained new rows, merged in
    assert (out / "vocab_report.json").is_file()

    sft = train(tmp_path, out, "sft")  # stage 2: LoRA on the merged folder (examples/sft_vocab.yaml)
    settings = json.loads((sft / "adapter_config.json").read_text())
    assert settings["base_model_name_or_path"] == str(out) and not settings.get("modules_to_save")
    assert not settings.get("trainable_token_indices")
    from safetensors import safe_open

    with safe_open(sft / "adapter_model.safetensors", "pt") as weights:
        assert all("lora_" in name for name in weights.keys())  # what vLLM's --lora-modules loads
    assert len(AutoTokenizer.from_pretrained(sft)) == len(AutoTokenizer.from_pretrained(extended))


def test_bad_input_is_one_line(lora_run, tiny_llama, tmp_path, capsys):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text((lora_run / "config.yaml").read_text())
    assert main(["merge", str(unfinished), "--out", str(tmp_path / "x")]) == 2
    assert error_of(capsys) == (f"error: {unfinished} is an unfinished run (no summary.json): train it to the end "
                                "(or resume it) first")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "f").write_text("x")
    assert main(["merge", str(lora_run), "--out", str(taken)]) == 2
    assert error_of(capsys) == f"error: --out {taken} already exists; choose another folder or add --force to replace it"
    assert main(["merge", str(lora_run), "--out", str(tmp_path / "y"), "--dtype", "int8"]) == 2
    assert "--dtype int8: choose one of auto, float32, bfloat16, float16" in error_of(capsys)
    full = train(tmp_path, tiny_llama, "full", method="full")
    assert main(["merge", str(full), "--out", str(tmp_path / "z")]) == 2
    assert "is a full fine-tune: it is already a complete model folder" in error_of(capsys)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # nothing half-written left
