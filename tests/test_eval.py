"""`vitune eval`: multiple choice in VMLU's format (parsing, prompts, log-likelihoods equal to a direct
forward pass, acc / acc_norm / the generated letter), loss and perplexity on the trained tokens,
bits per character, implicit reward accuracy, eval.json and --compare, and bad input counted by
file and line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from vitune.cli import main
from vitune.eval import multiple_choice as mc
from vitune.eval import tasks

from conftest import ROOT, train_run, write_jsonl

VMLU = ROOT / "data" / "vmlu_vi.jsonl"
QA = ROOT / "data" / "qa_vi_eval.jsonl"
CORPUS_EVAL = ROOT / "data" / "corpus_vi_eval.jsonl"
PAIRS = ROOT / "data" / "preference_vi_eval.jsonl"

ROW = {"id": "q1", "question": "Thủ đô của Việt Nam là thành phố nào?",
       "choices": ["A. Hà Nội", "B. Huế", "C. Đà Nẵng", "D. Cần Thơ"], "answer": "A",
       "subject": "geography", "category": "Social Science"}


def error_of(capsys) -> str:
    return " ".join(capsys.readouterr().err.split())


@pytest.fixture(scope="module")
def scorer(tiny_llama):
    from vitune.infer.chat import load_chat_model

    bot = load_chat_model(str(tiny_llama))
    return tasks.Scorer(bot.model, bot.tokenizer, bot.template, bot.stop_ids, context=2048, batch_size=4)


@pytest.fixture(scope="module")
def lora_run(tiny_llama, tmp_path_factory) -> Path:
    return train_run(tmp_path_factory.mktemp("eval"), tiny_llama, "lora")


# ---------------------------------------------------------------- reading questions


def test_a_vmlu_row_becomes_a_question_without_its_letter_prefixes():
    q = mc.parse_question(ROW, "f.jsonl:1")
    assert (q.id, q.choices, q.answer, q.letters, q.subject, q.category) == (
        "q1", ["Hà Nội", "Huế", "Đà Nẵng", "Cần Thơ"], 0, "ABCD", "geography", "Social Science")


def test_a_csv_with_question_a_b_c_d_answer_columns_is_read(tmp_path):
    path = tmp_path / "mc.csv"
    path.write_text("question,A,B,C,D,answer\n\"2 + 3 = ?\",4,5,6,7,B\nSông dài nhất?,Hồng,Mê Kông,Đà,,b\n",
                    encoding="utf-8")
    found = mc.read_questions([str(path)])
    assert [(q.question, q.choices, q.answer) for q in found.questions] == [
        ("2 + 3 = ?", ["4", "5", "6", "7"], 1), ("Sông dài nhất?", ["Hồng", "Mê Kông", "Đà"], 1)]
    assert found.rows_read == 2 and found.rejections == []


def test_bad_questions_are_counted_with_file_line_and_reason(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [
        ROW,
        {**ROW, "id": "q2", "answer": ""},
        {**ROW, "id": "q3", "answer": "E"},
        {**ROW, "id": "q4", "choices": ["A. Hà Nội"]},
        {**ROW, "question": "Một câu khác?"},
        "{not json",
    ])
    found = mc.read_questions([str(path)])
    assert found.rows_read == 6 and [q.id for q in found.questions] == ["q1"]
    assert [(r.source.rsplit("/", 1)[-1], r.reason) for r in found.rejections] == [
        ("bad.jsonl:2", "missing answer"), ("bad.jsonl:3", "answer not among the choices"),
        ("bad.jsonl:4", "too few choices"), ("bad.jsonl:5", "duplicate id"), ("bad.jsonl:6", "invalid JSON")]
    assert found.rejections[1].detail == "answer 'E', but the choices are A, B, C, D"
    assert found.rejections[3].detail.startswith("id 'q1' is also at ") and found.rejections[3].detail.endswith("bad.jsonl:1; give each question its own id")


def test_the_bundled_questions_are_200_in_4_categories():
    found = mc.read_questions([str(VMLU)])
    assert (found.rows_read, len(found.questions), found.rejections) == (200, 200, [])
    assert {q.category for q in found.questions} == {"STEM", "Social Science", "Humanities", "Other"}


# ---------------------------------------------------------------- prompts


def test_the_vmlu_prompt_ends_with_dap_an_dung_la():
    q = mc.parse_question(ROW, "f:1")
    assert mc.vmlu_prompt(q, []) == (
        "Chỉ đưa ra chữ cái đứng trước câu trả lời đúng (A, B, C hoặc D) của câu hỏi trắc nghiệm sau: \n"
        "Thủ đô của Việt Nam là thành phố nào?\nA. Hà Nội\nB. Huế\nC. Đà Nẵng\nD. Cần Thơ\nĐáp án đúng là: ")


def test_few_shot_prompts_take_other_questions_of_the_same_subject():
    qs = [mc.parse_question({**ROW, "id": f"q{i}", "question": f"Câu {i}?"}, f"f:{i}") for i in range(3)]
    other = mc.parse_question({**ROW, "id": "x", "subject": "history"}, "f:9")
    shots = mc.pick_shots(qs + [other], 1)
    assert [s.id for s in shots["q0"]] == ["q1"] and [s.id for s in shots["q1"]] == ["q0"] and shots["x"] == []
    assert mc.likelihood_context(qs[0], shots["q0"]) == "Câu hỏi: Câu 1?\nĐáp án: Hà Nội\n\nCâu hỏi: Câu 0?\nĐáp án:"
    assert mc.vmlu_prompt(qs[0], shots["q0"]).count("Đáp án đúng là: A\n\nCâu 0?") == 1


@pytest.mark.parametrize("text, letter", [
    ("B", "B"), (" C. Đà Nẵng", "C"), ("Đáp án đúng là: D", "D"), ("(A)", "A"), ("Không biết", None), ("E", None),
])
def test_the_first_standalone_letter_is_the_answer(text, letter):
    assert mc.first_letter(text, "ABCD") == letter


# ---------------------------------------------------------------- log-likelihoods


def direct_logprob(model, context: list[int], continuation: list[int]) -> float:
    with torch.no_grad():
        logits = model(torch.tensor([context + continuation])).logits[0].float()
    logprobs = torch.log_softmax(logits, -1)
    return sum(float(logprobs[len(context) - 1 + t, tok]) for t, tok in enumerate(continuation))


def test_shared_prefix_log_likelihoods_equal_a_direct_forward_pass(scorer):
    questions = mc.read_questions([str(VMLU)]).questions[:5]  # different lengths and 4 or 5 choices
    items = []
    for q in questions:
        pairs = [mc.continuation_ids(scorer.tokenizer, mc.likelihood_context(q, []), " " + c) for c in q.choices]
        items.append((pairs[0][0], [cont for _, cont in pairs]))
    batched = mc.shared_prefix_logprobs(scorer.model, items, scorer.pad_id)
    for (context, conts), sums in zip(items, batched):
        for cont, value in zip(conts, sums):
            assert value == pytest.approx(direct_logprob(scorer.model, context, cont), abs=1e-4)


def test_choice_trees_run_each_shared_prefix_once_and_equal_a_direct_forward_pass(scorer):
    # choices that begin alike share their first nodes; a choice's last token is never run
    tokens, parents, index = mc.choice_tree([[7, 8, 9], [7, 10, 11], [7], [12, 13]])
    assert (tokens, parents) == ([7, 8, 10, 12], [-1, 0, 0, -1])
    assert index == {(7,): 0, (7, 8): 1, (7, 10): 2, (12,): 3}
    questions = mc.read_questions([str(VMLU)]).questions[:6]
    items = []
    for q in questions:
        pairs = [mc.continuation_ids(scorer.tokenizer, mc.likelihood_context(q, []), " " + c) for c in q.choices]
        items.append((pairs[0][0], [cont for _, cont in pairs]))
    context = items[0][0]
    items.append((context, [[5, 6, 7], [5, 6, 8], [5, 9], [5]]))  # shared prefixes for sure
    for (context, conts), sums in zip(items, mc.tree_logprobs(scorer.model, items, scorer.pad_id)):
        for cont, value in zip(conts, sums):
            assert value == pytest.approx(direct_logprob(scorer.model, context, cont), abs=1e-4)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_choice_trees_take_each_architectures_4d_mask(tiny_models, arch):
    from transformers import AutoModelForCausalLM

    from vitune.models.attention import supports_packing

    model = AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32).eval()
    assert supports_packing(model)  # so tasks.multiple_choice scores it with choice trees
    items = [([1, 2, 3, 4, 5], [[6, 7, 8], [6, 7, 9], [6, 10], [11]]), ([3, 4], [[6, 7], [12, 13, 14]])]
    for (context, conts), sums in zip(items, mc.tree_logprobs(model, items, 0)):
        for cont, value in zip(conts, sums):
            assert value == pytest.approx(direct_logprob(model, context, cont), abs=1e-5)


def test_acc_and_acc_norm_pick_the_best_sum_and_the_best_sum_per_character(scorer):
    questions = mc.read_questions([str(VMLU)]).questions[:12]
    figures, rejected = tasks.multiple_choice(scorer, questions, protocol=False)
    expected_acc, expected_norm = [], []
    for q in questions:
        context = mc.likelihood_context(q, [])
        sums = [direct_logprob(scorer.model, *mc.continuation_ids(scorer.tokenizer, context, " " + c)) for c in q.choices]
        expected_acc.append(max(range(len(sums)), key=sums.__getitem__) == q.answer)
        expected_norm.append(max(range(len(sums)), key=lambda j: sums[j] / len(q.choices[j])) == q.answer)
    assert rejected == [] and figures["scored"] == 12
    assert figures["acc"]["average"] == sum(expected_acc) / 12
    assert figures["acc_norm"]["average"] == sum(expected_norm) / 12
    stem = [hit for q, hit in zip(questions, expected_acc) if q.category == "STEM"]
    assert figures["acc"]["by_category"]["STEM"] == sum(stem) / len(stem)


def test_the_vmlu_protocol_scores_the_generated_letter(scorer, monkeypatch):
    questions = mc.read_questions([str(VMLU)]).questions[:4]
    answers = iter(["Đáp án đúng là: " + q.letters[q.answer] for q in questions[:3]] + ["không rõ"])
    monkeypatch.setattr(tasks.Scorer, "generate", lambda self, prompts, n: [next(answers) for _ in prompts])
    figures, _ = tasks.multiple_choice(scorer, questions)
    assert figures["vmlu_acc"]["average"] == 0.75 and figures["unanswered"] == 1


def test_a_question_longer_than_the_context_is_rejected_by_line(scorer):
    short = tasks.Scorer(scorer.model, scorer.tokenizer, scorer.template, scorer.stop_ids, context=30, batch_size=4)
    questions = mc.read_questions([str(VMLU)]).questions[:3]
    figures, rejected = tasks.multiple_choice(short, questions, protocol=False)
    assert figures["scored"] + len(rejected) == 3 and rejected
    assert rejected[0].reason == "too long" and "more than the model's context (30)" in rejected[0].detail
    assert rejected[0].source.endswith("vmlu_vi.jsonl:1")


# ---------------------------------------------------------------- loss, perplexity, bits per character


def test_conversation_loss_equals_the_training_loss_of_each_row(scorer):
    from vitune.data.formats import parse_alpaca
    from vitune.data.tokenize import tokenize_conversations

    rows = [json.loads(line) for line in open(QA, encoding="utf-8")][:6]
    convs = [parse_alpaca(r, {}) for r in rows]
    figures, rejected = tasks.conversations(scorer, convs)
    nll, count = 0.0, 0
    for row in tokenize_conversations(convs, scorer.tokenizer, scorer.template):
        with torch.no_grad():
            out = scorer.model(torch.tensor([row.input_ids]), labels=torch.tensor([row.labels]))
        n = sum(label != -100 for label in row.labels[1:])
        nll, count = nll + float(out.loss) * n, count + n
    assert rejected == [] and figures["tokens"] == count
    assert figures["loss"] == pytest.approx(nll / count, abs=1e-5)
    assert figures["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_bits_per_character_is_the_text_nll_in_bits_over_its_characters(scorer):
    docs = [(f"doc:{i}", json.loads(line)["text"]) for i, line in enumerate(open(CORPUS_EVAL, encoding="utf-8"))][:3]
    figures, _ = tasks.plain_text(scorer, docs, window=64)
    nll, tokens = 0.0, 0
    for _, text in docs:
        ids = scorer.tokenizer(text)["input_ids"]
        for start in range(0, len(ids), 64):
            piece = ids[start: start + 64]
            if len(piece) > 1:
                with torch.no_grad():
                    nll += float(scorer.model(torch.tensor([piece]), labels=torch.tensor([piece])).loss) * (len(piece) - 1)
                tokens += len(piece) - 1
    characters = sum(len(t) for _, t in docs)
    assert (figures["tokens"], figures["characters"]) == (tokens, characters)
    assert figures["bits_per_char"] == pytest.approx(nll / math.log(2) / characters, rel=1e-5)


# ---------------------------------------------------------------- the command


def test_eval_of_a_lora_run_scores_it_beside_its_base_and_writes_eval_json(lora_run, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", str(lora_run), "--data", str(VMLU), str(QA), str(PAIRS), "--limit", "6", "--generate",
                 "--max-new-tokens", "4", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["model"]["target"] == str(lora_run) and result["model"]["adapter_sha256"]
    assert [(f["task"], f["rows_read"], f["rows_scored"], f["rows_rejected"]) for f in result["files"]] == [
        ("multiple_choice", 200, 6, 0), ("conversations", 60, 6, 0), ("preference", 48, 6, 0)]
    mc_file, qa_file, pairs = result["files"]
    assert set(mc_file["model"]) >= {"acc", "acc_norm", "vmlu_acc"} and "acc" in mc_file["base"]
    assert {"loss", "perplexity", "exact_match", "chrf", "rouge_l"} <= set(qa_file["model"]) and "loss" in qa_file["base"]
    assert qa_file["model"]["loss"] != qa_file["base"]["loss"]  # the adapter is on for one and off for the other
    assert 0 <= pairs["model"]["implicit_reward_accuracy"] <= 1 and "base" not in pairs
    assert mc_file["sha256"] == __import__("hashlib").sha256(VMLU.read_bytes()).hexdigest()
    shown = capsys.readouterr().out
    assert "model − base" in shown and "vmlu_acc" in shown
    assert (lora_run / "loss.png").read_bytes()[:4] == b"\x89PNG"  # the run's loss curves


def test_compare_puts_two_results_side_by_side(tmp_path, capsys):
    def saved(name, acc):
        result = {"model": {"target": name}, "files": [{"path": "vmlu.jsonl", "task": "multiple_choice",
                                                         "model": {"acc": {"average": acc}}}]}
        (tmp_path / name).mkdir()
        (tmp_path / name / "eval.json").write_text(json.dumps(result))
        return str(tmp_path / name)

    assert main(["eval", "--compare", saved("a", 0.25), "--compare", saved("b", 0.5)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "vmlu.jsonl" in line)
    assert row.split("│")[3:6] == [" 0.2500 ", " 0.5000 ", " +0.2500 "]


def test_nothing_to_score_is_one_line_exit_2(tiny_llama, tmp_path, capsys):
    path = write_jsonl(tmp_path / "bad.jsonl", [{**ROW, "answer": "Z"}])
    assert main(["eval", str(tiny_llama), "--data", str(path)]) == 2
    err = error_of(capsys)
    assert "nothing to score" in err and "1 read, 1 rejected" in err and "bad.jsonl:1: answer 'Z'" in err


def test_rows_of_another_kind_than_task_are_rejected_as_wrong_format(tiny_llama, capsys):
    assert main(["eval", str(tiny_llama), "--data", str(QA), "--task", "multiple_choice"]) == 2
    assert "60 read, 60 rejected" in error_of(capsys)


def test_preference_pairs_need_a_reference(tiny_llama, capsys):
    assert main(["eval", str(tiny_llama), "--data", str(PAIRS), "--limit", "2"]) == 2
    assert "preference pairs are scored by a reward model" in error_of(capsys)


def test_bad_options_are_one_line(tiny_llama, capsys):
    assert main(["eval", str(tiny_llama)]) == 2
    assert "give the data to evaluate on: --data FILE" in error_of(capsys)
    assert main(["eval", "--compare", "only-one"]) == 2
    assert "--compare takes two eval.json files or run folders (A B), got 1" in error_of(capsys)
    assert main(["eval", str(tiny_llama), "--data", str(QA), "--task", "nope"]) == 2
    assert "--task 'nope': choose one of auto, multiple_choice" in error_of(capsys)


def test_base_model_compares_with_another_model(tiny_llama, tiny_models, tmp_path):
    out = tmp_path / "eval.json"
    assert main(["eval", str(tiny_llama), "--data", str(QA), "--limit", "3", "--base", str(tiny_models["qwen2"]),
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    entry = result["files"][0]
    assert result["base"] == str(tiny_models["qwen2"]) and entry["rows_scored"] == 3
    assert entry["model"]["loss"] != entry["base"]["loss"] and entry["base"]["scored"] == 3


def test_compare_refuses_a_file_that_is_not_an_eval_json(tmp_path, capsys):
    (tmp_path / "a.json").write_text('{"files": [1, 2], "model": {"target": "x"}}')
    (tmp_path / "b.json").write_text("[]")
    assert main(["eval", "--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 2
    assert f"{tmp_path / 'a.json'} is not an eval.json written by vitune eval" in error_of(capsys)
