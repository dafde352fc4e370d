"""A faster engine for byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2, BLOOM): tiktoken.

Most of data preparation is spent in the tokenizer. For byte-level BPE vocabularies,
tiktoken (OpenAI's Rust BPE, the engine Llama 3 was released with) gives the same ids as
`tokenizers` at about a quarter of the CPU time, because it skips the per-piece
bookkeeping `tokenizers` does for offsets and normalisation. We use it only where the two
are the same by construction, checked from the tokenizer's own set-up (its tokenizer.json):

- model BPE without dropout, word prefixes/suffixes or byte fallback, every byte in the vocab;
- no normaliser, or NFC (rows that are not NFC already go through `tokenizers`);
- pre-tokenizer ByteLevel (GPT-2's pattern) or a regex Split followed by ByteLevel, with no
  prefix space;
- added tokens matched as plain strings (no lstrip, rstrip or single_word), none inside another;
- merges in id order (BPE applies them in list order, tiktoken by the merged token's id).

tiktoken has no offsets; a token's character range is rebuilt from the byte lengths of the
tokens before it (byte-level tokens cover whole bytes of the text, in order), trimmed of
spaces as the ByteLevel post-processor trims them, so masks follow the same rule as with
`tokenizers`. Every row's tokens must cover its text to the byte, and a sample of rows is
encoded by both engines and compared: any difference and the whole batch goes through
`tokenizers` instead, with a notice.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from bisect import bisect_left, bisect_right
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import accumulate
from typing import Iterator, Optional

log = logging.getLogger(__name__)

# GPT-2's pre-tokenizer pattern: what ByteLevel(use_regex=True) splits with
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _byte_table() -> dict[int, str]:
    """str.translate table: ByteLevel's stand-in character for each byte -> that byte as a
    Latin-1 character. Other characters below 256 map above it, so that a token which is not
    byte-level fails to encode as Latin-1."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {c: "\uffff" for c in range(256)}
    extra = 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[256 + extra] = chr(b)
            extra += 1
    return table


BYTE_TABLE = _byte_table()


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass
class ByteLevelEncoder:
    """tiktoken set up as one byte-level BPE tokenizer, with what masks need per token id."""

    encoding: object  # tiktoken.Encoding
    nbytes: list[int]  # bytes each token id covers in the text
    lead: list[int]  # spaces the ByteLevel post-processor trims from a token's start
    trail: list[int]  # ... and from its end
    trim: bool  # the post-processor trims offsets
    trim_keeps_prefix_space: bool  # ByteLevel(add_prefix_space=True) keeps a first token's single space
    nfc: bool  # the tokenizer composes text (NFC) first: only NFC rows can skip it
    special_finder: Optional[re.Pattern]  # finds the added tokens in a text (None: there are none)

    def encode(self, texts: list[str]) -> list[list[int]]:
        # tiktoken converts the set of allowed special tokens on every call (Llama 3 has 256):
        # pass only those present in these texts (a NUL between texts ends any match)
        core = self.encoding._core_bpe
        present = set(self.special_finder.findall("\0".join(texts))) if self.special_finder else set()
        return [core.encode(text, present) for text in texts]

    def encode_iter(self, texts: list[str], chunk: int = 512) -> Iterator[list[int]]:
        """The ids of each text, in order, encoded by one thread per core (tiktoken releases
        the GIL while it encodes), so the caller can work on early rows meanwhile."""
        threads = _cores()
        if threads < 2 or len(texts) <= chunk:
            yield from self.encode(texts)
            return
        with ThreadPoolExecutor(threads) as pool:
            for part in pool.map(self.encode, [texts[i : i + chunk] for i in range(0, len(texts), chunk)]):
                yield from part

    def token_range(self, ids: list[int], ends: list[int], start: int, end: int) -> tuple[int, int]:
        """Tokens [i, j) whose (trimmed) byte range overlaps the byte range [start, end) of the text.

        `ends` are the tokens' cumulative byte ends. Trimming only narrows ranges and keeps
        them in order, so the overlapping tokens are one run: bisect the untrimmed ranges,
        then drop edge tokens whose trimmed range no longer overlaps.
        """
        n = len(ids)
        i = bisect_right(ends, start)
        j = min(bisect_left(ends, end) + 1, n)
        if self.trim:
            while i < j and self._trimmed(ids, ends, i)[1] <= start:
                i += 1
            while j > i and self._trimmed(ids, ends, j - 1)[0] >= end:
                j -= 1
        return i, j

    def _trimmed(self, ids: list[int], ends: list[int], k: int) -> tuple[int, int]:
        # as tokenizers' ByteLevel post-processor: spaces off both ends, never past each other
        begin = ends[k - 1] if k else 0
        stop = ends[k]
        lead, trail = self.lead[ids[k]], self.trail[ids[k]]
        if lead == 1 and begin == 0 and self.trim_keeps_prefix_space:
            lead = 0
        begin = min(begin + lead, stop)
        stop = max(stop - trail, begin) if trail else stop
        return begin, stop

    def cumulative_ends(self, ids: list[int]) -> list[int]:
        return list(accumulate(map(self.nbytes.__getitem__, ids)))


def _edge_spaces(text: str, chars: Optional[str] = None) -> tuple[int, int]:
    """Characters of `chars` (default: whitespace) at the start and at the end of `text`."""
    lead = len(text) - len(text.lstrip(chars))
    trail = len(text) - len(text.rstrip(chars)) if lead < len(text) else lead
    return lead, trail


def _pattern(pre: Optional[dict]) -> Optional[str]:
    """The split pattern of a byte-level pre-tokenizer, or None when it is not one we can match."""
    if pre is None:
        return None
    if pre.get("type") == "ByteLevel":
        return GPT2_PATTERN if pre.get("use_regex", True) and not pre.get("add_prefix_space") else None
    if pre.get("type") != "Sequence" or len(pre.get("pretokenizers", [])) != 2:
        return None
    split, level = pre["pretokenizers"]
    if level.get("type") != "ByteLevel" or level.get("use_regex", True) or level.get("add_prefix_space"):
        return None
    if split.get("type") != "Split" or split.get("behavior") != "Isolated" or split.get("invert"):
        return None
    pattern = split.get("pattern", {}).get("Regex")
    if pattern is None:
        return None
    # tokenizers keeps the text between two matches as a piece of its own (BLOOM's pattern
    # leaves out spaces and punctuation); tiktoken would drop it. The second branch matches
    # that text: a run of characters where the pattern does not match.
    return f"(?:{pattern})|(?:(?!(?:{pattern}))[\\s\\S])+"


def _post_trim(post: Optional[dict]) -> tuple[bool, bool]:
    """(trims offsets, keeps a first token's prefix space) of the ByteLevel post-processor, if any."""
    if post is None:
        return False, False
    steps = post.get("processors", []) if post.get("type") == "Sequence" else [post]
    for step in steps:
        if step.get("type") == "ByteLevel" and step.get("trim_offsets", True):
            return True, bool(step.get("add_prefix_space", True))
    return False, False


def _state(component) -> Optional[dict]:
    """A tokenizer component (normaliser, pre-tokenizer, ...) as its tokenizer.json entry."""
    return None if component is None else json.loads(component.__getstate__())


def build(tokenizer) -> tuple[Optional[ByteLevelEncoder], str]:
    """(encoder, "") when tiktoken can stand in for this tokenizer, else (None, why not).

    Set-up reads the tokenizer's parts, not its whole tokenizer.json; the merge list (280k
    pairs for Llama 3, most of a second) only to check that merges run in id order, in a
    process `start_setup` forked earlier when there is one.
    """
    try:
        import tiktoken
        from tokenizers.models import BPE
    except ImportError:
        return None, "tiktoken is not installed"
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None, "not a fast tokenizer"
    model = backend.model
    if not isinstance(model, BPE) or model.dropout or model.byte_fallback:
        return None, "not a byte-level BPE model"
    if model.continuing_subword_prefix or model.end_of_word_suffix:
        return None, "BPE with word prefixes or suffixes"
    normalizer = _state(backend.normalizer)
    if normalizer is not None and normalizer.get("type") != "NFC":
        return None, f"normaliser {normalizer.get('type')}"
    pattern = _pattern(_state(backend.pre_tokenizer))
    if pattern is None:
        return None, "pre-tokenizer is not ByteLevel"
    added = backend.get_added_tokens_decoder()  # id -> AddedToken
    if any(t.lstrip or t.rstrip or t.single_word for t in added.values()):
        return None, "added tokens with lstrip, rstrip or single_word"
    contents = [t.content for t in added.values()]
    finder = re.compile(_trie_pattern(contents)) if contents else None
    # one token starting another sorts right before it; one inside another is found by
    # searching each token past its first character
    ordered = sorted(contents)
    if any(b.startswith(a) for a, b in zip(ordered, ordered[1:])) or any(finder.search(c, 1) for c in contents):
        return None, "an added token inside another"

    vocab = backend.get_vocab(with_added_tokens=False)
    try:  # tokens added to the vocab are split out before BPE runs, never produced by merges
        ranks = {token.translate(BYTE_TABLE).encode("latin-1"): index for token, index in vocab.items()
                 if index not in added}
    except UnicodeEncodeError:
        return None, "vocab tokens that are not byte-level"
    if len(ranks) != len(vocab) - len(added.keys() & set(vocab.values())) or any(bytes([b]) not in ranks for b in range(256)):
        return None, "vocab lacks a byte or repeats one"

    started = tokenizer.__dict__.pop("_vitune_merge_check", None)
    why = started.result() if started is not None else None
    if why is None:  # not started early, or its process failed: check here
        why = _merge_order_differs(model.__getstate__(), vocab)
    if why:
        return None, why

    size = max([*vocab.values(), *added], default=0) + 1
    nbytes, lead, trail = [0] * size, [0] * size, [0] * size
    for raw, index in ranks.items():
        nbytes[index] = len(raw)
    for index, t in added.items():
        nbytes[index] = len(t.content.encode("utf-8"))
    trim, keep_prefix = _post_trim(_state(backend.post_processor))
    if trim:
        for token, index in vocab.items():
            if token[:1] == "Ġ" or token[-1:] == "Ġ":  # a space's stand-in character
                lead[index], trail[index] = _edge_spaces(token, "Ġ")
        for index, t in added.items():
            lead[index], trail[index] = _edge_spaces(t.content)
    try:
        encoding = tiktoken.Encoding(name="vitune", pat_str=pattern, mergeable_ranks=ranks,
                                     special_tokens={t.content: index for index, t in added.items()})
    except Exception as exc:  # a pattern tiktoken's regex engine does not take
        return None, f"tiktoken cannot use it ({exc})"
    return ByteLevelEncoder(encoding, nbytes, lead, trail, trim, keep_prefix, normalizer is not None, finder), ""


def start_setup(tokenizer) -> None:
    """Start the slowest part of the set-up, the merge-order check, in a forked process, so
    it runs on another core while the caller reads its data; `build` collects the verdict.
    Does nothing off Linux (fork is unsafe on macOS, absent on Windows), or for a tokenizer
    already set up or not BPE."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or hasattr(tokenizer, "_vitune_byte_bpe") or not sys.platform.startswith("linux"):
        return
    from tokenizers.models import BPE

    if isinstance(backend.model, BPE) and _pattern(_state(backend.pre_tokenizer)) is not None:
        try:
            tokenizer._vitune_merge_check = _MergeCheck(backend)
        except (AttributeError, OSError):  # cannot hold the attribute, or cannot fork: check in build
            pass


CHECK_TIMEOUT_S = 60


class _MergeCheck:
    """`_merge_order_differs` in a forked child. `result()`: its verdict, or None when the child
    failed. Pickles (e.g. into data.num_proc workers) as a finished check."""

    def __init__(self, backend):
        import multiprocessing

        context = multiprocessing.get_context("fork")
        self._verdict: Optional[str] = None
        self._receive, send = context.Pipe(duplex=False)
        self._process = context.Process(target=_merge_check_child, args=(backend, send), daemon=True)
        self._process.start()
        send.close()

    def result(self) -> Optional[str]:
        if self._process is not None:
            try:  # a second or so; a child stuck on a lock another thread held at fork gives up
                self._verdict = self._receive.recv() if self._receive.poll(CHECK_TIMEOUT_S) else None
            except (EOFError, OSError):
                self._verdict = None
            if self._verdict is None:
                self._process.kill()
            self._process.join()
            self._receive.close()
            self._process = None
        return self._verdict

    def __reduce__(self):
        return _finished_check, (self.result(),)


def _finished_check(verdict: Optional[str]) -> "_MergeCheck":
    check = _MergeCheck.__new__(_MergeCheck)
    check._verdict, check._process = verdict, None
    return check


def _merge_check_child(backend, send) -> None:
    send.send(_merge_order_differs(backend.model.__getstate__(), backend.get_vocab(with_added_tokens=False)))
    send.close()


def _merge_order_differs(model_json: bytes, vocab: dict[str, int]) -> str:
    """BPE applies merges in list order, tiktoken in order of the merged token's id: the same
    only when ids grow with the merge order. "" when they do, else why not."""
    merges = json.loads(model_json).get("merges") or []
    joined = map("".join, merges) if merges and isinstance(merges[0], list) else (m.replace(" ", "", 1) for m in merges)
    merged = [vocab.get(token, -1) for token in joined]
    if -1 in merged or any(b < a for a, b in zip(merged, merged[1:])):
        return "merge order differs from id order"
    return ""


def _trie_pattern(words: list[str]) -> str:
    """A regex matching any of `words`, written as a trie ("<\\|(?:eot_id\\|>|im_end\\|>)"), which
    Python's regex engine scans far faster than a flat alternation of hundreds of tokens."""
    trie: dict = {}
    for word in words:
        node = trie
        for ch in word:
            node = node.setdefault(ch, {})
        node[""] = {}

    def emit(node: dict) -> str:
        ends = "" in node
        branches = [re.escape(ch) + emit(child) for ch, child in sorted(node.items()) if ch]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        if ends:  # a word may stop here: it starts another word
            body = "(?:" + body + ")?"
        return body

    return emit(trie)


def encoder_for(tokenizer) -> Optional[ByteLevelEncoder]:
    """The tiktoken stand-in for `tokenizer`, built once per tokenizer set-up; None when unsafe."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    key = (
        backend.get_vocab_size(with_added_tokens=True),
        backend.get_vocab_size(with_added_tokens=False),
        repr(backend.normalizer), repr(backend.pre_tokenizer), repr(backend.post_processor),
    )
    cached = getattr(tokenizer, "_vitune_byte_bpe", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    encoder, why = build(tokenizer)
    if encoder is None:
        log.debug("tokenizing with tokenizers: %s", why)
    try:
        tokenizer._vitune_byte_bpe = (key, encoder)
    except AttributeError:
        pass
    return encoder


def disable(tokenizer) -> None:
    """Stop using tiktoken for `tokenizer` (it cannot stand in for `tokenizers` after all)."""
    cached = getattr(tokenizer, "_vitune_byte_bpe", None)
    if cached is not None:
        tokenizer._vitune_byte_bpe = (cached[0], None)
