"""The loss over the vocabulary in chunks (vitune.models.chunked_loss) vs plain transformers, on the
real Gemma-3-270M on the CPU: peak memory and tokens/s of a training step, and the two losses.

Gemma 3's vocabulary has 262,144 tokens: the fp32 logits of a 1,024-token batch are 1 GiB, and
plain transformers keeps them (and their softmax, and their gradient) through the backward.

Workload: Gemma-3-270M (the gemma3-270m preset, converted from its GGUF file once and cached), fp32,
SDPA, LoRA r 16 / alpha 32 / dropout 0 / all-linear (the LM head, tied to the embeddings, frozen),
AdamW lr 1e-4 on the adapter; one padding-free row of `--tokens` tokens (default 1,024) of real
Vietnamese text (data/corpus_vi.jsonl, documents end to end, each ending with <eos>), every token
trained; forward, backward and optimizer step, `--steps` times (the first is not timed). A third
process computes the first step's loss with the head and the cross-entropy in float64, the yardstick
of both fp32 losses.

  plain    model(input_ids=..., labels=...).loss: transformers' forward and loss, full logits
  chunked  vitune.models.chunked_loss.causal_lm_loss(model, batch).loss: what vitune's trainer runs

Each stack runs in its own subprocess (this script with --child), one after the other. Memory is
that process's resident set from /proc/self/status: `loaded` = VmRSS with the model and adapter
loaded (every weight touched), `peak` = VmHWM over the training steps (reset after loading by writing 5 to
/proc/self/clear_refs, so the loading spike does not count), `extra` = peak - loaded.

    python benchmarks/chunked_loss.py                       # ~3 minutes on 2 cores
    python benchmarks/chunked_loss.py --steps 4 --tokens 2048 --json chunked.json
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import GIB, environment, environment_line  # noqa: E402

PRESET = "gemma3-270m"
TEXT = ROOT / "data" / "corpus_vi.jsonl"
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}
LR = 1e-4
STACKS = ("plain", "chunked")


def default_model() -> Path:
    """Gemma-3-270M's converted folder, in the test cache where the tests keep it."""
    from vitune.models.gguf import cached_conversion
    from vitune.models.presets import preset_file

    cache = Path(os.environ.get("VITUNE_TEST_CACHE") or Path.home() / ".cache" / "vitune-test")
    folder, _, _ = cached_conversion(preset_file(PRESET), cache_dir=cache / "models")
    return folder


def memory() -> dict[str, float]:
    """VmRSS and VmHWM of this process, GiB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {key: int(fields[key].split()[0]) * 1024 / GIB for key in ("VmRSS", "VmHWM")}


def reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        return True
    except OSError:
        return False


# ---------------------------------------------------------------- child: one stack


def text_row(tokenizer, tokens: int) -> list[int]:
    """`tokens` ids of the corpus, documents end to end (each with <bos> ... <eos>)."""
    ids: list[int] = []
    for line in TEXT.read_text(encoding="utf-8").splitlines():
        ids += tokenizer(json.loads(line)["text"])["input_ids"] + [tokenizer.eos_token_id]
        if len(ids) >= tokens:
            return ids[:tokens]
    raise SystemExit(f"{TEXT} holds fewer than {tokens} tokens")


def child(stack: str, model_dir: Path, tokens: int, steps: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vitune.models.chunked_loss import causal_lm_loss, loss_path

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = torch.tensor([text_row(tokenizer, tokens)])
    batch = {"input_ids": ids, "labels": ids.clone(), "use_cache": False}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(**LORA)).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    with torch.no_grad():  # every weight resident (safetensors maps them in lazily): `loaded` counts them all
        sum(float(p.sum()) for p in model.parameters())
    loaded = memory()["VmRSS"]
    peak_reset = reset_peak()
    losses, marks = [], []
    for _ in range(steps):
        loss = model(**batch).loss if stack == "plain" else causal_lm_loss(model, batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        marks.append(time.perf_counter())
    seconds = marks[-1] - marks[0]
    peak = memory()["VmHWM"]
    return {"stack": stack, "path": "plain" if stack == "plain" else loss_path(model), "tokens": tokens,
            "steps": steps, "tokens_per_s": tokens * (steps - 1) / seconds, "s_per_step": seconds / (steps - 1),
            "losses": losses, "loaded_gib": loaded, "peak_gib": peak, "extra_gib": peak - loaded,
            "peak_reset": peak_reset, "vocab": model.config.vocab_size, "threads": torch.get_num_threads()}


def reference_loss(model_dir: Path, tokens: int) -> float:
    """The first step's loss with the LM head and the cross-entropy in float64 (the body in fp32, as
    both stacks run it): what each stack's fp32 loss is compared against."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = torch.tensor([text_row(tokenizer, tokens)])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    head = model.get_output_embeddings()
    taken = []
    hook = head.register_forward_pre_hook(lambda module, args: taken.append(args[0]))
    with torch.no_grad():
        model(input_ids=ids)
        hook.remove()
        logits = taken[0][0, :-1].double() @ head.weight.double().T
        if getattr(model.config, "final_logit_softcapping", None):
            cap = model.config.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return F.cross_entropy(logits, ids[0, 1:]).item()


# ---------------------------------------------------------------- parent


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="training steps per stack (the first is not timed)")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens in the batch (one padding-free row)")
    parser.add_argument("--model", type=Path, help="a Gemma-3 (or any causal LM) folder; default: Gemma-3-270M")
    parser.add_argument("--stacks", default=",".join(STACKS), help="plain,chunked or one of them")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds before a stack is killed")
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument("--child", choices=(*STACKS, "fp64"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        from vitune.cli import quiet_libraries

        quiet_libraries()
        if args.child == "fp64":
            result = {"loss": reference_loss(args.model, args.tokens)}
        else:
            result = child(args.child, args.model, args.tokens, args.steps)
        args.out.write_text(json.dumps(result))
        return
    if args.steps < 2:
        parser.error("--steps must be 2 or more: the first step is not timed")
    model_dir = args.model or default_model()
    info = environment()
    work = Path(tempfile.mkdtemp(prefix="vitune-chunked-"))
    print(environment_line(info))
    print(f"model: {model_dir.name}, fp32, SDPA, LoRA r 16 all-linear; one row of {args.tokens:,} tokens of "
          f"{TEXT.name}; {args.steps} steps per stack (forward, backward, AdamW), each in its own process\n",
          flush=True)
    results = {}
    for stack in [*args.stacks.split(","), "fp64"]:
        out, log = work / f"{stack}.json", work / f"{stack}.log"
        command = [sys.executable, str(Path(__file__).resolve()), "--child", stack, "--model", str(model_dir),
                   "--tokens", str(args.tokens), "--steps", str(args.steps), "--out", str(out)]
        with open(log, "w") as fh:
            rc = subprocess.run(command, stdout=fh, stderr=subprocess.STDOUT, timeout=args.timeout, cwd=ROOT,
                                env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}).returncode
        if rc != 0 or not out.exists():
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
            print(f"{stack:8s} FAILED (exit {rc}); log {log}:\n{tail}\n", flush=True)
            continue
        r = results[stack] = json.loads(out.read_text())
        if stack == "fp64":
            print(f"fp64     first step's loss with the head and cross-entropy in float64: {r['loss']:.7f}")
            continue
        print(f"{stack:8s} {r['tokens_per_s']:7.1f} tokens/s  {r['s_per_step']:6.2f} s/step  "
              f"loaded {r['loaded_gib']:.2f} GiB, peak {r['peak_gib']:.2f} GiB, extra {r['extra_gib']:.2f} GiB  (loss path {r['path']}; losses "
              f"{', '.join(f'{x:.6f}' for x in r['losses'])})", flush=True)
    plain, chunked = results.get("plain"), results.get("chunked")
    if plain and chunked:
        print(f"\n{'stack':8s} | {'tokens/s':>8s} | {'peak RSS GiB':>12s} | {'extra GiB':>9s}")
        for name, r in (("plain", plain), ("chunked", chunked)):
            print(f"{name:8s} | {r['tokens_per_s']:8.1f} | {r['peak_gib']:12.2f} | {r['extra_gib']:9.2f}")
        print(f"ratio    | {chunked['tokens_per_s'] / plain['tokens_per_s']:7.2f}x | "
              f"{chunked['peak_gib'] / plain['peak_gib']:11.2f}x | {chunked['extra_gib'] / plain['extra_gib']:8.2f}x")
        print("ratio = chunked / plain (tokens/s: higher is faster; memory: lower is better); loss difference at "
              f"the first step {abs(plain['losses'][0] - chunked['losses'][0]):.2e}, over all steps "
              f"{max(abs(a - b) for a, b in zip(plain['losses'], chunked['losses'])):.2e}")
    if "fp64" in results:
        for name in (s for s in STACKS if s in results):
            print(f"{name}: first step's loss - the float64 one = "
                  f"{results[name]['losses'][0] - results['fp64']['loss']:+.2e}")
    print(environment_line(info))
    if args.json:
        args.json.write_text(json.dumps({"info": info, "results": results}, indent=2))


if __name__ == "__main__":
    main()
