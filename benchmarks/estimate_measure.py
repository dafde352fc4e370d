"""Measure what `vitune estimate` predicts: peak memory and tokens/s of real training steps.

Weights cannot be downloaded, so each model is built at random from its real shapes
(`from_config`, straight onto the GPU). The step is the one vitune's Trainer runs: a PEFT
LoRA adapter as vitune builds it (r=16, alpha=32, dropout 0.05, all-linear), non-reentrant
activation checkpointing, bf16 autocast, loss.backward, grad clipping, optimizer.step,
zero_grad(set_to_none=True). It needs only torch, transformers and peft (bitsandbytes for the
QLoRA cases, which are skipped without it), so it runs on a bare GPU image; with vitune
importable it prints the estimate beside each measurement.

    python benchmarks/estimate_measure.py                 # every case, on a GPU
    python benchmarks/estimate_measure.py --tiny          # tiny shapes on the CPU: does it run?
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import time

import torch

LLAMA3_8B = dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)
MISTRAL_7B = dict(LLAMA3_8B, model_type="mistral", vocab_size=32000)
LLAMA32_1B = dict(LLAMA3_8B, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, tie_word_embeddings=True)
TINY = dict(LLAMA3_8B, hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1000)

# (name, shapes, method, max_length, micro_batch_size, gradient checkpointing, optimizer)
CASES = [
    ("llama3-8b", LLAMA3_8B, "lora", 1024, 1, True, "adamw_torch"),
    ("llama3-8b", LLAMA3_8B, "lora", 2048, 1, True, "adamw_torch"),
    ("llama3-8b", LLAMA3_8B, "lora", 4096, 1, True, "adamw_torch"),
    ("llama3-8b", LLAMA3_8B, "lora", 8192, 1, True, "adamw_torch"),
    ("llama3-8b", LLAMA3_8B, "lora", 2048, 2, True, "adamw_torch"),
    ("llama3-8b", LLAMA3_8B, "lora", 2048, 1, False, "adamw_torch"),
    ("mistral-7b", MISTRAL_7B, "lora", 2048, 1, True, "adamw_torch"),
    ("mistral-7b", MISTRAL_7B, "lora", 4096, 1, True, "adamw_torch"),
    ("llama3.2-1b", LLAMA32_1B, "full", 2048, 1, False, "adamw_torch"),
    ("llama3.2-1b", LLAMA32_1B, "full", 2048, 1, True, "adamw_torch"),
    ("llama3-8b", LLAMA3_8B, "qlora", 2048, 1, True, "paged_adamw_8bit"),
    ("llama3-8b", LLAMA3_8B, "qlora", 4096, 1, True, "paged_adamw_8bit"),
]


def quantise_linears(model, device: str):
    """Every decoder nn.Linear -> bitsandbytes NF4 with double quantisation; lm_head is kept,
    as `from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True))` does."""
    import bitsandbytes as bnb

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and name != "lm_head":
                new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                        compute_dtype=torch.bfloat16, compress_statistics=True,
                                        quant_type="nf4", device="meta")
                new.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                               compress_statistics=True).to(device)
                if child.bias is not None:
                    new.bias = child.bias
                setattr(module, name, new)
    model.is_loaded_in_4bit = True
    return model


def build(shapes: dict, method: str, checkpointing: bool, device: str):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoConfig, AutoModelForCausalLM

    shapes = dict(shapes)
    config = AutoConfig.for_model(shapes.pop("model_type"), **shapes)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    if method == "qlora":
        model = prepare_model_for_kbit_training(quantise_linears(model, device), use_gradient_checkpointing=False)
    if method != "full":
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    if checkpointing:  # what Trainer does with activation_checkpointing=True
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def make_optimizer(name: str, params):
    if name == "paged_adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=1e-5)
    return torch.optim.AdamW(params, lr=1e-5)


def measure(case, device: str, steps: int = 8, warmup: int = 3) -> dict:
    name, shapes, method, seq, batch, checkpointing, optim = case
    model = build(shapes, method, checkpointing, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(optim, params)
    ids = torch.randint(0, shapes["vocab_size"], (batch, seq), device=device)
    mask = torch.ones_like(ids)
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
            loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    result = {"case": name, "method": method, "max_length": seq, "micro_batch_size": batch,
              "gradient_checkpointing": checkpointing, "optimizer": optim,
              "tokens_per_s": batch * seq * (steps - warmup) / sum(times[warmup:])}
    if cuda:
        free, total = torch.cuda.mem_get_info()
        result.update(peak_allocated_gib=torch.cuda.max_memory_allocated() / 2**30,
                      peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30,
                      device_used_gib=(total - free) / 2**30)
    del model, opt, params, loss
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def predicted(case, device: str) -> dict:
    from vitune.config import validate_config
    from vitune.models.estimate import estimate

    _, shapes, method, seq, batch, checkpointing, optim = case
    cfg = validate_config({
        "model": {"name_or_path": "random", "attn_implementation": "sdpa"},
        "method": {"type": method},
        "data": {"train": [{"path": "x"}], "max_length": seq},
        "train": {"micro_batch_size": batch, "gradient_checkpointing": checkpointing, "optimizer": optim},
    })
    e = estimate(cfg, shapes, device)
    return {"est_peak_allocated_gib": e.peak_allocated, "est_total_gib": e.total, "est_tokens_per_s": e.predicted_tokens_per_s}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", help="also write the results to this JSON file")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU, to check the script runs")
    parser.add_argument("--device-name", default="H200", help="the estimator's --device for the comparison")
    args = parser.parse_args()
    device = "cpu" if args.tiny else "cuda"
    cases = [(n, TINY, m, 64, b, c, o) for n, _, m, _, b, c, o in CASES] if args.tiny else CASES
    have_bnb = importlib.util.find_spec("bitsandbytes") is not None
    have_vitune = importlib.util.find_spec("vitune") is not None
    results = []
    for case in cases:
        if case[2] == "qlora" and not have_bnb:
            continue
        try:
            result = measure(case, device)
            if have_vitune:
                result.update(predicted(case, args.device_name))
        except Exception as exc:  # keep the other cases' numbers
            result = {"case": case[0], "method": case[2], "max_length": case[3], "error": repr(exc)[:300]}
        results.append(result)
        print(json.dumps(result), flush=True)
    if args.out:
        import transformers
        import peft

        meta = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
                "transformers": transformers.__version__, "peft": peft.__version__}
        with open(args.out, "w") as fh:
            json.dump({**meta, "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
