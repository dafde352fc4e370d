"""`vitune serve`: the batching engine answers exactly as `generate` does alone (greedy, each adapter
of a mixed batch, stop strings, stop ids, lengths, seeds, nucleus sampling), and the HTTP server
speaks OpenAI's API to the real `openai` client (chat, streaming, completions with echo and
logprobs, the error codes) while bad input is one line."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

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
