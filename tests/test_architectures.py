"""Every architecture `vitune init-model` builds goes the whole way: train (LoRA, packed rows longer
than any sliding window) -> chat -> serve -> eval -> merge -> export to GGUF and run in llama.cpp.
Llama, Mistral without and with a sliding window, Qwen2, Gemma 3 (sliding-window layers and a
global one) and BLOOM. At each step the answer is the one `generate` gives alone."""

from __future__ import annotations

import concurrent.futures
import json
import shutil
from pathlib import Path

import pytest
import torch
from gguf import GGUFReader
from transformers import AutoModelForCausalLM, AutoTokenizer

from test_gguf_export import llama_cpp, llama_cpp_greedy  # noqa: F401 (fixture)
from vitune.cli import main
from vitune.data.records import Message
from vitune.infer.batching import Engine
from vitune.infer.chat import load_chat_model
from vitune.infer.serve import build_app
from vitune.infer.served import load_served_models

from conftest import ROOT, write_config

ARCHS = ("llama", "mistral", "mistral-window", "qwen2", "gemma3", "bloom")
QUESTION = "Thủ đô của Việt Nam là gì? Hãy kể về lịch sử của thành phố."
NEW_TOKENS = 12
WINDOW = 24


@pytest.fixture(scope="module")
def models(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """The tiny models, and Mistral with a 24-token window (as Mistral-7B-v0.1 has 4,096), which the
    chat prompt and the training rows cross."""
    folder = tmp_path_factory.mktemp("archs") / "mistral-window"
    shutil.copytree(tiny_models["mistral"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "sliding_window": WINDOW}))
    return {**tiny_models, "mistral-window": folder}


def train(model: Path, out: Path) -> Path:
    config = write_config(
        out.parent / f"{out.name}.yaml", model={"name_or_path": str(model)},
        method={"type": "lora", "lora": {"dropout": 0.0}},
        data={"train": [{"path": str(ROOT / "data" / "sharegpt_vi.jsonl"), "max_samples": 6}], "max_length": 256},
        train={"max_steps": 2, "micro_batch_size": 1, "learning_rate": 1e-2, "warmup_ratio": 0.0,
               "output_dir": str(out), "report_to": ["none"]})
    assert main(["train", str(config)]) == 0
    return out


def generate_alone(model, tokenizer, ids: list[int], stops: list[int], n: int = NEW_TOKENS) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=stops,
                             pad_token_id=tokenizer.pad_token_id)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("arch", ARCHS)
def test_train_chat_serve_eval_merge_export(models, tmp_path, llama_cpp, arch):  # noqa: F811 (fixture)
    from fastapi.testclient import TestClient

    run = train(models[arch], tmp_path / "run")

    # chat: the run's own template and stop tokens; the reference is generate() on the same model
    bot = load_chat_model(str(run))
    tokenizer = AutoTokenizer.from_pretrained(run)
    messages = [{"role": "user", "content": QUESTION}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    want = generate_alone(bot.model, tokenizer, ids, bot.stop_ids)
    want_text = tokenizer.decode(want, skip_special_tokens=True).strip()
    assert bot.answer([Message("user", QUESTION)], max_new_tokens=NEW_TOKENS, temperature=0.0) == want_text

    # serve: the generation engine batches the request with two others and answers the same
    loaded = load_served_models(str(run), [])
    engine = Engine(loaded.model, loaded.tokenizer, max_batch=3)
    engine.start()
    try:
        with TestClient(build_app(engine, loaded.models, context=loaded.context)) as client:
            body = {"model": loaded.models[0].name, "messages": messages, "temperature": 0, "max_tokens": NEW_TOKENS}
            others = [{**body, "messages": [{"role": "user", "content": "Xin chào! " * k}]} for k in (3, 9)]
            with concurrent.futures.ThreadPoolExecutor(3) as pool:
                answers = list(pool.map(lambda b: client.post("/v1/chat/completions", json=b), [body, *others]))
        assert [a.status_code for a in answers] == [200, 200, 200]
        assert answers[0].json()["choices"][0]["message"]["content"].strip() == want_text
        assert answers[0].json()["usage"]["completion_tokens"] == len(want)
    finally:
        engine.stop()

    # eval: loss and generated answers on three held-out questions, beside the base
    out = tmp_path / "eval.json"
    assert main(["eval", str(run), "--data", str(ROOT / "data" / "qa_vi_eval.jsonl"), "--limit", "3", "--generate",
                 "--max-new-tokens", "8", "--out", str(out)]) == 0
    (entry,) = json.loads(out.read_text())["files"]
    assert entry["model"]["scored"] == entry["base"]["scored"] == 3
    assert {"loss", "chrf", "rouge_l", "repetition"} <= set(entry["model"])

    # merge: one model folder with the adapter's effect, the same logits
    merged = tmp_path / "merged"
    assert main(["merge", str(run), "--out", str(merged)]) == 0
    with torch.no_grad():
        merged_model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
        batch = torch.tensor([ids])
        assert torch.allclose(merged_model(batch).logits, bot.model(batch).logits, atol=1e-4)

    # export: llama.cpp tokenises the prompt and answers greedily as transformers does
    gguf = tmp_path / "run.gguf"
    assert main(["export", "gguf", str(merged), "--out", str(gguf), "--quant", "f32", "--name", f"tiny {arch}"]) == 0
    if arch != "mistral-window":
        got_ids, got, _ = llama_cpp_greedy(llama_cpp, gguf, text, NEW_TOKENS)
        assert (got_ids, got) == (ids, want)
        return
    # llama.cpp's llama graph has no sliding window: the file states the window as its context, and
    # within it llama.cpp answers as the model does
    assert GGUFReader(str(gguf)).fields["llama.context_length"].contents() == WINDOW
    short = tokenizer("Hà Nội", add_special_tokens=False).input_ids
    want_short = generate_alone(merged_model, tokenizer, short, bot.stop_ids, WINDOW - len(short))
    got_ids, got, _ = llama_cpp_greedy(llama_cpp, gguf, "Hà Nội", WINDOW - len(short))
    assert (got_ids, got) == (short, want_short) and len(short) + len(got) == WINDOW
