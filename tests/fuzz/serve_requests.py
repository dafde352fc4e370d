"""Fuzzing `vitune serve`'s HTTP side: random and mutated request bodies sent in-process to the ASGI app
(infer/serve.py's `build_app`) over a tiny random Llama, through starlette's TestClient.

The property (`check_reply`): whatever a client sends, the answer is never a 5xx; an error is OpenAI's
shape `{"error": {"message", "type", "param", "code"}}` with a one-line message; a 200 is a whole
completion (or a stream ending in `data: [DONE]` with no error in it). After the fuzzing,
`check_still_serving` asks a good greedy question and wants generate's own answer, and no request left
generating or waiting.

A case (`request_case`) is plain data, so that hypothesis prints and replays it: the path, the method,
the headers and the body as bytes, sent whole or in chunks (no Content-Length). Bodies are valid chat
and completions requests with mutations (keys deleted, values of the wrong type, huge, negative, NaN and
Infinity numbers, lone surrogates, JSON nested thousands deep, unknown keys), or not JSON at all, or
bigger than the server's --max-request-bytes.

Run by tests/fuzz/test_serve_requests.py (`make fuzz`: VITUNE_FUZZ_EXAMPLES cases) and, bounded and
derandomized, by tests/test_serve_fuzz.py in the ordinary suite.
"""

from __future__ import annotations

import copy
import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from hypothesis import note
from hypothesis import strategies as st

KEY = "khóa-bí-mật"  # non-ASCII: the key check compares bytes, and must neither raise nor refuse the right key
AUTH = f"Bearer {KEY}".encode("utf-8")
LIMIT = 16 * 1024  # the app's max_request_bytes: small, so oversized cases cost little
CONTEXT = 24  # tokens: keeps every generation a case can ask for short (a chat prompt alone is 18)
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
GOOD = {
    CHAT: {"model": "tiny", "messages": [{"role": "user", "content": "Xin chào"}], "max_tokens": 2, "temperature": 0},
    COMPLETIONS: {"model": "tiny", "prompt": "Xin chào", "max_tokens": 2, "temperature": 0},
}
# fields a valid request may add, per endpoint
EXTRAS = {
    CHAT: {"stream": True, "n": 2, "stop": ["\n", "."], "seed": 7, "top_p": 0.9, "max_completion_tokens": 1,
           "stream_options": {"include_usage": True}, "ignore_eos": True,
           "messages": [{"role": "system", "content": "Bạn là trợ lý."},
                        {"role": "user", "content": [{"type": "text", "text": "Hà Nội"}, {"type": "image_url"}]}]},
    COMPLETIONS: {"stream": True, "n": 2, "stop": "\n", "seed": 7, "top_p": 0.9, "echo": True, "logprobs": 2,
                  "prompt": [[1, 2, 3], [4, 5]], "stream_options": {"include_usage": True}, "ignore_eos": True},
}

# ---------------------------------------------------------------- values a client may put anywhere

LONE_SURROGATES = st.sampled_from(["\ud800", "\udfff", "a\ud83db", "😀\udc00", "\udbff\ud7ff", "\ud800" * 3])
NUMBERS = st.sampled_from([0, 1, -1, 2, 3, 17, 2049, -(2**63) - 1, 2**63, 2**64, 10**30, -(10**30), 10**400,
                           1e308, -1e308, 5e-324, -0.0, 0.5, 1.5, float("nan"), float("inf"), float("-inf")])
TEXTS = st.one_of(st.text(max_size=20), st.sampled_from(["", " ", "tiny", "user", "assistant", "system", "text",
                                                          "<|eot_id|>", "\x00", "ư" * 2000]))
NESTED = st.sampled_from([5, 100, 900, 1000, 3000, 9000]).map(lambda depth: f"@NEST{depth}@")  # see body_bytes
scalars = st.one_of(st.none(), st.booleans(), NUMBERS, st.integers(-(10**6), 10**6), TEXTS, LONE_SURROGATES, NESTED)
values = st.recursive(scalars, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(TEXTS, kids, max_size=3),
                      max_leaves=6)


def paths(value, prefix=()):
    """Every place inside a JSON value, as tuples of keys and indices."""
    if isinstance(value, dict):
        for key, inner in value.items():
            yield prefix + (key,)
            yield from paths(inner, prefix + (key,))
    elif isinstance(value, list):
        for i, inner in enumerate(value):
            yield prefix + (i,)
            yield from paths(inner, prefix + (i,))


def parent(body, path):
    for step in path[:-1]:
        body = body[step]
    return body


@st.composite
def mutated_body(draw, endpoint: str):
    """A valid request of `endpoint` with some extra fields, then 0 to 3 mutations."""
    body = copy.deepcopy(GOOD[endpoint])
    extras = EXTRAS[endpoint]
    for key in draw(st.lists(st.sampled_from(sorted(extras)), max_size=3, unique=True)):
        body[key] = copy.deepcopy(extras[key])
    for _ in range(draw(st.integers(0, 3))):
        places = list(paths(body)) if isinstance(body, (dict, list)) else []
        op = draw(st.sampled_from(["delete", "set", "set", "add", "wrap", "surrogate"]))
        texts = [p for p in places if isinstance(parent(body, p)[p[-1]], str)]
        if op == "surrogate" and texts:  # a lone surrogate into a text the server reads
            path = draw(st.sampled_from(texts))
            text = parent(body, path)[path[-1]]
            at = draw(st.integers(0, len(text)))
            parent(body, path)[path[-1]] = text[:at] + draw(LONE_SURROGATES) + text[at:]
        elif op == "wrap" or not places:
            body = draw(st.sampled_from([[body], {"body": body}, None, "x", 3]))
        elif op == "add":
            holder = body
            for step in draw(st.sampled_from([()] + places)):
                holder = holder[step]
            if isinstance(holder, dict):
                holder[draw(st.one_of(TEXTS, LONE_SURROGATES))] = draw(values)
            elif isinstance(holder, list):
                holder.append(draw(values))
        else:
            path = draw(st.sampled_from(places))
            holder = parent(body, path)
            if op == "delete":
                del holder[path[-1]]
            else:
                holder[path[-1]] = draw(values)
    return body


def body_bytes(body, ensure_ascii: bool) -> bytes:
    """JSON as a careless client writes it: NaN and Infinity as bare words, lone surrogates escaped or
    raw (surrogatepass: bytes that are not UTF-8), "@NESTn@" replaced by a list nested n deep."""
    text = json.dumps(body, ensure_ascii=ensure_ascii, allow_nan=True)
    for depth in (5, 100, 900, 1000, 3000, 9000):
        text = text.replace(f'"@NEST{depth}@"', "[" * depth + "]" * depth)
    return text.encode("utf-8", errors="surrogatepass")


CONTENT_TYPES = ["application/json"] * 20 + [None, "text/plain", "application/x-www-form-urlencoded",
                                            "multipart/form-data; boundary=x", "application/json; charset=latin-1",
                                            "application/vnd.api+json", "application/json; charset=utf-16", "*/*"]


@st.composite
def raw_body(draw, endpoint: str) -> bytes:
    """Bytes that are not a request: random, cut short, flipped, or over the size limit."""
    good = json.dumps(GOOD[endpoint], ensure_ascii=False).encode("utf-8")
    kind = draw(st.sampled_from(["random", "cut", "flip", "huge", "padded", "utf16"]))
    if kind == "random":
        return draw(st.binary(max_size=64))
    if kind == "cut":
        return good[: draw(st.integers(0, len(good) - 1))]
    if kind == "flip":
        data = bytearray(good)
        for _ in range(draw(st.integers(1, 3))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data)
    if kind == "huge":  # just over the limit, or far over it
        return b'{"model": "tiny", "prompt": "' + b"a" * draw(st.sampled_from([LIMIT, 4 * LIMIT])) + b'"}'
    if kind == "padded":  # valid JSON at or just past the limit: whitespace counts as bytes too
        return good + b" " * (LIMIT - len(good) + draw(st.sampled_from([-1, 0, 1])))
    return json.dumps(GOOD[endpoint], ensure_ascii=False).encode("utf-16")


@dataclass
class Case:
    method: str
    path: str
    headers: dict
    body: bytes
    chunks: int  # 0: sent whole with its Content-Length; n: in n pieces without one (chunked)


AUTHS = [AUTH] * 30 + [None, b"Bearer wrong", b"Bearer", b"bearer " + AUTH[7:], "Bearer khóa-sai".encode("utf-8"),
                      AUTH + b" ", "Bearer khóa".encode("latin-1"), b"Basic dGlueQ==", b"Bearer " + b"k" * 5000]


@st.composite
def request_case(draw) -> Case:
    endpoint = draw(st.sampled_from([CHAT, COMPLETIONS]))
    if draw(st.integers(0, 3)):
        body = body_bytes(draw(mutated_body(endpoint)), ensure_ascii=draw(st.booleans()))
    else:
        body = draw(raw_body(endpoint))
    method, path = draw(st.sampled_from([("POST", endpoint)] * 12 + [
        ("GET", endpoint), ("PUT", endpoint), ("POST", "/v1/models"), ("POST", endpoint + "/"),
        ("POST", endpoint + "?stream=true"), ("POST", "/v1/nowhere"), ("POST", "/health")]))
    headers = {}
    content_type = draw(st.sampled_from(CONTENT_TYPES))
    if content_type:
        headers["content-type"] = content_type
    auth = draw(st.sampled_from(AUTHS))
    if auth is not None:
        headers["authorization"] = auth
    chunks = draw(st.sampled_from([0, 0, 0, 1, 2, 7])) if body else 0
    return Case(method, path, headers, body, chunks)


# ---------------------------------------------------------------- sending and checking


def send(client, case: Case):
    """The case through the TestClient. A chunked body goes as a generator of `case.chunks` pieces: sent with
    no Content-Length (the TestClient hands the app its bytes in one message; test_serve.py feeds the app
    chunk by chunk)."""
    note(f"{case.method} {case.path} {case.headers} chunks={case.chunks} body={case.body[:300]!r}")
    content = case.body
    if case.chunks:
        size = -(-len(case.body) // case.chunks)
        content = (case.body[i: i + size] for i in range(0, len(case.body), size))
    return client.request(case.method, case.path, content=content, headers=case.headers)


def check_error_shape(reply) -> dict:
    body = reply.json()
    assert list(body) == ["error"] and sorted(body["error"]) == ["code", "message", "param", "type"], body
    message = body["error"]["message"]
    assert isinstance(message, str) and message and "\n" not in message and "Traceback" not in message, message
    return body["error"]


def check_reply(reply) -> None:
    """Never a 5xx for what a client sends; errors in OpenAI's shape; a 200 complete."""
    note(f"-> {reply.status_code} {reply.text[:500]!r}")
    assert reply.status_code < 500, reply.text
    if reply.status_code >= 400:
        check_error_shape(reply)
    elif reply.headers["content-type"].startswith("text/event-stream"):
        events = reply.text.split("\n\n")
        assert events[-2:] == ["data: [DONE]", ""], reply.text
        for event in events[:-2]:
            assert event.startswith("data: ") and "error" not in json.loads(event[len("data: "):]), event
    else:
        assert reply.status_code == 200 and reply.json()["choices"], reply.text


# ---------------------------------------------------------------- the app under test


@dataclass
class Serving:
    client: object  # starlette TestClient over build_app
    engine: object
    expected: str  # what generate answers greedily to GOOD_QUESTION


GOOD_QUESTION = {"model": "tiny", "prompt": "Xin chào", "max_tokens": 4, "temperature": 0}


@contextmanager
def serving(model_dir: Path):
    """build_app over the tiny model at `model_dir` (key KEY, body limit LIMIT, context CONTEXT), with its
    engine running, and generate's own greedy answer to GOOD_QUESTION."""
    import torch
    from fastapi.testclient import TestClient
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vitune.data.templates import resolve_template
    from vitune.infer.batching import BASE, Engine
    from vitune.infer.serve import build_app
    from vitune.infer.served import ServedModel

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tokenizer(GOOD_QUESTION["prompt"])["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=GOOD_QUESTION["max_tokens"], do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    expected = tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
    served = [ServedModel("tiny", BASE, resolve_template("auto", tokenizer), [])]
    engine = Engine(model, tokenizer, max_batch=4)
    engine.start()
    try:
        app = build_app(engine, served, api_key=KEY, context=CONTEXT, max_request_bytes=LIMIT)
        yield Serving(TestClient(app, raise_server_exceptions=False), engine, expected)
    finally:
        engine.stop()


def check_still_serving(serving: Serving) -> None:
    """After the fuzzing: the good question gets generate's answer, and nothing is left generating."""
    import time

    reply = serving.client.post(COMPLETIONS, json=GOOD_QUESTION, headers={"authorization": AUTH})
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["text"] == serving.expected
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (serving.engine.rows or serving.engine.waiting):
        time.sleep(0.02)  # a cancelled row leaves the batch at the engine's next step
    assert (len(serving.engine.rows), len(serving.engine.waiting)) == (0, 0)
