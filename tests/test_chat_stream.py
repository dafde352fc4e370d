"""ChatModel.stream (vitune.infer.chat), what `vitune chat` and the page's chat tab print: an answer cut
at the token limit ends on a whole character, and a stop event ends generation at the next token."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from vitune.data.records import Message
from vitune.infer.chat import ChatModel, load_chat_model


class ScriptedModel:
    """A stand-in for a causal LM whose generate() "generates" the token ids it was given, as transformers'
    generate() feeds them to its streamer: the prompt first, then one token at a time, until
    max_new_tokens or a stopping criterion, then end()."""

    device = "cpu"

    def __init__(self, answer_ids: list[int]):
        self.answer_ids = answer_ids

    def generate(self, input_ids, max_new_tokens, streamer, stopping_criteria=(), **kwargs):
        import torch

        streamer.put(input_ids)
        done = input_ids
        for token in self.answer_ids[:max_new_tokens]:
            done = torch.cat([done, torch.tensor([[token]])], dim=1)
            streamer.put(torch.tensor([token]))
            if any(bool(criterion(done, None).all()) for criterion in stopping_criteria):
                break
        streamer.end()


def scripted_chat(tokenizer, answer: str) -> ChatModel:
    """A ChatModel of a real tokenizer whose answer to anything is `answer`, token by token."""
    ids = tokenizer.encode(answer, add_special_tokens=False)
    template = SimpleNamespace(prompt=lambda conv: conv.messages[-1].content, system_refused=False)
    return ChatModel(ScriptedModel(ids), tokenizer, template, stop_ids=[])


@pytest.mark.parametrize("vocab, answer, tokens, expected", [
    # Llama 3's byte-level BPE: "Đ", "i", " TH", the first two bytes of "Ẳ", its last byte, "NG"
    ("llama-bpe", "Đi THẲNG", 4, "Đi TH"),
    ("llama-bpe", "Đi THẲNG", 5, "Đi THẲ"),
    # Llama 2's SentencePiece byte fallback: "ng", then "ẫ" as three byte tokens <0xE1> <0xBA> <0xAB>
    ("llama-spm", "ngẫm nghĩ", 2, "ng"),
    ("llama-spm", "ngẫm nghĩ", 3, "ng"),
    ("llama-spm", "ngẫm nghĩ", 4, "ngẫ"),
])
def test_an_answer_cut_inside_a_character_ends_before_it(real_tokenizer, vocab, answer, tokens, expected):
    bot = scripted_chat(real_tokenizer(vocab), answer)
    pieces = list(bot.stream([Message("user", "Hỏi")], max_new_tokens=tokens))
    assert "".join(pieces) == expected


def test_an_answer_not_cut_keeps_every_character(real_tokenizer):
    bot = scripted_chat(real_tokenizer("llama-bpe"), "Đi THẲNG")
    assert "".join(bot.stream([Message("user", "Hỏi")], max_new_tokens=64)) == "Đi THẲNG"


def test_a_stop_event_set_before_the_answer_ends_it_after_one_token(real_tokenizer):
    bot = scripted_chat(real_tokenizer("llama-bpe"), "Đi THẲNG")
    stop = threading.Event()
    stop.set()
    assert "".join(bot.stream([Message("user", "Hỏi")], max_new_tokens=64, stop=stop)) == "Đ"


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory) -> ChatModel:
    """The tiny random Llama (vitune init-model), which never says its end token: it talks until stopped."""
    from vitune.models.tiny import init_tiny_model

    return load_chat_model(str(init_tiny_model("llama", tmp_path_factory.mktemp("tiny") / "llama")))


def forward_calls(model) -> list[int]:
    """A counter of the model's forward passes: one per generated token (the first one reads the prompt)."""
    calls = [0]

    def count(module, args, output):
        calls[0] += 1

    model.register_forward_hook(count)
    return calls


def test_a_stop_event_ends_the_models_generation_not_only_the_stream(tiny_chat):
    calls = forward_calls(tiny_chat.model)
    stop = threading.Event()
    pieces = []
    for piece in tiny_chat.stream([Message("user", "Xin chào")], max_new_tokens=100_000, stop=stop):
        pieces.append(piece)
        if len(pieces) == 3:
            stop.set()  # as the page's Stop button does, from another thread
    generated = calls[0]
    assert 3 <= generated < 50  # the model stopped within a few tokens of the stop, not at 100,000
    calls[0] = 0
    # what was streamed before the stop is the greedy answer of that many tokens
    assert "".join(pieces) == "".join(tiny_chat.stream([Message("user", "Xin chào")], max_new_tokens=generated))
    assert calls[0] == generated


class LockstepModel(ScriptedModel):
    """A ScriptedModel that waits, before each token, until the other side reaches the same token:
    the two answers can only finish if they are generated at the same time."""

    def __init__(self, answer_ids: list[int], barrier: threading.Barrier):
        super().__init__(answer_ids)
        self.barrier = barrier

    def generate(self, input_ids, max_new_tokens, streamer, stopping_criteria=(), **kwargs):
        import torch

        streamer.put(input_ids)
        for token in self.answer_ids[:max_new_tokens]:
            self.barrier.wait(timeout=10)
            streamer.put(torch.tensor([token]))
        streamer.end()


def test_side_by_side_both_panels_are_generated_at_the_same_time(real_tokenizer):
    from vitune.ui.chat import ChatSessions

    tokenizer = real_tokenizer("llama-bpe")
    template = SimpleNamespace(prompt=lambda conv: conv.messages[-1].content, system_refused=False)
    barrier = threading.Barrier(2)
    chat = ChatSessions()
    for path, answer in (("runs/tuned", "Hà Nội là thủ đô."), ("base", "Tôi không biết, xin lỗi.")):
        ids = tokenizer.encode(answer, add_special_tokens=False)
        chat.models[path] = ChatModel(LockstepModel(ids, barrier), tokenizer, template, stop_ids=[])
    chat.base_of = lambda path: "base"
    shown = [(tuned[-1]["content"] if tuned else "", base[-1]["content"] if base else "", error)
             for tuned, base, _, error, _, _ in chat.respond(
                 "Thủ đô?", [], [], "runs/tuned", "", 0, 0.9, 1.0, 64, True, "en", SimpleNamespace(session_hash="s"))]
    assert shown[-1] == ("Hà Nội là thủ đô.", "Tôi không biết, xin lỗi.", "")
    # the panels grew together: some update showed part of each answer
    assert any(0 < len(tuned) < 17 and 0 < len(base) < 24 for tuned, base, _ in shown)


@pytest.mark.parametrize("tokens, expected", [(4, "Đi TH"), (5, "Đi THẲ"), (6, "Đi THẲNG")])
def test_vitune_serve_ends_an_answer_cut_at_the_token_limit_on_a_whole_character(real_tokenizer, tokens, expected):
    """The serving engine (infer/batching.py) emits what each token adds; the last piece of an answer cut at
    max_new_tokens inside a character drops the cut bytes instead of sending U+FFFD."""
    import torch

    from vitune.infer.batching import Delta, Engine, Request, Sampling

    tokenizer = real_tokenizer("llama-bpe")
    ids = tokenizer.encode("Đi THẲNG", add_special_tokens=False)
    sent: list = []
    request = Request(prompt_ids=[1], sampling=Sampling(max_new_tokens=tokens, temperature=0.0), emit=sent.append)
    engine = SimpleNamespace(tokenizer=tokenizer)
    for token in ids[:tokens]:
        logits = torch.full((len(tokenizer),), -1e9)
        logits[token] = 0.0
        if Engine._accept(engine, request, logits, Delta()):
            break
    assert "".join(d.text for d in sent) == expected
    assert sent[-1].finish_reason == "length"
