"""`vitune serve`: the batching engine answers exactly as `generate` does alone (greedy, each adapter
of a mixed batch, stop strings, stop ids, lengths, seeds, nucleus sampling), and the HTTP server
speaks OpenAI's API to the real `openai` client (chat, streaming, completions with echo and
logprobs, the error codes) while bad input is one line; and, in-process, what a client may get wrong:
lone surrogates, bodies that are not JSON, bodies over --max-request-bytes (413), the key compared as bytes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import httpx
import pytest
import torch

from vitune.cli import main
from vitune.infer.batching import BASE, Engine, Request, Sampling, sample

from conftest import train_run

KEY = "sekret"


# ---------------------------------------------------------------- helpers


class Collected:
    """A request's deltas, gathered from the worker thread; `wait()` until its finish reason."""

    def __init__(self, ids, sampling: Sampling, adapter: str = BASE, stop_ids=()):
        self.deltas = []
        self.done = threading.Event()
        self.request = Request(list(ids), sampling, self.emit, adapter=adapter, stop_ids=list(stop_ids))

    def emit(self, delta) -> None:
        self.deltas.append(delta)
        if delta.finish_reason:
            self.done.set()

    def wait(self) -> "Collected":
        assert self.done.wait(60), "the engine did not finish the request"
        return self

    @property
    def text(self) -> str:
        return "".join(d.text for d in self.deltas)

    @property
    def token_ids(self) -> list[int]:
        return [t for d in self.deltas for t in d.token_ids]

    @property
    def finish_reason(self):
        return self.deltas[-1].finish_reason


def run_all(engine: Engine, items: list[Collected], stagger: float = 0.0) -> list[Collected]:
    for item in items:
        engine.submit(item.request)
        time.sleep(stagger)  # later ones join a batch that is already generating
    return [item.wait() for item in items]


def greedy(model, ids: list[int], n: int, stop_ids=None) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, eos_token_id=stop_ids, pad_token_id=0)
    return out[0, len(ids):].tolist()


PROMPTS = ["Xin chào", "Hà Nội là thủ đô của nước nào vậy bạn?", "a", "Một, hai, ba, bốn, năm, sáu, bảy"]


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_llama).eval(), AutoTokenizer.from_pretrained(tiny_llama)


@pytest.fixture(scope="module")
def engine(tiny):
    model, tokenizer = tiny
    engine = Engine(model, tokenizer, max_batch=3)
    engine.start()
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def runs(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("serve")
    return {"vi": train_run(base, tiny_llama, "vi"), "other": train_run(base, tiny_llama, "other", r=4)}


# ---------------------------------------------------------------- the engine


def test_batched_greedy_equals_generate_alone(engine, tiny):
    model, tokenizer = tiny
    items = [Collected(tokenizer(p)["input_ids"], Sampling(max_new_tokens=10, temperature=0)) for p in PROMPTS]
    # 4 requests, 3 rows at most: the 4th waits for a slot, and each joins while others generate
    for item in run_all(engine, items, stagger=0.01):
        assert item.token_ids == greedy(model, item.request.prompt_ids, 10)
        assert item.finish_reason == "length"
        assert item.text == tokenizer.decode(item.token_ids, skip_special_tokens=True)
    assert engine.rows == [] and engine.cache is None  # finished rows leave the batch


def test_a_stop_id_ends_the_answer_with_finish_reason_stop(engine, tiny):
    model, tokenizer = tiny
    ids = tokenizer(PROMPTS[1])["input_ids"]
    free = greedy(model, ids, 10)
    stop = free[3]
    item = run_all(engine, [Collected(ids, Sampling(max_new_tokens=10, temperature=0), stop_ids=[stop])])[0]
    assert item.token_ids == free[: free.index(stop) + 1]
    assert item.finish_reason == "stop"


def test_a_stop_string_cuts_the_text_before_it(engine, tiny):
    model, tokenizer = tiny
    ids = tokenizer(PROMPTS[0])["input_ids"]
    full = tokenizer.decode(greedy(model, ids, 12), skip_special_tokens=True)
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip(), full
    item = run_all(engine, [Collected(ids, Sampling(max_new_tokens=12, temperature=0, stop=[stop]))])[0]
    assert item.text == full[: full.index(stop)]
    assert item.finish_reason == "stop"


def test_the_same_seed_samples_the_same_answer_in_any_batch(engine, tiny):
    _, tokenizer = tiny
    ids = tokenizer(PROMPTS[3])["input_ids"]
    seeded = lambda seed: Collected(ids, Sampling(max_new_tokens=12, temperature=1.0, seed=seed))  # noqa: E731
    first, again, other = run_all(engine, [seeded(7), seeded(7), seeded(8)])
    assert first.token_ids == again.token_ids
    assert first.token_ids != other.token_ids


def test_top_p_keeps_the_smallest_set_that_reaches_it():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    draws = lambda top_p: {sample(logits, Sampling(top_p=top_p), torch.Generator().manual_seed(s))  # noqa: E731
                           for s in range(200)}
    assert draws(0.5) == {0}
    assert draws(0.8) == {0, 1}
    assert draws(0.95) == {0, 1, 2}
    assert draws(1.0) == {0, 1, 2, 3}
    assert sample(logits, Sampling(temperature=0)) == 0


def test_echo_logprobs_equal_a_direct_forward(engine, tiny):
    model, tokenizer = tiny
    ids = tokenizer(PROMPTS[1])["input_ids"]
    item = run_all(engine, [Collected(ids, Sampling(max_new_tokens=2, temperature=0, logprobs=2, echo=True))])[0]
    prompt = item.deltas[0].prompt_logprobs
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    assert prompt[0]["logprob"] is None and len(prompt) == len(ids)
    for i in range(1, len(ids)):
        assert prompt[i]["logprob"] == pytest.approx(float(expected[i - 1, ids[i]]), abs=1e-5)
        assert len(prompt[i]["top"]) == 2
    first = item.deltas[0].logprobs[0]
    assert first["logprob"] == pytest.approx(float(expected[-1].max()), abs=1e-5)


def test_each_adapter_of_a_mixed_batch_answers_as_it_does_alone(runs, tiny_llama):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from vitune.infer.served import load_served_models

    loaded = load_served_models(str(runs["vi"]), [("other", str(runs["other"]))], name="vi")
    assert [(m.name, m.adapter) for m in loaded.models] == [("vi", "default"), ("other", "other")]
    engine = Engine(loaded.model, loaded.tokenizer, max_batch=6, uses_adapters=True)
    engine.start()
    try:
        ids = [loaded.tokenizer(p)["input_ids"] for p in PROMPTS[:2]]
        items = [Collected(i, Sampling(max_new_tokens=8, temperature=0), adapter=a)
                 for a in ("default", "other", BASE) for i in ids]
        run_all(engine, items)
    finally:
        engine.stop()
    alone = {BASE: AutoModelForCausalLM.from_pretrained(tiny_llama).eval()}
    for name in ("vi", "other"):
        alone[name] = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), runs[name]).eval()
    expected = [greedy(alone[k], i, 8) for k in ("vi", "other", BASE) for i in ids]
    assert [item.token_ids for item in items] == expected
    assert expected[0] != expected[2]  # the two adapters really differ


# ---------------------------------------------------------------- the HTTP server and the openai client


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(runs):
    port = free_port()
    command = [sys.executable, "-m", "vitune", "serve", str(runs["vi"]), "--name", "vi", "--port", str(port),
               "--adapter", f"other={runs['other']}", "--api-key", KEY, "--max-batch", "4"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "VITUNE_API_KEY": ""})
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            pytest.fail(f"vitune serve exited {process.returncode}: {process.stdout.read()}")
        time.sleep(0.1)
    yield url
    process.terminate()
    process.wait(30)


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def expected_chat(runs, tiny_llama):
    """What the vi run answers greedily to one question, computed with peft + generate and the run's
    own saved chat template (not vitune's serving code)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vitune.data.templates import resolve_template, stop_token_ids

    tokenizer = AutoTokenizer.from_pretrained(runs["vi"])
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Phở là gì?"}], add_generation_prompt=True,
                                        tokenize=True, return_dict=True)["input_ids"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), runs["vi"]).eval()
    stops = stop_token_ids(tokenizer, resolve_template("auto", tokenizer))
    answer = greedy(model, ids, 12, stop_ids=stops)
    return tokenizer.decode(answer, skip_special_tokens=True), len(ids), len(answer)


def ask(client, **extra):
    return client.chat.completions.create(model="vi", messages=[{"role": "user", "content": "Phở là gì?"}],
                                          **{"temperature": 0, "max_tokens": 12, **extra})


def test_models_lists_the_run_and_its_adapters(client):
    assert [m.id for m in client.models.list().data] == ["vi", "other"]


def test_chat_answers_as_generate_does(client, expected_chat):
    text, prompt_tokens, answer_tokens = expected_chat
    reply = ask(client)
    assert reply.choices[0].message.content == text
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == ("length" if answer_tokens == 12 else "stop")
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_tokens, answer_tokens)


def test_streamed_chat_adds_up_to_the_same_answer_with_usage_last(client, expected_chat):
    text, prompt_tokens, answer_tokens = expected_chat
    chunks = list(ask(client, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] in (["length"], ["stop"])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == answer_tokens


def test_ignore_eos_generates_max_tokens(client):
    reply = ask(client, max_tokens=40, extra_body={"ignore_eos": True})
    assert reply.usage.completion_tokens == 40 and reply.choices[0].finish_reason == "length"


def test_concurrent_requests_get_their_own_answers(client, expected_chat):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda _: ask(client).choices[0].message.content, range(8)))
    assert replies == [expected_chat[0]] * 8


def test_completions_echo_returns_the_prompt_with_its_logprobs(client, tiny_llama):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    ids = tokenizer("Hà Nội là")["input_ids"]
    reply = client.completions.create(model="other", prompt="Hà Nội là", max_tokens=3, temperature=0, echo=True,
                                      logprobs=1)
    choice = reply.choices[0]
    assert choice.text.startswith(tokenizer.decode(ids))
    assert len(choice.logprobs.tokens) == len(ids) + 3
    assert choice.logprobs.token_logprobs[0] is None and all(v <= 0 for v in choice.logprobs.token_logprobs[1:])
    assert choice.logprobs.text_offset[0] == 0
    assert reply.usage.prompt_tokens == len(ids) and reply.usage.completion_tokens == 3


def test_a_client_that_goes_away_frees_its_slot(server):
    def health_becomes(wanted: dict, seconds: float):  # True, or the last /health seen
        deadline, seen = time.monotonic() + seconds, None
        while time.monotonic() < deadline:
            seen = httpx.get(f"{server}/health").json()
            if seen == wanted:
                return True
            time.sleep(0.02)
        return seen

    # 1,500 tokens take ~12 s on 2 cores; the slot must be free long before that
    body = {"model": "vi", "prompt": "Hà Nội", "max_tokens": 1500, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=30) as reply:
        lines = reply.iter_lines()  # kept: a dropped iterator closes the response
        next(lines)
        assert health_becomes({"status": "ok", "running": 1, "waiting": 0}, 2) is True
        closed = time.monotonic()
    assert health_becomes({"status": "ok", "running": 0, "waiting": 0}, 3) is True
    assert time.monotonic() - closed < 3


def test_a_wrong_key_is_401(server):
    from openai import AuthenticationError, OpenAI

    with pytest.raises(AuthenticationError, match="wrong API key"):
        OpenAI(base_url=f"{server}/v1", api_key="nope", max_retries=0).models.list()


def test_an_unknown_model_is_404_naming_the_served_ones(client):
    from openai import NotFoundError

    with pytest.raises(NotFoundError, match="model 'gpt-4' is not served here; available: vi, other"):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])


def test_a_prompt_longer_than_the_context_is_400(client):
    from openai import BadRequestError

    with pytest.raises(BadRequestError, match=r"plus max_tokens \(100\) is longer than the model's context \(2048 tokens\)"):
        client.completions.create(model="vi", prompt=[5] * 2000, max_tokens=100)


def test_a_malformed_request_is_400_naming_the_field(client):
    from openai import BadRequestError

    with pytest.raises(BadRequestError, match="temperature: Input should be less than or equal to 2"):
        client.chat.completions.create(model="vi", messages=[{"role": "user", "content": "hi"}], temperature=5)
    with pytest.raises(BadRequestError, match="the last message must be from the user"):
        client.chat.completions.create(model="vi", messages=[{"role": "assistant", "content": "hi"}])


# ---------------------------------------------------------------- the app without a server: 429 and 500


def test_a_full_queue_is_429_and_a_failing_model_is_500(tiny, engine):
    from fastapi.testclient import TestClient

    from vitune.infer.serve import build_app
    from vitune.infer.served import ServedModel
    from vitune.data.templates import resolve_template

    model, tokenizer = tiny
    template = resolve_template("auto", tokenizer)
    served = [ServedModel("tiny", BASE, template, [])]
    idle = Engine(model, tokenizer, max_queue=1)  # never started: what is queued stays queued
    idle.submit(Request([1, 2], Sampling(), lambda d: None))
    body = {"model": "tiny", "prompt": "a", "max_tokens": 2}
    reply = TestClient(build_app(idle, served)).post("/v1/completions", json=body)
    assert reply.status_code == 429 and reply.json()["error"]["code"] == "queue_full"

    class Broken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, **_):
            raise RuntimeError("out of memory on the test device")

    broken = Engine(Broken(), tokenizer)
    broken.start()
    try:
        reply = TestClient(build_app(broken, served)).post("/v1/completions", json=body)
    finally:
        broken.stop()
    assert reply.status_code == 500
    assert reply.json()["error"]["message"] == "generation failed: RuntimeError: out of memory on the test device"


# ---------------------------------------------------------------- the command's own mistakes


def test_a_port_in_use_is_one_line_before_the_model_loads(tiny_llama, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", str(tiny_llama), "--port", str(port)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"cannot listen on 127.0.0.1:{port}" in err and "choose another --port" in err


@pytest.mark.parametrize("args, message", [
    (["--adapter", "novalue"], "--adapter 'novalue': write it as NAME=RUN_DIR"),
    (["--adapter", "x=/nowhere/run"], "--adapter x=/nowhere/run: folder not found"),
    (["--max-batch", "0"], "--max-batch 0 / --max-queue 256: use at least 1"),
    (["--max-request-bytes", "0"], "--max-request-bytes 0: use at least 1 (the default is 1048576, 1 MiB)"),
])
def test_bad_options_are_one_line(tiny_llama, capsys, args, message):
    assert main(["serve", str(tiny_llama), "--port", str(free_port()), *args]) == 2
    assert message in " ".join(capsys.readouterr().err.split())


def test_an_adapter_trained_on_another_base_is_refused(runs, tiny_models, capsys):
    assert main(["serve", str(tiny_models["qwen2"]), "--port", str(free_port()), "--adapter", f"vi={runs['vi']}"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"--adapter vi={runs['vi']} was trained on" in err and "serve that base instead" in err


def test_prompts_prefilled_together_answer_as_each_alone(tiny):
    model, tokenizer = tiny
    engine = Engine(model, tokenizer, max_batch=3, prefill_together=True)  # what vitune eval uses
    items = [Collected(tokenizer(p)["input_ids"], Sampling(max_new_tokens=10, temperature=0)) for p in PROMPTS]
    for item in items:  # all queued before the worker starts: 3 prefilled in one forward, then the 4th
        engine.submit(item.request)
    engine.start()
    try:
        for item in items:
            item.wait()
    finally:
        engine.stop()
    assert [item.token_ids for item in items] == [greedy(model, item.request.prompt_ids, 10) for item in items]


# ---------------------------------------------------------------- the app in-process: what a client gets wrong


@pytest.fixture(scope="module")
def served_tiny(tiny, engine):
    """The running tiny engine and the one name it serves, for build_app."""
    from vitune.data.templates import resolve_template
    from vitune.infer.served import ServedModel

    return engine, [ServedModel("tiny", BASE, resolve_template("auto", tiny[1]), [])]


def in_process(served_tiny, **options):
    from fastapi.testclient import TestClient

    from vitune.infer.serve import build_app

    return TestClient(build_app(*served_tiny, **options))


def error(message: str, param=None, code=None) -> dict:
    return {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}


LONE = "a lone UTF-16 surrogate ({}) is not a character; send valid Unicode: pair it with its other half, or remove it"


@pytest.mark.parametrize("path, raw, field, char", [
    ("/v1/chat/completions", rb'{"model":"tiny","messages":[{"role":"user","content":"Xin \ud800ch\u00e0o"}]}',
     "messages[0].content", r"\ud800"),
    ("/v1/chat/completions", rb'{"model":"tiny","messages":[{"role":"system","content":"ok"},'
                             rb'{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"\udfff"}]}]}',
     "messages[1].content[1].text", r"\udfff"),
    ("/v1/completions", rb'{"model":"tiny","prompt":"\ud83d"}', "prompt", r"\ud83d"),
    ("/v1/completions", rb'{"model":"tiny","prompt":["a","b\udc00"]}', "prompt[1]", r"\udc00"),
    ("/v1/completions", rb'{"model":"tiny","prompt":"a","stop":["\n","\ud800"]}', "stop[1]", r"\ud800"),
    ("/v1/completions", rb'{"model":"\udbff","prompt":"a"}', "model", r"\udbff"),
    # not escaped but raw: the 3 bytes Python's surrogatepass writes, which json.loads reads back the same
    ("/v1/completions", b'{"model":"tiny","prompt":"\xed\xa0\x80"}', "prompt", r"\ud800"),
])
def test_a_lone_surrogate_is_400_naming_the_field(served_tiny, path, raw, field, char):
    reply = in_process(served_tiny).post(path, content=raw, headers={"content-type": "application/json"})
    assert reply.status_code == 400
    assert reply.json() == error(f"{field}: {LONE.format(char)}", param=field)


def test_a_surrogate_pair_is_text(served_tiny):
    raw = rb'{"model":"tiny","prompt":"\ud83d\ude00","max_tokens":1,"temperature":0}'  # an escaped emoji
    reply = in_process(served_tiny).post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 1


@pytest.mark.parametrize("raw, message", [
    (b'{"model": "tiny", "prompt": }', "the request body is not valid JSON: Expecting value (character 28)"),
    (b'{"model": "tiny", "prompt": "\xff"}', "the request body cannot be decoded as utf-8 (byte 29): "
                                             "send JSON encoded as UTF-8"),
    (b"[" * 5000 + b"]" * 5000, "the request body is JSON nested too deep to read: send a flatter request"),
    (b"", "the request body: Field required; send a JSON object with Content-Type: application/json"),
    (b"[1]", "the request body: Input should be a valid dictionary or object to extract fields from; "
             "send a JSON object with Content-Type: application/json"),
])
def test_a_body_that_is_not_a_json_object_is_400_saying_so(served_tiny, raw, message):
    reply = in_process(served_tiny).post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert (reply.status_code, reply.json()) == (400, error(message))


def test_a_seed_past_int64_is_400_not_500(served_tiny):
    body = {"model": "tiny", "prompt": "a", "max_tokens": 1, "seed": 2**64}  # torch's generator refused it: 500
    reply = in_process(served_tiny).post("/v1/completions", json=body)
    assert (reply.status_code, reply.json()) == (
        400, error("seed: Input should be less than or equal to 9223372036854775807", param="seed"))


def test_a_content_part_with_text_that_is_not_a_string_is_400_not_500(served_tiny):
    body = {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}
    reply = in_process(served_tiny).post("/v1/chat/completions", json=body)
    assert reply.status_code == 400 and reply.json()["error"]["param"].startswith("messages.0.content")


# -------------------------------- the body size limit (--max-request-bytes)


def asgi_post(app, chunks: list[bytes], content_length: Optional[int] = None, headers=()) -> tuple[int, dict, int]:
    """POST /v1/completions straight to the ASGI app, its body as `chunks` (one receive() message each, so
    without Content-Length it is a chunked body) and `headers` as raw bytes: the status, the JSON answer, and
    how many chunks were read."""
    import asyncio
    import json

    read, sent = 0, []

    async def main_():
        nonlocal read
        done = asyncio.Event()

        async def receive():
            nonlocal read
            if read == len(chunks):  # after the body: the client waits for the answer, then goes
                await done.wait()
                return {"type": "http.disconnect"}
            read += 1
            return {"type": "http.request", "body": chunks[read - 1], "more_body": read < len(chunks)}

        async def send(message):
            sent.append(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                done.set()

        headers_ = [(b"content-type", b"application/json"), *headers]
        if content_length is not None:
            headers_.append((b"content-length", str(content_length).encode()))
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
                 "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"", "root_path": "",
                 "headers": headers_, "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000)}
        await app(scope, receive, send)

    asyncio.run(main_())
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(body), read


TOO_LARGE = error("the request body is larger than 2500 bytes, this server's limit (vitune serve --max-request-bytes): "
                  "send a shorter request, or raise the limit", code="request_too_large")


def test_a_body_over_the_limit_is_413_by_its_content_length_before_a_byte_is_read(served_tiny):
    from vitune.infer.serve import build_app

    app = build_app(*served_tiny, max_request_bytes=2500)
    assert asgi_post(app, [b"x" * 2501], content_length=2501) == (413, TOO_LARGE, 0)


def test_a_chunked_body_is_413_at_the_chunk_that_passes_the_limit(served_tiny):
    from vitune.infer.serve import build_app

    app = build_app(*served_tiny, max_request_bytes=2500)
    # 10 chunks of 1,000 bytes, no Content-Length: the 3rd passes 2,500, and the other 7 are never read
    assert asgi_post(app, [b"x" * 1000] * 10) == (413, TOO_LARGE, 3)


def test_a_body_of_exactly_the_limit_is_answered(served_tiny):
    from vitune.infer.serve import build_app

    good = b'{"model": "tiny", "prompt": "a", "max_tokens": 1, "temperature": 0}'
    app = build_app(*served_tiny, max_request_bytes=2500)
    padded = good + b" " * (2500 - len(good))
    status, reply, read = asgi_post(app, [padded[:1000], padded[1000:]])
    assert (status, read, reply["usage"]["completion_tokens"]) == (200, 2, 1)
    status, reply, read = asgi_post(app, [padded], content_length=2500)
    assert (status, read, reply["usage"]["completion_tokens"]) == (200, 1, 1)


def test_a_body_over_the_limit_is_413_through_a_client_too(served_tiny):
    client = in_process(served_tiny, max_request_bytes=2500)
    body = {"model": "tiny", "prompt": "a" * 3000}
    reply = client.post("/v1/completions", json=body)
    assert (reply.status_code, reply.json(), reply.headers["connection"]) == (413, TOO_LARGE, "close")
    chunked = client.post("/v1/completions", content=iter([b"x" * 2000, b"x" * 2000]))
    assert (chunked.status_code, chunked.json()) == (413, TOO_LARGE)


def test_max_request_bytes_defaults_to_1_mib_and_says_why():
    import typer

    from vitune.cli.app import app
    from vitune.infer.serve import MAX_REQUEST_BYTES

    serve = typer.main.get_command(app).commands["serve"]
    option = next(p for p in serve.params if p.name == "max_request_bytes")
    assert option.opts == ["--max-request-bytes"] and option.default == MAX_REQUEST_BYTES == 1048576
    assert option.help == ("Largest request body in bytes; a larger one gets 413 before it is read (a prompt that "
                           "fits the context is far smaller: this keeps one client from filling the memory)")


# -------------------------------- the API key, compared in constant time on bytes


@pytest.mark.parametrize("key, sent, status", [
    ("sekret", b"Bearer sekret", 200),
    ("sekret", b"Bearer nope", 401),
    ("sekret", None, 401),
    ("sekret", "Bearer khóa".encode("utf-8"), 401),  # a non-ASCII key against an ASCII one: 401, not 500
    ("khóa", "Bearer khóa".encode("utf-8"), 200),  # a non-ASCII key works, sent as UTF-8
    ("khóa", "Bearer khoá".encode("utf-8"), 401),  # the same letters, the accent on another vowel
])
def test_the_api_key_is_compared_as_bytes(served_tiny, key, sent, status):
    client = in_process(served_tiny, api_key=key)
    reply = client.get("/v1/models", headers={} if sent is None else {"authorization": sent})
    assert reply.status_code == status
    if status == 401:
        assert reply.json() == error("missing or wrong API key (send Authorization: Bearer KEY)", code="invalid_api_key")
    assert client.get("/health").status_code == 200  # no key needed outside /v1/


def test_a_request_without_the_key_is_refused_before_its_body_is_read(served_tiny):
    from vitune.infer.serve import build_app

    app = build_app(*served_tiny, api_key="sekret", max_request_bytes=2500)
    status, reply, read = asgi_post(app, [b"x" * 1000] * 10)
    assert (status, reply["error"]["code"], read) == (401, "invalid_api_key", 0)


def test_the_key_in_other_bytes_than_utf8_is_401(served_tiny):
    from vitune.infer.serve import build_app

    app = build_app(*served_tiny, api_key="khóa")
    good = b'{"model": "tiny", "prompt": "a", "max_tokens": 1, "temperature": 0}'
    # raw ASGI: starlette's TestClient would re-encode the header as UTF-8
    assert asgi_post(app, [good], headers=[(b"authorization", "Bearer khóa".encode("utf-8"))])[0] == 200
    assert asgi_post(app, [good], headers=[(b"authorization", "Bearer khóa".encode("latin-1"))])[0] == 401
