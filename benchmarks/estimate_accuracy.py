"""`vitune estimate --device CPU` against real training on this machine: predicted tokens/s range,
measured tokens/s, their ratio, and whether the measurement falls within +-30% of the prediction.

Configurations: tiny Llama (LoRA, full), tiny Gemma 3 (LoRA), SmolLM2-135M-Instruct (LoRA, full),
Gemma-3-270M (LoRA, full). The tiny models are written by `vitune init-model --arch ...`; a real
model whose package is not installed is skipped, saying so. Each run is `vitune train` in its own
process: LoRA r 16 / alpha 32 / dropout 0 / all-linear, or full fine-tuning with AdamW; fp32;
data/alpaca_vi.jsonl packed into bins of --max-length tokens, micro-batch 1, no gradient
checkpointing, a metrics line at every step. Measured = real tokens of steps 2..N over their time,
from the run's metrics.jsonl (the first step pays one-time costs). The estimate runs in this
process after the training runs, with its CPU probe, as `vitune estimate --device CPU` would.

    .venv/bin/python benchmarks/estimate_accuracy.py                 # ~8 minutes on 2 cores
    .venv/bin/python benchmarks/estimate_accuracy.py --only smollm2  # one model's rows
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import environment, environment_line, rate_from_metrics  # noqa: E402

# (row name, model key, method)
RUNS = [
    ("tiny llama", "tiny-llama", "lora"),
    ("tiny llama", "tiny-llama", "full"),
    ("tiny gemma3", "tiny-gemma3", "lora"),
    ("SmolLM2-135M", "smollm2", "lora"),
    ("SmolLM2-135M", "smollm2", "full"),
    ("Gemma-3-270M", "gemma3-270m", "lora"),
    ("Gemma-3-270M", "gemma3-270m", "full"),
]
TEMPLATES = {"gemma3-270m": "gemma"}  # a base model without a chat template of its own


def model_folder(key: str, work: Path) -> Path | None:
    """The model's folder: a tiny one written now, a real one converted once into vitune's cache."""
    from vitune.errors import UserError
    from vitune.models.gguf import cached_conversion
    from vitune.models.presets import preset_file

    if key.startswith("tiny-"):
        out = work / key
        if not out.exists():
            subprocess.run([sys.executable, "-m", "vitune", "init-model", "--arch", key[5:], "--out", str(out)],
                           check=True, capture_output=True, cwd=ROOT)
        return out
    try:
        gguf = preset_file({"smollm2": "smollm2-135m-instruct", "gemma3-270m": "gemma3-270m"}[key])
    except UserError as exc:
        print(f"skipped {key}: {exc}")
        return None
    return cached_conversion(gguf)[0]


def run_config(model: Path, key: str, method: str, steps: int, max_length: int, output_dir: Path) -> dict:
    return {
        "model": {"name_or_path": str(model), "template": TEMPLATES.get(key, "auto"), "dtype": "float32"},
        "method": {"type": method, **({"lora": {"r": 16, "alpha": 32, "dropout": 0.0}} if method == "lora" else {})},
        "data": {"train": [{"path": str(ROOT / "data" / "alpaca_vi.jsonl")}], "max_length": max_length},
        "train": {"max_steps": steps, "micro_batch_size": 1, "gradient_checkpointing": False,
                  "optimizer": "adamw_torch", "learning_rate": 1e-4, "logging_steps": 1, "save_steps": 10_000,
                  "output_dir": str(output_dir), "overwrite": True, "report_to": ["none"]},
    }


def measure(config: dict, work: Path, name: str) -> dict:
    """Train in a separate process (CPU only) -> tokens/s of steps 2..N, from its metrics.jsonl."""
    import yaml

    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "vitune", "train", str(path)], capture_output=True,
                          text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{name}: vitune train failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    rate = rate_from_metrics(Path(config["train"]["output_dir"]) / "metrics.jsonl")
    rate["wall_s"] = time.perf_counter() - started
    return rate


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run (the first is not timed)")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--only", default="", help="comma-separated model keys: tiny-llama,tiny-gemma3,smollm2,gemma3-270m")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    args = parser.parse_args()

    from vitune.config import validate_config
    from vitune.models.architecture import load_model_config
    from vitune.models.estimate import cpu_probe, estimate

    only = set(filter(None, args.only.split(",")))
    rows, loads = [], [load_average()]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folders: dict[str, Path | None] = {}
        for label, key, method in RUNS:
            if only and key not in only:
                continue
            if key not in folders:
                folders[key] = model_folder(key, work)
            if folders[key] is None:
                continue
            steps = args.steps * (4 if key.startswith("tiny-") else 1)  # a tiny model's step takes ~0.1 s
            config = run_config(folders[key], key, method, steps, args.max_length, work / f"run-{key}-{method}")
            cpu_probe.cache_clear()  # probe the machine as it is right before this run, as `vitune estimate` would
            e = estimate(validate_config(config), load_model_config(str(folders[key])), "CPU")
            measured = measure(config, work, f"{key}-{method}")
            loads.append(load_average())
            low, high = e.tokens_per_s_range
            ratio = measured["tokens_per_s"] / e.predicted_tokens_per_s
            rows.append({"model": label, "method": method, "probe_gflops": e.probe_flops / 1e9, "notes": e.notes,
                         "flops_per_token": e.flops_per_token, "predicted_low": low, "predicted": e.predicted_tokens_per_s,
                         "predicted_high": high, "measured": measured["tokens_per_s"], "ratio": ratio,
                         "within_30": abs(ratio - 1) <= 0.30, "measured_tokens": measured["tokens"],
                         "measured_seconds": measured["seconds"], "wall_s": measured["wall_s"]})
            print(f"{label} {method}: probe {e.probe_flops / 1e9:.1f} GFLOP/s, predicted {low:,.1f}-{high:,.1f} "
                  f"(middle {e.predicted_tokens_per_s:,.1f}), "
                  f"measured {measured['tokens_per_s']:,.1f} tokens/s, load {loads[-1]}", flush=True)

    print()
    print(environment_line(environment()))
    print(f"nproc {os.cpu_count()}; load average (1, 5, 15 min) before, and after each run: " + " | ".join(loads))
    print(f"{args.steps} steps ({4 * args.steps} on the tiny models) of up to {args.max_length} tokens per run "
          "(step 1 not timed)\n")
    print("| model | method | probe GFLOP/s | predicted tokens/s (range) | measured | measured / predicted | within ±30% |")
    print("|---|---|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['model']} | {r['method']} | {r['probe_gflops']:.1f} "
              f"| {r['predicted']:,.1f} ({r['predicted_low']:,.1f}–{r['predicted_high']:,.1f}) "
              f"| {r['measured']:,.1f} | {r['ratio']:.2f} | {'yes' if r['within_30'] else '**no**'} |")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "loads": loads}, indent=1))


if __name__ == "__main__":
    main()
