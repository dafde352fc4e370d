"""`vitune export gguf`: the file transformers loads back gives the source's logits (exactly at
f32, within a stated tolerance per quant type) for every family of the mission; llama.cpp itself
computes transformers' logits, tokenises the rendered chat prompt as transformers does, decodes
greedily to the same tokens and stops at the end-of-turn token; the real Gemma-3-270M does the same
in llama.cpp past its sliding window; runs are merged first; extended vocabularies survive; bad
input is one line.

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
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from vitune.cli import main
from vitune.export.gguf import export_gguf
from vitune.export.gguf_vocab import CONTROL

from conftest import ROOT, write_config

FAMILIES = ("llama", "mistral", "qwen2", "gemma3", "bloom")
TEXT = "Xin chào, hôm nay trời đẹp quá. Hà Nội mùa thu năm 2024 có 3 ngày mưa."
# transformers' GGUF reader keeps only some of Gemma 3's settings (not its layer kinds nor
# query_pre_attn_scalar: it takes the real Gemma 3's defaults), so the tiny one is read back with
# its own config; that llama.cpp reads the rest from the file, its logits below show
READ_WITH_SOURCE_CONFIG = ("gemma3_text",)
# max |logit difference| / max |logit| of llama.cpp's f32 forward pass against transformers', 1e-4
# unless named (measured: llama, qwen2 6e-7; bloom 2e-5; gemma3 3.7e-4, because ggml computes GELU
# through an f16 table, GGML_GELU_FP16: 1.4e-4 with that table mimicked in transformers; a wrong
# Gemma 3 layer pattern gives 0.08)
LLAMA_CPP_TOLERANCE = {"gemma3": 1e-3}
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
    config = AutoConfig.from_pretrained(source)
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)(ids).logits
        back = AutoModelForCausalLM.from_pretrained(
            gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32,
            **({"config": config} if config.model_type in READ_WITH_SOURCE_CONFIG else {}))
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


def test_gemma3_norms_are_shifted_by_one_its_embedding_tied_and_its_window_layers_described(tiny_models, tmp_path):
    # Gemma's RMSNorm scales by (1 + weight), llama.cpp's by the weight; the q/k projections keep
    # HF's layout (llama.cpp's gemma3 rotates halves); the output matrix is the embedding
    from safetensors import safe_open

    folder = tiny_models["gemma3"]
    reader = GGUFReader(str(export(folder, tmp_path, "f32")))
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert field("general.architecture") == "gemma3"
    assert field("gemma3.attention.sliding_window") == 32
    assert field("gemma3.attention.sliding_window_pattern") == [True, True, True, False]
    assert field("gemma3.rope.freq_base") == 1_000_000.0 and field("gemma3.rope.freq_base_swa") == 10_000.0
    assert field("gemma3.attention.key_length") == field("gemma3.attention.value_length") == 64
    tensors = {t.name: t.data for t in reader.tensors}
    assert "output.weight" not in tensors and len(tensors) == 2 + 4 * 13
    with safe_open(folder / "model.safetensors", "np") as hf:
        for key, name in [("model.norm.weight", "output_norm.weight"),
                          ("model.layers.0.input_layernorm.weight", "blk.0.attn_norm.weight"),
                          ("model.layers.0.self_attn.q_norm.weight", "blk.0.attn_q_norm.weight"),
                          ("model.layers.0.self_attn.k_norm.weight", "blk.0.attn_k_norm.weight"),
                          ("model.layers.3.post_attention_layernorm.weight", "blk.3.post_attention_norm.weight"),
                          ("model.layers.3.pre_feedforward_layernorm.weight", "blk.3.ffn_norm.weight"),
                          ("model.layers.3.post_feedforward_layernorm.weight", "blk.3.post_ffw_norm.weight")]:
            assert np.array_equal(tensors[name], hf.get_tensor(key) + 1), name
        for key, name in [("model.layers.0.self_attn.q_proj.weight", "blk.0.attn_q.weight"),
                          ("model.layers.0.self_attn.k_proj.weight", "blk.0.attn_k.weight"),
                          ("model.embed_tokens.weight", "token_embd.weight")]:
            assert np.array_equal(tensors[name], hf.get_tensor(key)), name


def test_a_gemma3_llama_cpp_would_compute_otherwise_is_refused_in_one_line(tiny_models, tmp_path, capsys):
    import shutil

    folder = tmp_path / "scaled"
    shutil.copytree(tiny_models["gemma3"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "query_pre_attn_scalar": 256}))
    assert main(["export", "gguf", str(folder), "--out", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err
    assert f"{folder / 'config.json'}: query_pre_attn_scalar 256, but llama.cpp's gemma3 scales queries by 1/sqrt(64)" in err and err.count("\n") == 1
    assert not (tmp_path / "x.gguf").exists()


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
def test_llama_cpp_computes_the_logits_of_transformers(llama_cpp, tiny_models, tmp_path, arch):
    # the forward pass alone (the same ids in both), over more tokens than the tiny Gemma 3's
    # 32-token window, so its sliding-window and global layers both count
    folder = tiny_models[arch]
    ids = AutoTokenizer.from_pretrained(folder)(" ".join([TEXT] * 3), add_special_tokens=False).input_ids
    assert len(ids) > 40
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(torch.tensor([ids])).logits[0].numpy()
    # f32 weights and an f32 KV cache, so that what is left is the kernels' own rounding
    llm = llama_cpp.Llama(str(export(folder, tmp_path, "f32")), n_ctx=256, logits_all=True, verbose=False,
                          n_threads=2, type_k=0, type_v=0)
    llm.eval(ids)
    got = np.asarray(llm.scores[:len(ids)])
    assert np.abs(got - want).max() / np.abs(want).max() <= LLAMA_CPP_TOLERANCE.get(arch, 1e-4)


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


# The real Gemma 3: its 262k SentencePiece-style vocabulary (byte fallback, no space prefix, <bos>
# added) and its 18 layers (five sliding-window ones, window 512, per global one). Slow: the export
# alone takes ~30 s on 2 cores (most of it the vocabulary), the two tests ~110 s together.

@pytest.fixture(scope="module")
def gemma3_f16(gemma3, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gemma3-gguf") / "gemma3-270m-f16.gguf"
    export_gguf(gemma3, out, "f16")
    return out


@pytest.mark.slow
def test_gemma3_270m_in_llama_cpp_continues_vietnamese_and_tokenises_as_transformers(llama_cpp, gemma3, gemma3_f16):
    tok = AutoTokenizer.from_pretrained(gemma3)
    prompt = "Thủ đô của Việt Nam là"
    ids = tok(prompt).input_ids
    assert ids[0] == tok.bos_token_id == 2
    model = AutoModelForCausalLM.from_pretrained(gemma3, dtype=torch.float32)
    want = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids):].tolist()
    got_ids, got, llm = llama_cpp_greedy(llama_cpp, gemma3_f16, "<bos>" + prompt, 16)
    assert got_ids == ids
    assert got == want
    assert tok.decode(got) == " một trong những thành phố lớn nhất thế giới, với hơn 1.2"  # a 270M base model
    texts = ["Xin chào, hôm nay trời đẹp quá.", "Nguyễn Du viết Truyện Kiều\nvào thế kỷ 19.",
             "  hai dấu cách ở đầu, và\tmột tab", "Việt Nam 🇻🇳 năm 2024: 3,5% tăng trưởng",
             "Phở bò tái chín, bún chả Hà Nội, cơm tấm Sài Gòn!"]
    texts += [json.loads(line)["text"][:300] for line in open(ROOT / "data" / "corpus_vi_eval.jsonl", encoding="utf-8")][:6]
    for text in texts:
        assert llm.tokenize(text.encode("utf-8"), add_bos=True, special=False) == tok(text).input_ids, text


@pytest.mark.slow
def test_gemma3_270m_logits_in_llama_cpp_agree_past_its_512_token_window(llama_cpp, gemma3, gemma3_f16):
    # measured: 2.1e-3 relative (f16 weights), the same before and after position 512, and the same
    # most likely next token at every position
    text = (ROOT / "data" / "corpus_vi_eval.jsonl").read_text(encoding="utf-8")
    ids = AutoTokenizer.from_pretrained(gemma3)(text).input_ids[:560]
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(gemma3, dtype=torch.float32)(torch.tensor([ids])).logits[0].numpy()
    llm = llama_cpp.Llama(str(gemma3_f16), n_ctx=len(ids), n_batch=len(ids), logits_all=True, verbose=False,
                          n_threads=2, type_k=0, type_v=0)
    llm.eval(ids)
    got = np.asarray(llm.scores[:len(ids)])
    error = np.abs(got - want).max(axis=1) / np.abs(want).max()
    assert error[:512].max() <= 5e-3 and error[512:].max() <= 5e-3
    assert (got.argmax(axis=1) == want.argmax(axis=1)).all()
