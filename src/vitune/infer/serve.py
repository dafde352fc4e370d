"""`vitune serve`'s HTTP side: an OpenAI-compatible FastAPI app over the batching engine
(infer/batching.py). `build_app(engine, models, ...)` in, an ASGI app out."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from typing import Literal, Optional, Union

from fastapi import Request as HttpRequest  # module level: FastAPI resolves the (string) annotations here
from pydantic import BaseModel, Field

from vitune.data.records import Conversation, Message, fold_system_prompt
from vitune.infer.batching import Engine, QueueFull, Request, Sampling
from vitune.infer.served import ServedModel


# A larger request body gets 413 before it is read: a prompt that fits a model's context is far smaller
# (32k tokens of text are ~150 KB of JSON), and the limit keeps one client from filling the server's memory.
MAX_REQUEST_BYTES = 1 << 20


class ContentPart(BaseModel, extra="allow"):
    type: str
    text: str = ""  # read for type "text"; other parts (images, audio) are not read


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Union[str, list[ContentPart]]


class StreamOptions(BaseModel):
    include_usage: bool = False


class Common(BaseModel):
    model: str
    max_tokens: Optional[int] = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = Field(None, ge=-(2**63), le=2**63 - 1)  # int64, as OpenAI's; torch's generator takes no more
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens even past the end of turn (benchmarks)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None


class ChatRequest(Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)


class CompletionRequest(Common):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=20)


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_body(message: str, type_: str, param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def lone_surrogate(body: BaseModel) -> Optional[tuple[str, str]]:
    """The first string field of the request that holds a lone surrogate, as (path, the surrogate), e.g.
    ("messages[0].content", "\\ud800"), or None. JSON's "\\ud800" decodes to a str that no UTF-8 can encode, and
    tokenizers fail on it. Every string value is looked at, by a loop rather than recursion, as a client may
    nest JSON as deep as the parser allows."""
    stack = [(name, value) for name, value in reversed(list(body))]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                return path, value[exc.start]
        elif isinstance(value, BaseModel):  # its fields, then the extra keys a content part may carry
            stack.extend((f"{path}.{k}", v) for k, v in reversed(list(value)))
        elif isinstance(value, dict):
            stack.extend((f"{path}.{k}", v) for k, v in reversed(list(value.items())))
        elif isinstance(value, list) and not all(type(v) is int for v in value):  # token ids hold no text
            stack.extend((f"{path}[{i}]", v) for i, v in reversed(list(enumerate(value))))
    return None


class BodyLimit:
    """ASGI middleware: a request body larger than `limit` bytes gets 413 in OpenAI's shape, by its
    Content-Length before a byte of it is read, or (a chunked body) as soon as the bytes read pass the limit.
    A body within it is read here and handed on whole, as FastAPI would have read it anyway."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await self.refuse(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away mid-body: nobody to answer
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self.refuse(scope, receive, send)
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:  # later calls: http.disconnect, which a streaming answer waits for
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def refuse(self, scope, receive, send):
        from fastapi.responses import JSONResponse

        message = (f"the request body is larger than {self.limit} bytes, this server's limit "
                   f"(vitune serve --max-request-bytes): send a shorter request, or raise the limit")
        reply = JSONResponse(error_body(message, "invalid_request_error", code="request_too_large"), status_code=413,
                             headers={"connection": "close"})  # the unread rest of the body cannot be skipped
        await reply(scope, receive, send)


def build_app(engine: Engine, models: list[ServedModel], api_key: Optional[str] = None, context: int = 2048,
              max_request_bytes: int = MAX_REQUEST_BYTES):
    """The FastAPI app: /health, /v1/models, /v1/chat/completions, /v1/completions over `engine`; bodies over
    `max_request_bytes` get 413, and with `api_key` every /v1/ path needs "Authorization: Bearer KEY"."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="vitune serve")
    by_name = {m.name: m for m in models}
    tokenizer = engine.tokenizer
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(_, exc: ApiError):
        return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_, exc: RequestValidationError):
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":  # FastAPI's loc is ("body", offset): not a field to name
            message = f"the request body is not valid JSON: {first['ctx']['error']} (character {first['loc'][-1]})"
            return JSONResponse(error_body(message, "invalid_request_error"), status_code=400)
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if not where:  # the body as a whole: none, not an object, or not sent as JSON
            message = f"the request body: {first.get('msg')}; send a JSON object with Content-Type: application/json"
            return JSONResponse(error_body(message, "invalid_request_error"), status_code=400)
        return JSONResponse(error_body(f"{where}: {first.get('msg')}", "invalid_request_error", where),
                            status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_, exc: HTTPException):
        message = str(exc.detail)
        # FastAPI answers "There was an error parsing the body" for any failure to read it; the cause says which
        if isinstance(exc.__cause__, UnicodeDecodeError):
            message = (f"the request body cannot be decoded as {exc.__cause__.encoding} (byte {exc.__cause__.start}): "
                       f"send JSON encoded as UTF-8")
        elif isinstance(exc.__cause__, RecursionError):
            message = "the request body is JSON nested too deep to read: send a flatter request"
        return JSONResponse(error_body(message, "invalid_request_error"), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal(_, exc: Exception):  # never a traceback to the client
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error"), status_code=500)

    # added first, so inside check_key: a request without the key is refused before its body is read
    app.add_middleware(BodyLimit, limit=max_request_bytes)
    # bytes: a non-ASCII key compares instead of raising; the header's str is its raw bytes read as latin-1
    expected = f"Bearer {api_key}".encode("utf-8") if api_key else None

    @app.middleware("http")
    async def check_key(request: HttpRequest, call_next):
        if expected and request.url.path.startswith("/v1/"):
            sent = request.headers.get("authorization", "").encode("latin-1")
            if not hmac.compare_digest(sent, expected):  # constant time: the delay tells nothing of how much matched
                return JSONResponse(error_body("missing or wrong API key (send Authorization: Bearer KEY)",
                                               "invalid_request_error", code="invalid_api_key"), status_code=401)
        return await call_next(request)

    def refuse_lone_surrogates(body: BaseModel) -> None:
        found = lone_surrogate(body)
        if found is not None:
            where, char = found
            raise ApiError(400, f"{where}: a lone UTF-16 surrogate (\\u{ord(char):04x}) is not a character; "
                                f"send valid Unicode: pair it with its other half, or remove it", param=where)

    @app.get("/health")
    async def health():
        # requests generating now and waiting for a batch slot: what a load balancer or a test watches
        return {"status": "ok", "running": len(engine.rows), "waiting": len(engine.waiting)}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": m.name, "object": "model", "created": created, "owned_by": "vitune"}
                                           for m in models]}

    def served(name: str) -> ServedModel:
        if name not in by_name:
            raise ApiError(404, f"model {name!r} is not served here; available: {', '.join(by_name)}",
                           param="model", code="model_not_found")
        return by_name[name]

    def sampling(body: Common, max_tokens: Optional[int], prompt_len: int, default: int, **extra) -> Sampling:
        budget = context - prompt_len
        wanted = default if max_tokens is None else max_tokens
        if max_tokens is None:
            wanted = max(0, min(wanted, budget))
        if prompt_len + wanted > context:
            raise ApiError(400, f"the prompt ({prompt_len} tokens) plus max_tokens ({wanted}) is longer than the "
                                f"model's context ({context} tokens)", param="max_tokens")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        return Sampling(max_new_tokens=wanted, temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                        stop=stops, **extra)

    def run(prompts: list[list[int]], settings: list[Sampling], model: ServedModel, ignore_eos: bool):
        """Submit one engine request per (prompt, sample) now (429 before any response starts); returns an
        async iterator of (index, Delta) as they come."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        requests = []
        for index, (ids, setting) in enumerate(zip(prompts, settings)):
            request = Request(ids, setting, lambda d, i=index: loop.call_soon_threadsafe(events.put_nowait, (i, d)),
                              adapter=model.adapter, stop_ids=[] if ignore_eos else model.stop_ids)
            requests.append(request)
        try:
            for request in requests:
                engine.submit(request)
        except BaseException as exc:  # those already queued would generate for nobody
            for request in requests:
                request.cancel()
            if isinstance(exc, QueueFull):
                raise ApiError(429, str(exc), "rate_limit_error", code="queue_full") from None
            raise
        return _events(events, requests)

    async def _events(events: asyncio.Queue, requests: list[Request]):
        open_ = len(requests)
        try:
            while open_:
                index, delta = await events.get()
                if delta.finish_reason == "error":
                    raise ApiError(500, delta.error or "generation failed", "server_error")
                if delta.finish_reason:
                    open_ -= 1
                yield index, delta
        finally:  # a client that went away (or an error): its rows leave the batch at the next step
            for request in requests:
                request.cancel()

    def seeded(setting: Sampling, i: int) -> Sampling:
        if setting.seed is None or i == 0:
            return setting
        return Sampling(**{**setting.__dict__, "seed": setting.seed + i})  # n samples differ, reproducibly

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest):
        refuse_lone_surrogates(body)
        model = served(body.model)
        system = None
        messages = []
        for m in body.messages:
            text = m.content if isinstance(m.content, str) else "".join(
                part.text for part in m.content if part.type == "text")
            if m.role == "system":
                system = text if system is None else f"{system}\n\n{text}"
            else:
                messages.append(Message(m.role, text))
        if not messages or messages[-1].role != "user":
            raise ApiError(400, "messages: the last message must be from the user", param="messages")
        conv = Conversation(messages, system=system)
        if system and getattr(model.template, "system_refused", None):
            conv = fold_system_prompt(conv)
        ids = tokenizer(model.template.prompt(conv), add_special_tokens=False)["input_ids"]
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        setting = sampling(body, limit, len(ids), context)
        rid, stamp = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        stream = run([ids] * body.n, [seeded(setting, i) for i in range(body.n)], model, body.ignore_eos)

        def usage(completion: int) -> dict:
            return {"prompt_tokens": len(ids) * body.n, "completion_tokens": completion,
                    "total_tokens": len(ids) * body.n + completion}

        if body.stream:
            async def sse():
                chunk = {"id": rid, "object": "chat.completion.chunk", "created": stamp, "model": model.name}
                tokens = 0
                for i in range(body.n):
                    first = {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                    yield f"data: {json.dumps({**chunk, 'choices': [first]})}\n\n"
                try:
                    async for i, delta in stream:
                        tokens += len(delta.token_ids)
                        if delta.text or delta.finish_reason:
                            choice = {"index": i, "delta": {"content": delta.text} if delta.text else {},
                                      "finish_reason": delta.finish_reason}
                            yield f"data: {json.dumps({**chunk, 'choices': [choice]}, ensure_ascii=False)}\n\n"
                except ApiError as exc:  # headers are sent: the error goes in the stream, as OpenAI does
                    yield f"data: {json.dumps(error_body(exc.message, exc.type))}\n\n"
                    return
                if body.stream_options and body.stream_options.include_usage:
                    yield f"data: {json.dumps({**chunk, 'choices': [], 'usage': usage(tokens)})}\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(sse(), media_type="text/event-stream")
        texts, reasons, tokens = [""] * body.n, [None] * body.n, 0
        async for i, delta in stream:
            texts[i] += delta.text
            tokens += len(delta.token_ids)
            reasons[i] = delta.finish_reason or reasons[i]
        return {"id": rid, "object": "chat.completion", "created": stamp, "model": model.name,
                "choices": [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                             "finish_reason": reasons[i], "logprobs": None} for i in range(body.n)],
                "usage": usage(tokens)}

    @app.post("/v1/completions")
    async def complete(body: CompletionRequest):
        refuse_lone_surrogates(body)
        model = served(body.model)
        prompt = body.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise ApiError(400, "prompt: give a string, a list of strings or token ids", param="prompt")
        prompts = [p if isinstance(p, list) else tokenizer(p)["input_ids"] for p in prompt]
        if any(not p for p in prompts):
            raise ApiError(400, "prompt: an empty prompt has nothing to continue", param="prompt")
        if any(not 0 <= t < len(tokenizer) for p in prompts for t in p if isinstance(t, int)):
            raise ApiError(400, f"prompt: token ids must be 0 to {len(tokenizer) - 1}", param="prompt")
        if body.max_tokens == 0 and not body.echo:
            raise ApiError(400, "max_tokens: 0 is allowed only with echo", param="max_tokens")
        settings, flat = [], []
        for p in prompts:
            base = sampling(body, body.max_tokens, len(p), 16, logprobs=body.logprobs, echo=body.echo)
            for i in range(body.n):
                settings.append(seeded(base, i))
                flat.append(p)
        rid, stamp = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        stream = run(flat, settings, model, body.ignore_eos)
        if body.stream:
            async def sse():
                chunk = {"id": rid, "object": "text_completion", "created": stamp, "model": model.name}
                tokens = 0
                try:
                    async for i, delta in stream:
                        tokens += len(delta.token_ids)
                        text = (tokenizer.decode(flat[i]) if body.echo and delta.prompt_logprobs is not None else "") + delta.text
                        if text or delta.finish_reason:
                            choice = {"index": i, "text": text, "finish_reason": delta.finish_reason, "logprobs": None}
                            yield f"data: {json.dumps({**chunk, 'choices': [choice]}, ensure_ascii=False)}\n\n"
                except ApiError as exc:
                    yield f"data: {json.dumps(error_body(exc.message, exc.type))}\n\n"
                    return
                if body.stream_options and body.stream_options.include_usage:
                    used = sum(map(len, flat))
                    yield f"data: {json.dumps({**chunk, 'choices': [], 'usage': {'prompt_tokens': used, 'completion_tokens': tokens, 'total_tokens': used + tokens}})}\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(sse(), media_type="text/event-stream")
        outputs = [{"text": "", "entries": [], "prompt": None, "ids": [], "reason": None} for _ in flat]
        async for i, delta in stream:
            out = outputs[i]
            out["text"] += delta.text
            out["ids"] += delta.token_ids
            out["entries"] += delta.logprobs
            out["reason"] = delta.finish_reason or out["reason"]
            if delta.prompt_logprobs is not None:
                out["prompt"] = delta.prompt_logprobs
        choices = []
        for i, (ids, out) in enumerate(zip(flat, outputs)):
            prefix = tokenizer.decode(ids) if body.echo else ""
            choice = {"index": i, "text": prefix + out["text"], "finish_reason": out["reason"], "logprobs": None}
            if body.logprobs is not None:
                entries = (out["prompt"] or []) + out["entries"] if body.echo else out["entries"]
                all_ids = (ids if body.echo else []) + out["ids"][: len(out["entries"])]
                choice["logprobs"] = legacy_logprobs(tokenizer, all_ids, entries)
            choices.append(choice)
        completion = sum(len(o["ids"]) for o in outputs)
        used = sum(map(len, flat))
        return {"id": rid, "object": "text_completion", "created": stamp, "model": model.name, "choices": choices,
                "usage": {"prompt_tokens": used, "completion_tokens": completion, "total_tokens": used + completion}}

    return app


def legacy_logprobs(tokenizer, ids: list[int], entries: list[dict]) -> dict:
    """OpenAI's legacy completions logprobs: tokens, token_logprobs, top_logprobs, text_offset (characters
    into the returned text, measured by decoding each prefix, so multi-byte characters count once)."""
    offsets, previous = [], 0
    for end in range(1, len(ids) + 1):
        offsets.append(previous)
        previous = len(tokenizer.decode(ids[:end]))
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [e["top"] for e in entries], "text_offset": offsets[: len(entries)]}
