"""`vitune export gguf`: the file transformers loads back gives the source's logits (exactly at
f32, within a stated tolerance per quant type) for every family of the mission; llama.cpp itself
tokenises the rendered chat prompt as transformers does, decodes greedily to the same tokens and
stops at the end-of-turn token; runs are merged first; extended vocabularies survive; bad input
is one line.

The llama.cpp checks need llama-cpp-python, which compiles llama.cpp (about 5 minutes on 2 cores):
`make llama-cpp` builds its wheel once per machine into ~/.cache/vitune-test/wheels and `make test`
installs it from there. Without it those tests are skipped, saying so.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from transformers import AutoModelForCausalLM, AutoTokenizer

from vitune.cli import main
from vitune.export.gguf import export_gguf
from vitune.export.gguf_vocab import CONTROL

from conftest import ROOT, write_config

FAMILIES = ("llama", "mistral", "qwen2", "bloom")
TEXT = "Xin chào, hôm nay trời đẹp quá. Hà Nội mùa thu năm 2024 có 3 ngày mưa."
# max |logit difference| / max |logit| of the file read back by transformers, per quant type
TOLERANCE = {"f32": 1e-6, "f16": 2e-3, "bf16": 2e-2, "q8_0": 3e-2, "q5_0": 0.25, "q4_0": 0.5}  # random tiny weights: the low-bit errors are large


def export(source: Path, tmp_path: Path, quant: str) -> Path:
    out = tmp_path / f"{source.name}-{quant}.gguf"
    # general.name "tiny ...": transformers 5.24 reads a llama GGUF named exactly "mistral" as an
    # architecture gguf-py does not have
    export_gguf(source, out, quant, name=f"tiny {source.name}")
    return out


def relative_error(source: Path, gguf_file: Path, text: str = TEXT) -> float:
    tok = AutoTokenizer.from_pretrained(source)
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)(ids).logits
        back = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
        got = back(ids).logits
    return float((got - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("arch", FAMILIES)
def test_transformers_reads_back_the_same_logits_exactly_at_f32_and_close_at_q8_0(tiny_models, tmp_path, arch):
    for quant in ("f32", "q8_0"):
        assert relative_error(tiny_models[arch], export(tiny_models[arch], tmp_path, quant)) <= TOLERANCE[quant], quant


@pytest.mark.parametrize("quant", ["f16", "bf16", "q5_0", "q4_0"])
def test_each_python_quant_type_stays_within_its_tolerance(tiny_llama, tmp_path, quant):
    error = relative_error(tiny_llama, export(tiny_llama, tmp_path, quant))
    assert 0 < error <= TOLERANCE[quant]


def test_metadata_carries_the_chat_template_special_ids_and_token_types(tiny_llama, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    reader = GGUFReader(str(export(tiny_llama, tmp_path, "q4_0")))
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert field("general.architecture") == "llama"
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    assert field("tokenizer.chat_template") == tok.chat_template
    assert field("tokenizer.ggml.bos_token_id") == tok.convert_tokens_to_ids("<|begin_of_text|>") == 4
    assert field("tokenizer.ggml.eos_token_id") == tok.convert_tokens_to_ids("<|eot_id|>") == 8
    assert field("tokenizer.ggml.padding_token_id") == 3
    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    assert len(tokens) == len(tok) and tokens[8] == "<|eot_id|>" and types[8] == CONTROL
    assert tokens[500] == tok.convert_ids_to_tokens(500) and types[500] == 1
    assert len(field("tokenizer.ggml.merges")) == len(json.loads(tok.backend_tokenizer.to_str())["model"]["merges"])
    # 1-D weights stay f32; under q4_0 the embedding is kept at q8_0 and the other matrices are q4_0
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.attn_norm.weight"] == "F32" and kinds["token_embd.weight"] == "Q8_0"
    assert kinds["blk.0.attn_q.weight"] == "Q4_0" and kinds["blk.1.ffn_down.weight"] == "Q4_0"


def test_the_end_of_turn_token_is_written_when_it_is_not_eos(tmp_path, tiny_models):
    # Llama-3 style: EOS <|end_of_text|>, turns end with <|eot_id|>; llama.cpp must stop at the latter
    from vitune.models.tiny import init_tiny_model

    folder = init_tiny_model("llama", tmp_path / "llama3-eos")
    tok = AutoTokenizer.from_pretrained(folder)
    tok.eos_token = "<|end_of_text|>"
    tok.save_pretrained(folder)
    reader = GGUFReader(str(export(folder, tmp_path, "f16")))
    assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == 5
    assert reader.fields["tokenizer.ggml.eot_token_id"].contents() == 8


def train_lora(tmp_path: Path, model: Path) -> Path:
    out = tmp_path / "lora-run"
    config = write_config(
        tmp_path / "lora.yaml", model={"name_or_path": str(model)}, method={"type": "lora", "lora": {"dropout": 0.0}},
        data={"train": [{"path": str(ROOT / "data" / "alpaca_vi.jsonl"), "max_samples": 8}], "max_length": 96},
        train={"max_steps": 2, "micro_batch_size": 4, "learning_rate": 1e-2, "warmup_ratio": 0.0,
               "output_dir": str(out), "report_to": ["none"]},
    )
    assert main(["train", str(config)]) == 0
    return out


def test_a_lora_run_is_merged_then_exported(tiny_llama, tmp_path, capsys):
    run = train_lora(tmp_path, tiny_llama)
    out = tmp_path / "run.gguf"
    assert main(["export", "gguf", str(run), "--out", str(out), "--quant", "f32"]) == 0
    printed = capsys.readouterr().out
    assert "merging the adapter" in printed and f"wrote {out}: llama, f32" in printed
    merged = tmp_path / "merged"
    assert main(["merge", str(run), "--out", str(merged), "--dtype", "float32"]) == 0
    assert relative_error(merged, out) <= TOLERANCE["f32"]
    assert relative_error(tiny_llama, out) > 1e-3  # the adapter's change is in the file
    assert not list(tmp_path.glob(".run.gguf.partial-*")) and not list(tmp_path.glob(".vitune-export-*"))


def test_bad_input_is_one_line_and_exit_2(tiny_llama, tmp_path, capsys):
    out = tmp_path / "x.gguf"
    out.write_bytes(b"old")
    cases = [
        (["export", "gguf", str(tiny_llama), "--out", str(out)], f"--out {out} already exists"),
        (["export", "gguf", str(tiny_llama), "--out", str(tmp_path / "y.gguf"), "--quant", "q3"], "--quant q3: choose one of"),
        (["export", "gguf", str(tmp_path / "nope"), "--out", str(tmp_path / "y.gguf")], "folder not found"),
        (["export", "gguf", str(out), "--out", str(tmp_path / "y.gguf")], "is already a GGUF file"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert out.read_bytes() == b"old" and not (tmp_path / "y.gguf").exists()


# ---------------------------------------------------------------- llama.cpp itself

@pytest.fixture(scope="module")
def llama_cpp():
    from llama_cpp_setup import llama_cpp_or_skip

    return llama_cpp_or_skip()


def llama_cpp_greedy(llama_cpp, path: Path, prompt: str, n: int) -> tuple[list[int], list[int], object]:
    """(llama.cpp's ids for the prompt, its greedy tokens up to n or an end of generation, the model)"""
    llm = llama_cpp.Llama(str(path), n_ctx=512, verbose=False, n_threads=2)
    ids = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
    out = []
    for token in llm.generate(ids, temp=0.0, top_k=1):
        if llm.token_eos() == token or llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(llm.model), token):
            out.append(token)
            break
        out.append(token)
        if len(out) == n:
            break
    return ids, out, llm


@pytest.mark.parametrize("arch", FAMILIES)
def test_llama_cpp_tokenises_and_decodes_as_transformers(llama_cpp, tiny_models, tmp_path, arch):
    folder = tiny_models[arch]
    tok = AutoTokenizer.from_pretrained(folder)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Thủ đô của Việt Nam là gì? Năm 1010."}],
                                     tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, add_special_tokens=False).input_ids
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    want = model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False)[0, len(ids):].tolist()
    got_ids, got, _ = llama_cpp_greedy(llama_cpp, export(folder, tmp_path, "f16"), prompt, 10)
    assert got_ids == ids
    assert got == want


def test_llama_cpp_quantises_k_quants(llama_cpp, tiny_llama, tmp_path, capsys):
    out = tmp_path / "k.gguf"
    assert main(["export", "gguf", str(tiny_llama), "--out", str(out), "--quant", "q4_k_m"]) == 0
    kinds = {t.tensor_type.name for t in GGUFReader(str(out)).tensors}
    assert "Q4_K" in kinds and GGUFReader(str(out)).fields["tokenizer.chat_template"].contents()


def test_smollm2_in_llama_cpp_answers_as_transformers_and_stops_at_im_end(llama_cpp, smollm2, tmp_path):
    tok = AutoTokenizer.from_pretrained(smollm2)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, add_special_tokens=False).input_ids
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    want = model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False,
                          eos_token_id=[im_end])[0, len(ids):].tolist()
    out = tmp_path / "smollm2-f16.gguf"
    export_gguf(smollm2, out, "f16")
    got_ids, got, _ = llama_cpp_greedy(llama_cpp, out, prompt, 40)
    assert got_ids == ids
    assert want[-1] == im_end and got == want  # same answer, and llama.cpp stops where transformers does
    assert "Paris" in tok.decode(got)
    assert np.isclose(out.stat().st_size / 2**20, 258, atol=8)


def test_a_sentencepiece_style_vocabulary_tokenises_in_llama_cpp_as_in_transformers(llama_cpp, real_tokenizer, tmp_path):
    # Llama 2's real 32k vocabulary (Mistral, Vistral and VinaLlama use the same kind): scores from the merge ranks
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = real_tokenizer("llama-spm", new=True)
    folder = tmp_path / "spm"
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    out = tmp_path / "spm.gguf"
    export_gguf(folder, out, "f16")
    reader = GGUFReader(str(out))
    assert reader.fields["tokenizer.ggml.model"].contents() == "llama"
    assert reader.fields["tokenizer.ggml.token_type"].contents()[3:6] == [6, 6, 6]  # <0x00>.. are bytes
    llm = llama_cpp.Llama(str(out), vocab_only=True, verbose=False)
    texts = ["Xin chào, hôm nay trời đẹp quá.", "Nguyễn Du viết Truyện Kiều\nvào thế kỷ 19.", "hello world  two spaces",
             "Việt Nam 🇻🇳 năm 2024: 3,5% tăng trưởng"]
    texts += [json.loads(line)["text"][:300] for line in open(ROOT / "data" / "corpus_vi_eval.jsonl", encoding="utf-8")][:6]
    for text in texts:
        assert llm.tokenize(text.encode("utf-8"), add_bos=True, special=False) == tok(text).input_ids, text


def test_an_extended_vocabulary_keeps_its_new_tokens_and_merges(llama_cpp, tiny_llama, tmp_path):
    extended = tmp_path / "extended"
    assert main(["vocab", "extend", str(tiny_llama), "--corpus", str(ROOT / "data" / "corpus_vi.jsonl"),
                 "--new-tokens", "300", "--out", str(extended)]) == 0
    tok = AutoTokenizer.from_pretrained(extended)
    assert len(tok) == 4096 + 300
    out = export(extended, tmp_path, "f32")
    assert relative_error(extended, out) <= TOLERANCE["f32"]
    llm = llama_cpp.Llama(str(out), vocab_only=True, verbose=False)
    text = json.loads(open(ROOT / "data" / "corpus_vi_eval.jsonl", encoding="utf-8").readline())["text"]
    ids = tok(text, add_special_tokens=False).input_ids
    assert max(ids) >= 4096  # the new tokens are used
    assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == ids
