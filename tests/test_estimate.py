"""`vitune estimate`: exact parameter counts from config.json shapes, memory parts that match
what PyTorch, PEFT and bitsandbytes really allocate, and the command's JSON and errors."""

from __future__ import annotations

import json
import re

import pytest
import torch

from vitune.cli import main
from vitune.config import validate_config
from vitune.errors import UserError
from vitune.models import estimate as estimate_module
from vitune.models.architecture import read_architecture
from vitune.models.estimate import (
    CPU_SECONDS_PER_LAYER, CPU_SECONDS_PER_STEP, GIB, CpuRates, cpu_probe, cpu_step_elements, estimate, flops_per_token, nf4_bytes,
    optimizer_bytes, probe_shapes,
)

from conftest import write_config

LLAMA3_8B = dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)
LLAMA2_7B = dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False)
MISTRAL_7B = dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False)
# google/gemma-3-270m's config.json (sliding_window 512 on five layers of six, tied embeddings)
GEMMA3_270M = dict(model_type="gemma3_text", hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                   num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=262144)
QWEN25_7B = dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                 num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False)


def run(method: str = "lora", max_length: int = 2048, **train):
    return validate_config({
        "model": {"name_or_path": "m"},
        "method": {"type": method},
        "data": {"train": [{"path": "x.jsonl"}], "max_length": max_length},
        "train": {"micro_batch_size": 1, "gradient_checkpointing": True, "optimizer": "adamw_torch", **train},
    })


@pytest.mark.parametrize(
    "shapes, params",
    [(LLAMA3_8B, 8_030_261_248), (LLAMA2_7B, 6_738_415_616), (MISTRAL_7B, 7_241_732_096), (QWEN25_7B, 7_615_616_512),
     (GEMMA3_270M, 268_098_176)],
    ids=["llama-3-8b", "llama-2-7b", "mistral-7b-v0.1", "qwen2.5-7b", "gemma-3-270m"],
)
def test_parameter_counts_of_real_models(shapes, params):
    assert read_architecture(shapes).total_params == params
    assert estimate(run("full"), shapes).total_params == params


def test_lora_r16_all_linear_on_llama3_8b():
    e = estimate(run("lora"), LLAMA3_8B)
    assert e.trainable_params == 41_943_040
    # PEFT keeps adapters in fp32 on a bf16 base: 4 bytes each, gradients too, AdamW 2 x 4 bytes
    assert e.lora_params * GIB == e.gradients * GIB == 4 * 41_943_040
    assert e.optimizer_states * GIB == 8 * 41_943_040
    assert e.base_weights * GIB == 2 * 8_030_261_248


def test_lora_target_list_and_unknown_name():
    cfg = validate_config({"model": {"name_or_path": "m"}, "method": {"type": "lora", "lora": {"r": 8, "target_modules": ["q_proj", "v_proj"]}},
                           "data": {"train": [{"path": "x"}]}})
    assert estimate(cfg, LLAMA3_8B).trainable_params == 32 * 8 * ((4096 + 4096) + (4096 + 1024))
    cfg = validate_config({"model": {"name_or_path": "m"}, "method": {"lora": {"target_modules": ["qkv"]}},
                           "data": {"train": [{"path": "x"}]}})
    with pytest.raises(UserError, match=r"^method.lora.target_modules: qkv is not a linear layer of llama; its linear layers are q_proj, k_proj"):
        estimate(cfg, LLAMA3_8B)


def tiny_configs():
    from transformers import BloomConfig, Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config

    shape = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=300)
    return {
        "llama": LlamaConfig(tie_word_embeddings=False, **shape),
        "llama-tied": LlamaConfig(tie_word_embeddings=True, **shape),
        "mistral": MistralConfig(tie_word_embeddings=False, **shape),
        "qwen2": Qwen2Config(tie_word_embeddings=False, **shape),
        "gemma3": Gemma3TextConfig(head_dim=16, **shape),
        "bloom": BloomConfig(hidden_size=64, n_layer=2, n_head=4, vocab_size=300),
    }


@pytest.mark.parametrize("name", ["llama", "llama-tied", "mistral", "qwen2", "gemma3", "bloom"])
def test_counts_equal_a_real_model_and_its_peft_adapter(name):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = tiny_configs()[name]
    model = AutoModelForCausalLM.from_config(config)
    e_full = estimate(run("full"), config)
    assert e_full.total_params == sum(p.numel() for p in model.parameters())

    peft_model = get_peft_model(model, LoraConfig(r=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    adapters = [p for p in peft_model.parameters() if p.requires_grad]
    assert estimate(run("lora"), config).trainable_params == sum(p.numel() for p in adapters)


def test_peft_keeps_adapters_in_fp32_on_a_bf16_base():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_configs()["llama"], dtype=torch.bfloat16)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    assert {p.dtype for p in peft_model.parameters() if p.requires_grad} == {torch.float32}


@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_bytes_equal_bitsandbytes_storage(double_quant):
    bnb = pytest.importorskip("bitsandbytes")

    weight = torch.randn(256, 1024, dtype=torch.bfloat16)
    packed, state = bnb.functional.quantize_4bit(weight, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    tensors = [packed, state.absmax, state.code]
    if state.nested:
        tensors += [state.state2.absmax, state.state2.code, state.offset]
    assert nf4_bytes(weight.numel(), double_quant) == sum(t.numel() * t.element_size() for t in tensors)


def test_8bit_adam_state_bytes_equal_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes")

    # Trainer registers 32-bit overrides for embeddings by id(param) in bitsandbytes' global
    # manager; after an earlier in-process training run a new tensor can reuse such an id
    bnb.optim.GlobalOptimManager.get_instance().initialize()
    shapes = [(16, 4096), (100,)]  # an 8-bit state, and one under min_8bit_size that stays fp32
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    opt = bnb.optim.AdamW8bit(params, lr=1e-3)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    stored = {}
    for state in opt.state.values():
        for key, t in state.items():
            if torch.is_tensor(t) and key not in ("qmap1", "qmap2") and t.dim() > 0:  # the qmaps are shared
                stored[t.data_ptr()] = t.numel() * t.element_size()
    assert optimizer_bytes("adamw_bnb_8bit", shapes, 4) == sum(stored.values())


def test_qlora_quantises_decoder_linears_and_upcasts_the_rest():
    e = estimate(run("qlora", optimizer="paged_adamw_8bit"), LLAMA3_8B)
    arch = read_architecture(LLAMA3_8B)
    per_layer = sum(nf4_bytes(lin.in_features * lin.out_features, True) for lin in arch.linears)
    not_quantised = 2 * 128256 * 4096 + (2 * 32 + 1) * 4096  # embeddings, lm_head, norms
    assert e.base_weights * GIB == pytest.approx(32 * per_layer + 4 * not_quantised, abs=1)
    assert any("paged optimizer states" in n for n in e.notes)


def test_checkpointing_and_context_length_move_memory_the_right_way():
    short, long = estimate(run("lora", 2048), LLAMA3_8B), estimate(run("lora", 4096), LLAMA3_8B)
    # the chunked loss (models/chunked_loss.py): two chunks of 256 MiB of fp32 logits, and the fp32
    # gradient of every token's hidden state
    assert short.logits_loss == (2 * 2**28 + 4 * 4096 * 2048) / GIB == 0.53125
    assert long.logits_loss == (2 * 2**28 + 4 * 4096 * 4096) / GIB == 0.5625
    # never more than the plain loss's 12 bytes per logit (a small vocabulary and micro-batch)
    tiny = {**LLAMA3_8B, "vocab_size": 1000}
    assert estimate(run("lora", 2048), tiny).logits_loss == 12 * 1000 * 2048 / GIB
    no_ckpt = estimate(run("lora", 2048, gradient_checkpointing=False), LLAMA3_8B)
    assert no_ckpt.activations > 10 * short.activations
    assert short.predicted_tokens_per_s > 0 and short.flops_per_token > 4 * 7.5e9


def test_unknown_device_and_architecture_are_user_errors():
    with pytest.raises(UserError, match=r"^--device 'V100' is not known; choose one of H100, H200"):
        estimate(run(), LLAMA3_8B, "V100")
    with pytest.raises(UserError, match=r"^the model's config.json has model_type 'nope', which neither vitune estimate"):
        estimate(run(), {"model_type": "nope"})
    with pytest.raises(UserError, match=r"^vitune estimate cannot build a causal LM of model_type 't5'") as error:
        estimate(run(), {"model_type": "t5"})
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------- any architecture, from a meta model


def meta_configs():
    """Families no hand reader knows: their shapes come from the model built on the meta device."""
    from transformers import FalconConfig, GPTNeoXConfig, GraniteConfig, Phi3Config, Qwen3Config

    shape = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4, vocab_size=300)
    return {
        "phi3": Phi3Config(num_key_value_heads=2, pad_token_id=0, **shape),  # fused qkv_proj and gate_up_proj
        "gpt_neox": GPTNeoXConfig(**shape),  # query_key_value with biases, embed_in / embed_out
        "qwen3": Qwen3Config(num_key_value_heads=2, head_dim=16, **shape),  # a norm over each head's q and k
        "granite": GraniteConfig(num_key_value_heads=2, **shape),
        "falcon": FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=300),
    }


@pytest.mark.parametrize("name", ["phi3", "gpt_neox", "qwen3", "granite", "falcon"])
def test_meta_model_counts_equal_a_real_model_and_its_peft_adapter(name):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = meta_configs()[name]
    model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    assert estimate(run("full"), config).total_params == params
    assert estimate(run("full"), config.to_dict()).total_params == params  # a config.json read as a dict
    adapters = get_peft_model(model, LoraConfig(r=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    assert estimate(run("lora"), config).trainable_params == sum(p.numel() for p in adapters.parameters() if p.requires_grad)


def test_meta_model_reads_the_linears_of_a_decoder_layer_and_which_share_an_input():
    phi3 = read_architecture(meta_configs()["phi3"])
    assert [(lin.name, lin.in_features, lin.out_features) for lin in phi3.linears] == [
        ("o_proj", 64, 64), ("qkv_proj", 64, 128), ("gate_up_proj", 64, 344), ("down_proj", 172, 64)]
    assert (phi3.total_params, phi3.tied, phi3.gated_mlp) == (129_344, False, True)
    # Falcon's parallel attention: the MLP reads the same normed input as attention
    falcon = read_architecture(meta_configs()["falcon"])
    sources = {lin.name: lin.source for lin in falcon.linears}
    assert sources["query_key_value"] == sources["dense_h_to_4h"] != sources["dense_4h_to_h"]
    assert (falcon.total_params, falcon.tied, falcon.embed_name) == (105_600, True, "word_embeddings")


def test_meta_model_and_hand_reader_agree_on_gemma3_270m():
    from vitune.models.architecture import _meta_architecture

    meta = _meta_architecture(json.dumps({**GEMMA3_270M}, sort_keys=True))
    assert meta.total_params == read_architecture(GEMMA3_270M).total_params == 268_098_176


# ---------------------------------------------------------------- speed


SMALL = dict(model_type="llama", hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=300, tie_word_embeddings=False)


def test_flops_of_one_token_through_forward_and_backward():
    arch = read_architecture(SMALL)
    # N = 2 layers x (q 64x64, k and v 64x32, o 64x64, gate, up and down 64x172) + lm_head 300x64 = 109,824
    # A = 2 x 2 layers x 4 heads x 16 head_dim x 128 tokens = 32,768 when the masked half is skipped
    full = 3 * (2 * 109_824 + 2 * 32_768)
    assert flops_per_token(arch, 128, True, 0, skip_masked=False, checkpointing=False, head_recomputed=False) == full == 855_552
    # the chunked loss recomputes a trained head's logits in the backward: one more 300 x 64 matmul
    assert flops_per_token(arch, 128, True, 0, False, False, head_recomputed=True) == full + 2 * 19_200
    # LoRA r=16 on every linear: 36,992 adapter weights; the frozen base has no weight gradients
    assert flops_per_token(arch, 128, False, 36_992, True, False, False) == 4 * 109_824 + 3 * 32_768 + 6 * 36_992
    # checkpointing repeats the decoder's forward (not the head's)
    assert flops_per_token(arch, 128, False, 36_992, False, True, False) == (
        4 * 109_824 + 3 * 65_536 + 6 * 36_992 + 2 * 90_624 + 65_536)


def cpu_run(method: str):
    return validate_config({
        "model": {"name_or_path": "m", "dtype": "float32"}, "method": {"type": method},
        "data": {"train": [{"path": "x.jsonl"}], "max_length": 128},
        "train": {"micro_batch_size": 2, "gradient_checkpointing": False, "optimizer": "adamw_torch"},
    })


@pytest.mark.parametrize("method, trained, flops", [("lora", 36_992, 857_856), ("full", 129_344, 893_952)])
def test_cpu_speed_from_a_given_probe_and_its_range(method, trained, flops, monkeypatch):
    monkeypatch.setattr(estimate_module, "cpu_probe", lambda *a, **k: pytest.fail("the probe ran"))
    rates = CpuRates(matmul_flops=50e9, element_seconds=1e-9)
    e = estimate(cpu_run(method), SMALL, "CPU", cpu_rates=rates)
    arch = read_architecture(SMALL)
    targets = [] if method == "full" else list(arch.linears)
    elements = cpu_step_elements(arch, 256, 128, targets, trained, softcapped=False, checkpointing=False)
    # per token and layer 30 x 64 + 10 x 172 + 6 x 1,156 (LoRA) + 6 x 4 heads x 128; the loss 10 x 300 per token;
    # the optimizer 20 per trained weight
    per_layer = 30 * 64 + 10 * 172 + (6 * 1_156 if method == "lora" else 0) + 6 * 4 * 128
    assert elements == 256 * (2 * per_layer + 10 * 300) + 20 * trained
    seconds = 256 * flops / 50e9 + elements * 1e-9 + 2 * CPU_SECONDS_PER_LAYER + CPU_SECONDS_PER_STEP
    assert e.flops_per_token == flops
    assert e.predicted_tokens_per_s == pytest.approx(256 / seconds, rel=1e-12)
    assert e.tokens_per_s_range == pytest.approx((256 / seconds / 1.3, 256 / seconds * 1.3), rel=1e-12)
    assert (e.probe_flops, e.assumed_mfu) == (50e9, 0.0)
    assert e.to_dict()["tokens_per_s_range"] == e.tokens_per_s_range
    assert any(n.startswith("tokens/s from a probe of this machine: the run's matmuls in float32 at 50.0 GFLOP/s")
               for n in e.notes)


def test_cpu_probe_times_the_models_shapes_once_per_process():
    shapes, rows = probe_shapes(read_architecture(SMALL), 256)
    # the decoder's distinct linears with their uses per forward, and the head (300 < 4,096: all of it)
    assert shapes == ((64, 64, 4), (64, 32, 4), (64, 172, 4), (172, 64, 2), (64, 300, 1)) and rows == 256
    assert probe_shapes(read_architecture(LLAMA3_8B), 4096)[1] == 16  # a big model: fewer rows, a short probe
    rates = cpu_probe(shapes, rows)
    assert rates.matmul_flops > 1e6 and 0 < rates.element_seconds < 1e-6
    assert cpu_probe(shapes, rows) is rates


def test_gpu_range_spans_the_measured_mfu_and_the_host_floor():
    e = estimate(run("lora", 4096), LLAMA3_8B, "H100")
    low, high = e.tokens_per_s_range
    assert low == pytest.approx(e.predicted_tokens_per_s * 0.29 / 0.33, rel=0.05) and high > e.predicted_tokens_per_s
    host_bound = estimate(run("lora", 256), LLAMA3_8B, "H100")  # 256 tokens: the floor, whatever the MFU
    assert host_bound.tokens_per_s_range == (host_bound.predicted_tokens_per_s,) * 2


# ---------------------------------------------------------------- the command


def model_folder(tmp_path, shapes) -> str:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(shapes), encoding="utf-8")
    return str(folder)


def test_cli_json_on_a_folder_holding_only_config_json(tmp_path, capsys):
    path = write_config(tmp_path / "run.yaml", model={"name_or_path": model_folder(tmp_path, LLAMA3_8B)},
                        data={"train": [{"path": "x.jsonl"}], "max_length": 4096},
                        train={"micro_batch_size": 1, "gradient_checkpointing": True})
    assert main(["estimate", str(path), "--json", "--device", "h100", "--set", "method.lora.r=16"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["trainable_params"] == 41_943_040 and out["total_params"] == 8_030_261_248
    assert out["device"] == "H100 SXM"
    parts = ["base_weights", "lora_params", "gradients", "optimizer_states", "activations", "logits_loss", "cuda_overhead"]
    assert all(isinstance(out[k], float) for k in parts + ["total", "predicted_tokens_per_s"])
    assert out["total"] == out["peak_allocated"] + out["cuda_overhead"]


def test_cli_table(tmp_path, capsys):
    path = write_config(tmp_path / "run.yaml", model={"name_or_path": model_folder(tmp_path, MISTRAL_7B)},
                        data={"train": [{"path": "x.jsonl"}]})
    assert main(["estimate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "optimizer states" in out and "7,241,732,096" in out
    assert re.search(r"predicted [\d,]+–[\d,]+ tokens/s\n", out)


def test_cli_on_the_cpu_prints_the_range_and_the_probe(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(estimate_module, "cpu_probe", lambda *a, **k: CpuRates(50e9, 1e-9))
    path = write_config(tmp_path / "run.yaml", model={"name_or_path": model_folder(tmp_path, SMALL), "dtype": "float32"},
                        data={"train": [{"path": "x.jsonl"}], "max_length": 128},
                        train={"micro_batch_size": 2, "gradient_checkpointing": False, "optimizer": "adamw_torch"})
    assert main(["estimate", str(path), "--device", "CPU"]) == 0
    expected = estimate(cpu_run("lora"), SMALL, "CPU", cpu_rates=CpuRates(50e9, 1e-9)).tokens_per_s_range
    out = " ".join(capsys.readouterr().out.split())
    assert f"predicted {expected[0]:,.0f}–{expected[1]:,.0f} tokens/s (measured probe: 50.0 GFLOP/s)" in out
    assert "tokens/s from a probe of this machine" in out


def test_cli_missing_model_is_a_one_line_error(tmp_path, capsys):
    path = write_config(tmp_path / "run.yaml", model={"name_or_path": str(tmp_path / "nope")},
                        data={"train": [{"path": "x.jsonl"}]})
    assert main(["estimate", str(path), "--json"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: model not found: {tmp_path / 'nope'} ") and "\n" not in err


def test_cli_folder_without_config_json(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    path = write_config(tmp_path / "run.yaml", model={"name_or_path": str(tmp_path / "empty")},
                        data={"train": [{"path": "x.jsonl"}]})
    assert main(["estimate", str(path)]) == 2
    assert "holds no config.json" in capsys.readouterr().err
