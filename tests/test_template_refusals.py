"""Chat templates that raise, that cannot render at all, that take no system prompt, or that
write nothing after an answer: per-row rejections, one-line start-up errors, the
data.system_prompt fix, and the EOS that ends an answer where the template writes none."""

from __future__ import annotations

import json

import pytest

from vitune.cli import main
from vitune.data.records import Conversation, Message
from vitune.data.templates import resolve_template
from vitune.data.tokenize import tokenize_conversations
from vitune.models.loading import load_tokenizer

from conftest import write_config, write_jsonl

# Mistral-7B-Instruct-v0.2's original template: a system turn breaks its alternation rule.
MISTRAL_V02 = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
# ChatGLM3-style: a turn ends only when the next one opens
CHATGLM_STYLE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}<|system|>\n{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}<|user|>\n{{ m['content'] }}{% else %}<|assistant|>\n{{ m['content'] }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
UNDEFINED = "{% for m in messages %}{{ additional_special_tokens[0] }}{{ m['content'] }}{% endfor %}"
SYNTAX_ERROR = "{% for m in messages %}{{ m['content'] }{% endfor %}"

SYSTEM = "Bạn là trợ lý AI hữu ích."
ROWS = [
    {"conversations": [{"from": "human", "value": "Thủ đô của Việt Nam là gì?"}, {"from": "gpt", "value": "Hà Nội."}]},
    {"conversations": [{"from": "human", "value": "Một cộng một bằng mấy?"}, {"from": "gpt", "value": "Bằng hai."}]},
    {"conversations": [{"from": "system", "value": SYSTEM}, {"from": "human", "value": "Chào bạn!"},
                       {"from": "gpt", "value": "Chào bạn, tôi giúp gì được?"}]},
    {"conversations": [{"from": "human", "value": "Sông nào dài nhất Việt Nam?"}, {"from": "gpt", "value": "Sông Đồng Nai."}]},
    {"conversations": [{"from": "system", "value": SYSTEM}, {"from": "human", "value": "Phở là gì?"},
                       {"from": "gpt", "value": "Một món ăn Việt Nam."}]},
]


@pytest.fixture(scope="module")
def tokenizer_folder(tiny_llama, tmp_path_factory):
    """`tokenizer_folder(template)` -> a tokenizer folder (the tiny Llama's) with that chat template."""

    def make(source: str):
        folder = tmp_path_factory.mktemp("tok")
        tok = load_tokenizer(str(tiny_llama))
        tok.chat_template = source
        tok.save_pretrained(folder, save_jinja_files=False)
        return folder

    return make


def inspect(tmp_path, folder, rows=ROWS, **data):
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    config = write_config(tmp_path / "run.yaml", model={"name_or_path": str(folder)},
                          data={"train": [{"path": str(path)}], "cache": False, **data})
    return ["data", "inspect", str(config), "--json"], path


def test_rows_a_template_refuses_are_rejected_and_the_rest_kept(tokenizer_folder, tmp_path, capsys):
    argv, path = inspect(tmp_path, tokenizer_folder(MISTRAL_V02), on_error="skip")
    assert main(argv) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["rows_read"], stats["rows_kept"], stats["rows_rejected"]) == (5, 3, 2)
    assert stats["rejected_by_reason"] == {"template refused": 2}
    assert stats["first_rejections"] == [
        f"{path}:{n}: the chat template refused it: Conversation roles must alternate user/assistant/user/assistant/...; "
        "it takes no system prompt: set data.system_prompt: fold (into the first user turn) or drop" for n in (3, 5)
    ]
    assert stats["template_notices"] == [
        "the chat template takes no system prompt: Conversation roles must alternate user/assistant/user/assistant/...; "
        "rows with one are rejected as 'template refused' unless data.system_prompt is fold (into the first user turn) or drop"
    ]


def test_with_on_error_raise_the_refusal_stops_in_one_line(tokenizer_folder, tmp_path, capsys):
    argv, path = inspect(tmp_path, tokenizer_folder(MISTRAL_V02))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert err.startswith(f"error: 2 bad row(s): {path}:3: the chat template refused it: Conversation roles must alternate")
    assert err.endswith("fix them, or set data.on_error: skip to train on the rest")


@pytest.mark.parametrize("mode, counts", [("fold", (1, 0)), ("drop", (0, 1))])
def test_system_prompt_fold_or_drop_trains_every_row(tokenizer_folder, tmp_path, capsys, mode, counts):
    argv, _ = inspect(tmp_path, tokenizer_folder(MISTRAL_V02), rows=ROWS[2:3], system_prompt=mode)
    assert main(argv) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["rows_kept"], stats["rows_rejected"]) == (1, 0)
    assert (stats["system_prompts_folded"], stats["system_prompts_dropped"]) == counts


def test_fold_puts_the_system_prompt_before_the_first_user_turn(tokenizer_folder, tmp_path):
    from vitune.config import load_config
    from vitune.data.pipeline import DataReport, load_conversations

    argv, _ = inspect(tmp_path, tokenizer_folder(MISTRAL_V02), rows=ROWS[2:3], system_prompt="fold")
    (conv,), _ = load_conversations(load_config(argv[2]).data, 0, DataReport())
    assert conv.system is None
    assert conv.messages[0].content == f"{SYSTEM}\n\nChào bạn!"


@pytest.mark.parametrize("source, problem", [
    (UNDEFINED, "'additional_special_tokens' is undefined"),
    (SYNTAX_ERROR, "unexpected '}'"),
])
def test_a_template_that_cannot_render_is_one_line_at_start_up(tokenizer_folder, tmp_path, capsys, source, problem):
    argv, _ = inspect(tmp_path, tokenizer_folder(source))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: the tokenizer's chat template cannot render a plain user/assistant conversation: {problem} (a "
        "tool-use or otherwise special template?); fix chat_template in tokenizer_config.json or choose a built-in "
        "template with model.template (llama2, llama3, mistral, chatml, vistral, vinallama, vicuna, vietcuna, gemma, alpaca)"
    )


def test_a_template_without_end_of_turn_trains_eos_after_each_answer(tokenizer_folder):
    tok = load_tokenizer(str(tokenizer_folder(CHATGLM_STYLE)))
    template = resolve_template("auto", tok)
    assert template.notices == [
        "the chat template writes no end-of-turn marker after an answer (a turn ends only when the next one opens): "
        "vitune writes and trains the tokenizer's EOS '<|eot_id|>' after each answer, and chat stops on it"
    ]
    conv = Conversation([Message("user", "Chào!"), Message("assistant", "Chào bạn."),
                         Message("user", "Hà Nội ở đâu?"), Message("assistant", "Miền Bắc.")])
    rendered = template.render(conv, [False, True, False, True])
    assert rendered.text == "<|user|>\nChào!<|assistant|>\nChào bạn.<|eot_id|><|user|>\nHà Nội ở đâu?<|assistant|>\nMiền Bắc.<|eot_id|>"
    assert [rendered.text[a:b] for a, b in rendered.spans] == ["Chào bạn.<|eot_id|>", "Miền Bắc.<|eot_id|>"]
    (row,) = tokenize_conversations([conv], tok, template)
    eos = tok.eos_token_id
    assert [i for i, label in enumerate(row.labels) if label == eos] == [i for i, t in enumerate(row.input_ids) if t == eos]
    assert row.input_ids.count(eos) == 2
    # chat renders earlier answers as training saw them, and stops on the EOS
    history = Conversation(conv.messages[:3])
    assert template.prompt(history) == "<|user|>\nChào!<|assistant|>\nChào bạn.<|eot_id|><|user|>\nHà Nội ở đâu?<|assistant|>\n"
    assert template.stop_strings == ["<|eot_id|>"]


def test_a_template_without_end_of_turn_and_no_eos_is_refused(tokenizer_folder):
    from vitune.errors import ConfigError

    tok = load_tokenizer(str(tokenizer_folder(CHATGLM_STYLE)))
    tok.eos_token = None
    with pytest.raises(ConfigError, match=r"writes nothing after an answer .* and the tokenizer has no eos_token"):
        resolve_template("auto", tok)


def test_evaluation_rows_the_template_refuses_are_counted_too(tokenizer_folder, tmp_path, capsys):
    evaluation = write_jsonl(tmp_path / "eval.jsonl", ROWS[2:4])
    argv, _ = inspect(tmp_path, tokenizer_folder(MISTRAL_V02), rows=ROWS[:2], on_error="skip",
                      eval=[{"path": str(evaluation)}])
    assert main(argv) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["rows_read"], stats["rows_kept"], stats["rows_rejected"]) == (4, 3, 1)
    assert (stats["train_rows"], stats["eval_rows"]) == (2, 1)
    assert stats["first_rejections"][0].startswith(f"{evaluation}:1: the chat template refused it")


ONE_EXCHANGE_ONLY = ("{% if messages|length > 2 %}{{ raise_exception('one question at a time') }}{% endif %}"
                     "{% for m in messages %}<{{ m.role }}>{{ m.content }}</s>{% endfor %}")


def test_a_template_that_refuses_longer_conversations_rejects_only_those_rows(tokenizer_folder, tmp_path, capsys):
    two_turns = {"conversations": [*ROWS[0]["conversations"], *ROWS[1]["conversations"]]}
    argv, path = inspect(tmp_path, tokenizer_folder(ONE_EXCHANGE_ONLY), rows=[ROWS[0], two_turns, ROWS[3]],
                         on_error="skip")
    assert main(argv) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["rows_read"], stats["rows_kept"], stats["rows_rejected"]) == (3, 2, 1)
    assert stats["first_rejections"] == [f"{path}:2: the chat template refused it: one question at a time"]


@pytest.mark.parametrize("value", [42, {"default": 5}])
def test_a_chat_template_that_is_not_text_is_one_line(tokenizer_folder, tmp_path, capsys, value):
    folder = tokenizer_folder(MISTRAL_V02)
    config_file = folder / "tokenizer_config.json"
    settings = json.loads(config_file.read_text(encoding="utf-8"))
    settings["chat_template"] = value
    config_file.write_text(json.dumps(settings), encoding="utf-8")
    argv, _ = inspect(tmp_path, folder)
    assert main(argv) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "error: " in err and "not Jinja text; fix chat_template in tokenizer_config.json" in err


def test_chat_puts_the_system_prompt_before_the_first_question_for_such_a_template(tokenizer_folder, tiny_llama):
    from transformers import AutoModelForCausalLM

    from vitune.infer.chat import ChatModel

    tok = load_tokenizer(str(tokenizer_folder(MISTRAL_V02)))
    bot = ChatModel(AutoModelForCausalLM.from_pretrained(tiny_llama), tok, resolve_template("auto", tok), [tok.eos_token_id])
    seen = []
    render = bot.template.prompt
    bot.template.prompt = lambda conv: seen.append(conv) or render(conv)
    bot.answer([Message("user", "Chào!")], system=SYSTEM, max_new_tokens=1)
    assert [(m.role, m.content) for m in seen[0].messages] == [("user", f"{SYSTEM}\n\nChào!")]
    assert seen[0].system is None


def test_refusals_come_back_from_worker_processes(tokenizer_folder, tmp_path, capsys):
    argv, path = inspect(tmp_path, tokenizer_folder(MISTRAL_V02), on_error="skip", num_proc=2)
    assert main(argv) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["rows_read"], stats["rows_kept"], stats["rejected_by_reason"]) == (5, 3, {"template refused": 2})
    assert [line.split(": ", 1)[0] for line in stats["first_rejections"]] == [f"{path}:3", f"{path}:5"]
