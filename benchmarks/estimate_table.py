"""The README table of `vitune estimate`: Llama-3-8B and Mistral-7B, LoRA (bf16) and QLoRA
(NF4), 2k and 4k context, micro batch 1, gradient checkpointing, on an H100.

    PYTHONPATH=src python benchmarks/estimate_table.py [--device H100]

Shapes are those of the models' config.json files, written here so no download is needed.
"""

from __future__ import annotations

import argparse

from vitune.config import validate_config
from vitune.models.estimate import estimate

MODELS = {
    "Llama-3-8B": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "Mistral-7B-v0.1": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                            num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False),
}
METHODS = {"LoRA r=16 (bf16)": ("lora", "adamw_torch"), "QLoRA r=16 (nf4)": ("qlora", "paged_adamw_8bit")}


def table(device: str) -> str:
    rows = [
        f"| model | method | context | peak GiB (GPU) | peak_memory_gib (torch) | tokens/s ({device}) |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for model, shapes in MODELS.items():
        for label, (method, optimizer) in METHODS.items():
            for context in (2048, 4096):
                cfg = validate_config({
                    "model": {"name_or_path": model},
                    "method": {"type": method},
                    "data": {"train": [{"path": "train.jsonl"}], "max_length": context},
                    "train": {"micro_batch_size": 1, "gradient_checkpointing": True, "optimizer": optimizer},
                })
                e = estimate(cfg, shapes, device)
                rows.append(
                    f"| {model} | {label}, {optimizer} | {context // 1024}k | {e.total:.1f} | "
                    f"{e.peak_allocated:.1f} | {e.predicted_tokens_per_s:,.0f} |"
                )
    return "\n".join(rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="H100")
    print(table(parser.parse_args().device))
