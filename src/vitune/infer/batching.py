"""The generation engine behind `vitune serve`: one worker thread owns the model and runs every
request in one dynamic batch over one KV cache. No HTTP here (that is infer/serve.py).

A request comes in as token ids plus its sampling settings and its adapter; it leaves as a
stream of `Delta`s (text, token ids, log-probabilities) ending with a finish reason.

Why by hand and not transformers' own continuous batching (`init_continuous_batching()`):
its manager packs every request into one row (batch size 1, varlen / paged attention), so
PEFT's mixed-adapter batches (`adapter_names`, one name per batch row) cannot tell requests
apart; it has no per-request `torch.Generator` (OpenAI's `seed`) and no prompt log-probs
(`echo` + `logprobs`, what lm-evaluation-harness needs). Here a request is prefilled alone
(so its prompt is computed exactly as `generate` computes it), its cache is left-padded to
the batch's length and concatenated along the batch, and every step is one forward of all
rows with an explicit attention mask and position ids.

Sliding-window attention (Mistral's `sliding_window`, the sliding layers of Gemma 2/3):
transformers' own sliding layers keep only a window's last keys and count the tokens seen in one
number for the whole cache, which left padding and rows joining mid-batch would break. Here such a
model is given a cache whose layers keep every key (a `DynamicCache` without the config), and the
model's own mask functions (transformers.masking_utils) apply each layer's window. They count it in
cache columns; a row's real tokens are contiguous at the right end of its left-padded row, so a
window of columns is the same window of tokens, and each query attends to exactly the keys it
attends to under `generate`. When every layer slides (Mistral), columns older than the widest
window are dropped, so the cache is as small as `generate`'s; with global layers too (Gemma), the
sliding layers keep every key: memory as a full-attention model's.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from vitune.models.kv_cache import attention_windows, check_paddable, drop_columns, keep_rows, pad_left, prefill_cache
from vitune.models.loading import cache_keyword

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch


class QueueFull(Exception):
    """More requests are waiting than the engine's max_queue allows."""


@dataclass
class Sampling:
    """Per-request decoding settings. temperature 0 = greedy."""

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: list[str] = field(default_factory=list)  # stop strings: text is cut before them
    logprobs: Optional[int] = None  # top-k log-probs of each generated (and, with echo, prompt) token
    echo: bool = False


@dataclass
class Delta:
    """A piece of one request's output: new text, the tokens behind it, and at the end a finish reason
    ("stop", "length", or "error" with `error` set). With echo the first delta carries the prompt's log-probs."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)  # {"token", "logprob", "top": {token: logprob}}
    finish_reason: Optional[str] = None
    error: Optional[str] = None
    prompt_logprobs: Optional[list[dict]] = None


@dataclass
class Request:
    """One generation: prompt token ids, sampling, adapter, and `emit(delta)` called from the worker thread."""

    prompt_ids: list[int]
    sampling: Sampling
    emit: Callable[[Delta], None]
    adapter: str = BASE
    stop_ids: list[int] = field(default_factory=list)
    cancelled: bool = False  # set by the caller (a client that went away); the worker drops the row
    generated: list[int] = field(default_factory=list)
    sent_chars: int = 0  # characters of the decoded answer already emitted
    generator: Optional[torch.Generator] = None

    def cancel(self) -> None:
        self.cancelled = True


class Engine:
    """Dynamic batching over one model: `submit(request)` from any thread; `start()` runs the worker."""

    def __init__(self, model, tokenizer, max_batch: int = 16, max_queue: int = 256, uses_adapters: bool = False,
                 prefill_together: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.uses_adapters = uses_adapters  # a PeftModel: every forward names each row's adapter
        # prompts admitted together are prefilled in one left-padded forward: much faster for many
        # prompts at once (vitune eval), but padding can move a logit by ~1e-6, so the server keeps
        # prefilling each prompt alone, exactly as generate() computes it
        self.prefill_together = prefill_together
        self.device = next(model.parameters()).device
        self.waiting: deque[Request] = deque()
        self.wake = threading.Condition()
        self.rows: list[Request] = []  # the running batch, in cache order
        self.cache = None  # DynamicCache of all rows, left-padded to a common length
        self.mask: Optional[torch.Tensor] = None  # [rows, cache length]: 1 = a real token, 0 = padding
        self.positions: Optional[torch.Tensor] = None  # [rows]: position of each row's next input token
        self.next_ids: Optional[torch.Tensor] = None  # [rows]: last sampled token, fed at the next step
        self.thread: Optional[threading.Thread] = None
        self.stopping = False
        self.cache_keyword = cache_keyword()
        self.windows = attention_windows(model)
        sliding = [w for w in self.windows if w is not None]
        # every layer slides: no query looks back past the widest window (generate keeps no more)
        self.keep_columns = max(sliding) - 1 if sliding and len(sliding) == len(self.windows) else None

    # ------------------------------------------------------------ the caller's side

    def submit(self, request: Request) -> None:
        """Queue a request; raises QueueFull when max_queue requests are already waiting."""
        if request.sampling.seed is not None:
            request.generator = torch.Generator(device=self.device).manual_seed(request.sampling.seed)
        with self.wake:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (--max-queue {self.max_queue}); retry later")
            self.waiting.append(request)
            self.wake.notify()

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="vitune-generation", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        with self.wake:
            self.stopping = True
            self.wake.notify()

    # ------------------------------------------------------------ the worker

    def _run(self) -> None:
        while True:
            with self.wake:
                while not self.stopping and not self.waiting and not self.rows:
                    self.wake.wait()
                if self.stopping:
                    return
                admitted = []
                while self.waiting and len(self.rows) + len(admitted) < self.max_batch:
                    admitted.append(self.waiting.popleft())
            admitted = [r for r in admitted if not r.cancelled]
            together = [r for r in admitted if self.prefill_together and not r.sampling.echo]
            if len(together) > 1:
                self._guarded(together, lambda: self._prefill_group(together))
                admitted = [r for r in admitted if r not in together]
            for request in admitted:  # joins at this step: nobody waits for another request to finish
                self._guarded([request], lambda: self._prefill(request))
            if self.rows:
                self._guarded(list(self.rows), self._step)

    def _guarded(self, requests: list[Request], work: Callable[[], None]) -> None:
        # An exception fails the requests it touched (the caller answers 500); the worker keeps serving.
        try:
            work()
        except Exception as exc:  # noqa: BLE001 - anything from the model or tokenizer
            message = f"generation failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            for request in requests:
                request.emit(Delta(finish_reason="error", error=message))
            failed = set(map(id, requests))
            broken = self.cache is not None and (
                self.cache.layers[0].keys.shape[0] != len(self.rows) or self.cache.layers[0].keys.shape[-2] != self.mask.shape[1])
            if broken:  # the failure came half-way through changing the batch: its rows cannot go on
                for request in self.rows:
                    if id(request) not in failed:
                        request.emit(Delta(finish_reason="error", error=message))
            if broken or any(id(r) in failed for r in self.rows):
                self.rows, self.cache, self.mask, self.positions, self.next_ids = [], None, None, None, None

    def _forward(self, input_ids, adapters, **kwargs):
        if self.uses_adapters:
            kwargs["adapter_names"] = adapters
        with torch.inference_mode():
            return self.model(input_ids=input_ids, use_cache=True, **kwargs)

    def _new_cache(self) -> dict:
        return prefill_cache(self.windows, self.cache_keyword)

    def _prefill(self, request: Request) -> None:
        """Run one new prompt alone (exactly as `generate` would), sample its first token, add it to the batch."""
        ids = torch.tensor([request.prompt_ids], device=self.device)
        echo = request.sampling.echo and request.sampling.logprobs is not None
        out = self._forward(ids, [request.adapter], logits_to_keep=0 if echo else 1, **self._new_cache())
        if request.sampling.max_new_tokens > 1:  # it will join the batch: refused before any token is sent
            check_paddable(getattr(out, self.cache_keyword))
        logits = out.logits[0].float()
        first = Delta()
        if echo:
            first.prompt_logprobs = self._prompt_logprobs(request.prompt_ids, logits[:-1], request.sampling.logprobs)
        if request.sampling.max_new_tokens == 0:
            first.finish_reason = "length"
            request.emit(first)
            return
        finished = self._accept(request, logits[-1], first)
        if finished:
            return
        cache = getattr(out, self.cache_keyword)
        length = len(request.prompt_ids)
        self._join([request], cache, torch.ones(1, length, dtype=torch.long, device=self.device), [length])

    def _prefill_group(self, requests: list[Request]) -> None:
        """Prefill several prompts in one forward, left-padded to the longest; each samples its first token."""
        width = max(len(r.prompt_ids) for r in requests)
        ids = torch.zeros(len(requests), width, dtype=torch.long, device=self.device)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(requests):
            ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids, device=self.device)
            mask[i, width - len(r.prompt_ids):] = 1
        out = self._forward(ids, [r.adapter for r in requests], attention_mask=mask,
                            position_ids=(mask.cumsum(1) - 1).clamp(min=0), logits_to_keep=1, **self._new_cache())
        if any(r.sampling.max_new_tokens > 1 for r in requests):
            check_paddable(getattr(out, self.cache_keyword))
        logits = out.logits[:, -1].float()
        going = []
        for i, r in enumerate(requests):
            if r.sampling.max_new_tokens == 0:
                r.emit(Delta(finish_reason="length"))
            elif not self._accept(r, logits[i], Delta()):
                going.append(i)
        if not going:
            return
        cache = getattr(out, self.cache_keyword)
        index = torch.tensor(going, device=self.device)
        keep_rows(cache, index)
        self._join([requests[i] for i in going], cache, mask[index], [len(requests[i].prompt_ids) for i in going])

    def _join(self, requests: list[Request], cache, mask: torch.Tensor, lengths: list[int]) -> None:
        """Add prefilled rows (their cache and [rows, width] mask) to the running batch, left-padding
        whichever side is shorter so every row ends at the same column."""
        if self.cache is None:
            self.rows, self.cache, self.mask = list(requests), cache, mask
        else:
            width = max(self.mask.shape[1], mask.shape[1])
            pad_left(self.cache, width - self.mask.shape[1])
            pad_left(cache, width - mask.shape[1])
            for mine, theirs in zip(self.cache.layers, cache.layers):
                mine.keys = torch.cat([mine.keys, theirs.keys])
                mine.values = torch.cat([mine.values, theirs.values])
            pad = lambda m: torch.nn.functional.pad(m, (width - m.shape[1], 0))  # noqa: E731
            self.mask = torch.cat([pad(self.mask), pad(mask)])
            self.rows.extend(requests)
        tokens = torch.tensor([r.generated[-1] for r in requests], device=self.device)
        positions = torch.tensor(lengths, device=self.device)
        fresh = self.next_ids is None or len(self.rows) == len(requests)
        self.next_ids = tokens if fresh else torch.cat([self.next_ids, tokens])
        self.positions = positions if fresh else torch.cat([self.positions, positions])

    def _step(self) -> None:
        """One forward of every running row; each row samples its next token; finished rows leave."""
        if self.keep_columns is not None and self.mask.shape[1] > self.keep_columns:
            self._drop_left(self.mask.shape[1] - self.keep_columns)
        self.mask = torch.cat([self.mask, torch.ones(len(self.rows), 1, dtype=torch.long, device=self.device)], dim=1)
        out = self._forward(
            self.next_ids[:, None], [r.adapter for r in self.rows], attention_mask=self.mask,
            position_ids=self.positions[:, None], **{self.cache_keyword: self.cache},
        )
        logits = out.logits[:, -1].float()
        self.positions = self.positions + 1
        keep = []
        for i, request in enumerate(self.rows):
            if request.cancelled or self._accept(request, logits[i], Delta()):
                continue
            keep.append(i)
        self.next_ids = torch.tensor([self.rows[i].generated[-1] for i in keep], device=self.device)
        if len(keep) < len(self.rows):
            self._keep_rows(keep)

    def _keep_rows(self, keep: list[int]) -> None:
        if not keep:
            self.rows, self.cache, self.mask, self.positions, self.next_ids = [], None, None, None, None
            return
        index = torch.tensor(keep, device=self.device)
        self.rows = [self.rows[i] for i in keep]
        self.mask, self.positions = self.mask[index], self.positions[index]
        keep_rows(self.cache, index)
        # columns that are padding in every remaining row (the longest prompt left) are dropped
        self._drop_left(int((self.mask.sum(0) > 0).nonzero()[0]))

    def _drop_left(self, columns: int) -> None:
        """Drop the oldest `columns` columns of every row: of the mask and of every layer's keys and values."""
        self.mask = self.mask[:, columns:]
        drop_columns(self.cache, columns)

    # ------------------------------------------------------------ sampling and text

    def _accept(self, request: Request, logits: torch.Tensor, delta: Delta) -> bool:
        """Sample the next token of `request` from `logits` [vocab], emit what it adds; True when it is finished."""
        token = sample(logits, request.sampling, request.generator)
        request.generated.append(token)
        if request.sampling.logprobs is not None:
            delta.logprobs = [self._logprob_entry(torch.log_softmax(logits, -1), token, request.sampling.logprobs)]
        if token in request.stop_ids:
            delta.finish_reason = "stop"
        text = self.tokenizer.decode(request.generated, skip_special_tokens=True)
        new = text[request.sent_chars :]
        hits = [i for i in (text.find(s, max(0, request.sent_chars - len(s))) for s in request.sampling.stop if s) if i >= 0]
        if hits:  # a stop string: the answer ends before it
            new, delta.finish_reason = text[request.sent_chars : max(min(hits), request.sent_chars)], "stop"
        elif delta.finish_reason is None and len(request.generated) >= request.sampling.max_new_tokens:
            delta.finish_reason = "length"
            new = new.rstrip("\ufffd")  # cut inside a character: end on the last whole one
        elif delta.finish_reason is None:
            # hold back an unfinished UTF-8 character and any tail that may start a stop string
            held = len(new) - len(new.rstrip("\ufffd"))
            for s in request.sampling.stop:
                held = max(held, max((k for k in range(1, len(s)) if text.endswith(s[:k])), default=0))
            new = new[: len(new) - held]
        request.sent_chars += len(new)
        delta.text, delta.token_ids = new, [token]
        request.emit(delta)
        return delta.finish_reason is not None

    def _token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def _logprob_entry(self, logprobs: torch.Tensor, token: int, k: int) -> dict:
        top = torch.topk(logprobs, min(max(k, 1), logprobs.shape[-1]))
        return {
            "token": self._token_text(token),
            "logprob": float(logprobs[token]),
            "top": {self._token_text(int(i)): float(v) for v, i in zip(top.values[:k], top.indices[:k])},
        }

    def _prompt_logprobs(self, ids: list[int], logits: torch.Tensor, k: int) -> list[dict]:
        """Log-probs of prompt tokens 1.. given the ones before (`logits` [len-1, vocab]); the first has none."""
        logprobs = torch.log_softmax(logits, -1)
        entries = [{"token": self._token_text(ids[0]), "logprob": None, "top": None}]
        entries += [self._logprob_entry(logprobs[i], ids[i + 1], k) for i in range(len(ids) - 1)]
        return entries


def sample(logits: torch.Tensor, sampling: Sampling, generator: Optional[torch.Generator] = None) -> int:
    """The next token from `logits` [vocab]: argmax at temperature 0, else temperature + nucleus (top_p) sampling."""
    if sampling.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / sampling.temperature, -1)
    if sampling.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the most likely token always stays)
        outside = torch.cumsum(sorted_probs, -1) - sorted_probs >= sampling.top_p
        sorted_probs[outside] = 0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    if not math.isfinite(float(probs.sum())) or float(probs.sum()) <= 0:
        return int(torch.argmax(logits))
    return int(torch.multinomial(probs, 1, generator=generator))
