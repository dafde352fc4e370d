"""Stages dpo and rm end to end on tiny models of real architectures: preference rows rendered as
SFT renders an answer (real tokenizers and templates), bad rows in one line, metrics in the
right direction, the reference model of a run started from an SFT adapter, reward models that
plain transformers + PEFT reload with their head, `vitune score`, and resume after kill -9."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import pytest
import torch

from vitune.cli import main
from vitune.config import DataConfig, DatasetSpec, validate_config
from vitune.data.pipeline import prepare_sft_data
from vitune.data.preference import prepare_preference_data
from vitune.data.templates import resolve_template
from vitune.data.tokenize import IGNORE
from vitune.errors import ConfigError, DataError
from vitune.train.checkpoint import MARKER, complete_checkpoints
from vitune.train.runner import run_training

from conftest import ROOT, write_config, write_jsonl
from test_resume import same_weights, start, wait_for

PAIRS = ROOT / "data" / "preference_vi.jsonl"
EVAL_PAIRS = ROOT / "data" / "preference_vi_eval.jsonl"


def config(model: Path, out: Path, stage: str, method: str = "lora", train_rows: int = 32, dpo: dict | None = None,
           **train):
    raw = {
        "model": {"name_or_path": str(model)},
        "method": {"type": method},
        "data": {"train": [{"path": str(PAIRS), "max_samples": train_rows}],
                 "eval": [{"path": str(EVAL_PAIRS), "max_samples": 16}], "max_length": 512},
        "train": {"stage": stage, "max_steps": 6, "micro_batch_size": 4, "learning_rate": 5e-3, "output_dir": str(out),
                  "logging_steps": 1, "eval_steps": 6, "report_to": ["none"], **train},
    }
    if dpo is not None:
        raw["dpo"] = dpo
    return validate_config(raw)


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- data


@pytest.mark.parametrize("which", ["smollm2", "llama3.1", "qwen2.5"])
def test_an_answer_is_rendered_exactly_as_sft_renders_it(which, request, real_tokenizer, real_chat_template, tmp_path):
    """chosen = the SFT row of (prompt + chosen): one end-of-turn marker trained, no doubled EOS,
    no stray BOS before the answer -- with the real tokenizers and their own templates."""
    from real_assets import with_chat_template

    if which == "smollm2":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(request.getfixturevalue("smollm2"))
    else:
        vocab = {"llama3.1": "llama-bpe", "qwen2.5": "qwen2"}[which]
        tokenizer = with_chat_template(real_tokenizer(vocab), real_chat_template(which))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    template = resolve_template("auto", tokenizer)
    row = {"conversations": [{"from": "system", "value": "Bạn là trợ lý."}, {"from": "human", "value": "Thủ đô?"},
                             {"from": "gpt", "value": "Hà Nội."}, {"from": "human", "value": "Còn Pháp?"}],
           "chosen": {"from": "gpt", "value": "Paris."}, "rejected": {"from": "gpt", "value": "Berlin."}}
    prefs = write_jsonl(tmp_path / "p.jsonl", [row])
    sft = write_jsonl(tmp_path / "s.jsonl", [{"conversations": row["conversations"] + [row["chosen"]]}])
    data = DataConfig(train=[DatasetSpec(path=str(prefs))], mask_history=True, cache=False)
    pairs, _, report = prepare_preference_data(data, tokenizer, template, 0, "dpo")
    rows, _, _ = prepare_sft_data(DataConfig(train=[DatasetSpec(path=str(sft))], mask_history=True, cache=False),
                                  tokenizer, template, 0)
    assert (pairs[0].chosen.input_ids, pairs[0].chosen.labels) == (rows[0].input_ids, rows[0].labels)
    for seq, answer in ((pairs[0].chosen, "Paris."), (pairs[0].rejected, "Berlin.")):
        trained = [t for t in seq.labels if t != IGNORE]
        assert tokenizer.decode(trained).strip().startswith(answer)
        ends = {tokenizer.eos_token_id, *tokenizer.convert_tokens_to_ids(template.stop_strings)} - {None}
        assert sum(t in ends for t in trained) == 1  # one end-of-turn marker, not a doubled EOS
    # no stray BOS or EOS anywhere: the ids are the model's own template rendering, tokenised as is
    messages = [{"role": "system", "content": "Bạn là trợ lý."}, {"role": "user", "content": "Thủ đô?"},
                {"role": "assistant", "content": "Hà Nội."}, {"role": "user", "content": "Còn Pháp?"}]
    for seq, answer in ((pairs[0].chosen, "Paris."), (pairs[0].rejected, "Berlin.")):
        text = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=False)
        assert seq.input_ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert report.rows_read == report.rows_kept == 1 and report.total_tokens == len(pairs[0].chosen.input_ids) + len(
        pairs[0].rejected.input_ids)


def test_bad_preference_rows_are_one_line_each_and_skip_adds_up(tiny_llama, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    template = resolve_template("auto", tokenizer)
    good = {"instruction": "Thủ đô của Việt Nam?", "chosen": "Hà Nội.", "rejected": "Ha Noi"}
    rows = [good,
            {"instruction": "Một cộng một?", "chosen": "Hai.", "rejected": "Hai."},
            {"instruction": "Một cộng hai?", "chosen": "   ", "rejected": "Ba."},
            {"instruction": "chữ " * 600, "chosen": "Dài.", "rejected": "Ngắn."},
            {"instruction": "Biên độ?", "chosen": "Có.", "rejected": "Không.", "margin": "lớn"}]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    data = DataConfig(train=[DatasetSpec(path=str(path))], max_length=256, cache=False)
    with pytest.raises(DataError) as err:
        prepare_preference_data(data, tokenizer, template, 0, "dpo")
    message = str(err.value)
    assert "\n" not in message and message.startswith("4 bad row(s): ")
    assert f"{path}:2: chosen and rejected are the same text" in message
    assert f"{path}:3: preference row: field 'chosen' is empty" in message
    assert f"{path}:4: the prompt alone is" in message and "data.max_length is 256" in message
    assert f"{path}:5: preference row: field 'margin' must be a finite number, got 'lớn'" in message
    pairs, _, report = prepare_preference_data(data.model_copy(update={"on_error": "skip"}), tokenizer, template, 0, "dpo")
    assert len(pairs) == report.rows_kept == 1 and report.rows_read == 5
    assert report.rows_read == report.rows_kept + report.rows_rejected
    assert report.rejected_by_reason == {"identical answers": 1, "empty content": 1, "prompt too long": 1, "wrong type": 1}


def test_conversations_to_dpo_and_pairs_to_sft_are_refused(tiny_llama, tmp_path):
    sft_rows = ROOT / "data" / "alpaca_vi.jsonl"
    cfg = config(tiny_llama, tmp_path / "x", "dpo")
    cfg.data.train[0].path = str(sft_rows)
    with pytest.raises(DataError, match=r"alpaca_vi.jsonl:1: alpaca \(instruction/conversation\) rows cannot train "
                                        r"stage dpo, which learns from preference rows"):
        run_training(cfg)
    cfg = config(tiny_llama, tmp_path / "y", "sft")
    with pytest.raises(DataError, match=r"preference_vi.jsonl:1: preference \(chosen/rejected\) rows cannot train stage sft"):
        run_training(cfg)
    unpaired = write_jsonl(tmp_path / "u.jsonl", [{"prompt": "Chào?", "completion": "Chào bạn.", "label": True}])
    cfg = config(tiny_llama, tmp_path / "z", "dpo")
    cfg.data.train[0].path = str(unpaired)
    with pytest.raises(DataError, match=r"u.jsonl:1: an unpaired row \(prompt, completion, label\) has no answer to "
                                        r"compare with; stage dpo needs chosen and rejected \(only dpo.loss: kto"):
        run_training(cfg)


@pytest.mark.parametrize("raw,message", [
    ({"train": {"stage": "sft"}, "dpo": {"beta": 0.2}}, "the dpo section is only used with train.stage: dpo"),
    ({"train": {"stage": "rl"}}, "train.stage: rl needs an rl section with at least one reward"),
    ({"train": {"stage": "dpo"}, "method": {"type": "full"}, "model": {"adapter": "runs/sft"}},
     "model.adapter continues a LoRA adapter; use method.type: lora or qlora with it"),
    ({"train": {"stage": "dpo"}, "dpo": {"loss": "dpo"}}, "dpo.loss = 'dpo' is not allowed; expected 'sigmoid', 'ipo', "
                                                          "'hinge', 'orpo', 'simpo' or 'kto'"),
])
def test_stage_config_mistakes_are_one_line(raw, message):
    base = {"model": {"name_or_path": "m"}, "data": {"train": [{"path": "d.jsonl"}]}}
    for key, value in raw.items():
        base[key] = {**base.get(key, {}), **value}
    with pytest.raises(ConfigError) as err:
        validate_config(base)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_kto_needs_two_answers_per_micro_batch(tiny_llama, tmp_path):
    with pytest.raises(ConfigError, match="dpo.loss: kto estimates its KL term from the other answers of a micro-batch; "
                                          "set train.micro_batch_size to 2 or more"):
        run_training(config(tiny_llama, tmp_path / "k", "dpo", dpo={"loss": "kto"}, micro_batch_size=1))


# ---------------------------------------------------------------- dpo


# the oracle tests check every loss's value and gradients; CI trains two of them end to end, make test-all all six
SLOW = pytest.mark.slow


@pytest.mark.parametrize("loss", ["sigmoid", pytest.param("ipo", marks=SLOW), pytest.param("hinge", marks=SLOW),
                                  pytest.param("orpo", marks=SLOW), pytest.param("simpo", marks=SLOW), "kto"])
def test_every_dpo_loss_trains_and_raises_held_out_preference(tiny_llama, tmp_path, loss):
    out = tmp_path / loss
    beta = {"simpo": 2.0, "orpo": 0.5}.get(loss, 0.1)
    result = run_training(config(tiny_llama, out, "dpo", dpo={"loss": loss, "beta": beta}))
    s = result.summary
    assert s["stage"] == "dpo" and s["steps"] == 6 and (out / "adapter_model.safetensors").is_file()
    assert not (out / "reference").exists()  # the reference adapter is never saved
    logged = records(out)
    assert {"rewards/chosen", "rewards/rejected"} <= set(next(r for r in logged if "loss" in r))
    assert s["eval_loss_end"] < s["eval_loss_start"]
    assert s["eval_rewards_chosen_end"] - s["eval_rewards_rejected_end"] > s["eval_rewards_chosen_start"] - s[
        "eval_rewards_rejected_start"]
    if loss in ("sigmoid", "ipo", "hinge", "kto"):  # with a reference: at the start policy = reference
        assert s["eval_rewards_chosen_start"] == s["eval_rewards_rejected_start"] == 0.0
    if loss != "kto":
        assert s["eval_rewards_accuracy_end"] > s["eval_rewards_accuracy_start"]
    if loss == "sigmoid":
        assert s["first_loss"] == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.slow  # CI's 20-minute budget (fresh-clone durations, 2026-12-08); make test-all runs it
def test_precomputed_reference_gives_the_same_run(tiny_llama, tmp_path):
    a = run_training(config(tiny_llama, tmp_path / "live", "dpo", dpo={"loss": "sigmoid"})).summary
    b = run_training(config(tiny_llama, tmp_path / "pre", "dpo", dpo={"loss": "sigmoid", "precompute_reference": True})).summary
    assert b["eval_loss_end"] == pytest.approx(a["eval_loss_end"], abs=1e-5)
    assert b["final_loss"] == pytest.approx(a["final_loss"], abs=1e-5)


@pytest.mark.slow
def test_full_dpo_keeps_a_frozen_reference_and_trains(tiny_llama, tmp_path):
    s = run_training(config(tiny_llama, tmp_path / "full", "dpo", method="full", learning_rate=1e-3)).summary
    assert s["first_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert s["eval_rewards_accuracy_end"] > 0.5 and (tmp_path / "full" / "model.safetensors").is_file()


def test_dpo_from_an_sft_adapter_uses_that_sft_model_as_reference(tiny_llama, tmp_path):
    """LLaMA-Factory #8974: continuing from an SFT LoRA made the bare base the reference. Here the
    reference is the SFT model: at the first step policy = reference, so the loss is exactly log 2
    and every implicit reward 0 -- with the base as reference they would not be."""
    sft = tmp_path / "sft"
    sft_cfg = validate_config({
        "model": {"name_or_path": str(tiny_llama)},
        "data": {"train": [{"path": str(ROOT / "data" / "alpaca_vi.jsonl"), "max_samples": 32}], "max_length": 256},
        "train": {"max_steps": 4, "micro_batch_size": 4, "learning_rate": 1e-2, "output_dir": str(sft),
                  "report_to": ["none"]},
    })
    run_training(sft_cfg)
    cfg = config(tiny_llama, tmp_path / "dpo", "dpo", dpo={"loss": "sigmoid"})
    cfg.model.adapter = str(sft)
    s = run_training(cfg).summary
    assert s["first_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert s["eval_rewards_chosen_start"] == s["eval_rewards_rejected_start"] == 0.0
    assert s["eval_rewards_accuracy_start"] == 0.5  # ties count half
    saved = json.loads((tmp_path / "dpo" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(tiny_llama)  # the SFT adapter trained further, on the base



def test_model_adapter_trained_on_another_base_is_refused(tiny_models, tmp_path):
    sft = tmp_path / "sft"
    run_training(validate_config({
        "model": {"name_or_path": str(tiny_models["qwen2"])},
        "data": {"train": [{"path": str(ROOT / "data" / "alpaca_vi.jsonl"), "max_samples": 8}], "max_length": 256},
        "train": {"max_steps": 1, "micro_batch_size": 4, "output_dir": str(sft), "report_to": ["none"]},
    }))
    cfg = config(tiny_models["llama"], tmp_path / "dpo", "dpo")
    cfg.model.adapter = str(sft)
    with pytest.raises(Exception) as err:
        run_training(cfg)
    assert str(err.value) == (f"model.adapter = {sft} was trained on {tiny_models['qwen2']}, not on "
                              f"model.name_or_path = {tiny_models['llama']}; set model.name_or_path: {tiny_models['qwen2']}")


# ---------------------------------------------------------------- rm


def test_reward_model_learns_and_reloads_with_plain_transformers_and_peft(tiny_llama, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from vitune.data.records import Conversation, Message
    from vitune.models.reward_model import RewardScorer

    out = tmp_path / "rm"
    s = run_training(config(tiny_llama, out, "rm", max_steps=8)).summary
    assert s["stage"] == "rm" and s["eval_rewards_accuracy_end"] > s["eval_rewards_accuracy_start"]
    assert s["eval_loss_end"] < s["eval_loss_start"]
    scorer = RewardScorer.load(str(out))
    convs = [Conversation([Message("user", "Thủ đô của Việt Nam là gì?"), Message("assistant", a)]) for a in
             ("Thủ đô của Việt Nam là Hà Nội.", "Ha Noi la thu do.")]
    ours = scorer.score(convs)

    # plain transformers + PEFT, the head restored from the adapter folder
    tokenizer = AutoTokenizer.from_pretrained(out)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=1)
    model = PeftModel.from_pretrained(base, str(out)).eval()
    model.config.pad_token_id = None  # one unpadded row: the pooling reads its last token
    from vitune.data.tokenize import tokenize_conversations

    for conv, reward in zip(convs, ours):
        row = tokenize_conversations([conv], tokenizer, scorer.template, mask_history=True)[0]
        last = max(i for i, v in enumerate(row.labels) if v != IGNORE)
        with torch.no_grad():
            plain = model(input_ids=torch.tensor([row.input_ids[: last + 1]])).logits[0, 0].item()
        assert plain == pytest.approx(reward, abs=1e-5)

    assert main(["score", str(out), "--data", str(EVAL_PAIRS), "--out", str(tmp_path / "scores.jsonl")]) == 0
    printed = capsys.readouterr().out
    scored = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert len(scored) == 48 and scored[0]["source"] == f"{EVAL_PAIRS}:1"
    right = sum(r["chosen"] > r["rejected"] for r in scored)
    assert f"48 pairs: chosen ranked above rejected in {right} ({right / 48:.1%})" in printed


def test_score_refuses_a_folder_that_is_not_a_reward_model(tiny_llama, tmp_path, capsys):
    out = tmp_path / "dpo"
    run_training(config(tiny_llama, out, "dpo", max_steps=1))
    assert main(["score", str(out), "--data", str(EVAL_PAIRS)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {out} is not a reward model: it is a stage dpo run; give the "
                                               "folder of a finished train.stage: rm run")


def test_rm_margin_enters_the_loss(tiny_llama, tmp_path):
    """Llama 2's margin loss: -log sigmoid(r_c - r_r - m); a margin of 0 is the plain loss."""
    import torch.nn.functional as F

    from vitune.train.pairs import PreferenceCollator
    from vitune.train.stages.rm import RewardTrainer
    from transformers import AutoModelForSequenceClassification, TrainingArguments

    model = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=1)
    trainer = RewardTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none"))
    seq = ([5, 6, 7, 8], [IGNORE, IGNORE, 7, 8])
    other = ([5, 6, 9, 10, 11], [IGNORE, IGNORE, 9, 10, 11])
    items = [{"sequences": [seq, other], "margin": m, "desirable": [True, False]} for m in (0.0, 1.5)]
    batch = PreferenceCollator(False, 0)(items)
    from vitune.models.reward_model import sequence_rewards

    with torch.no_grad():
        r = sequence_rewards(model, batch)
        loss = trainer.compute_loss(model, batch)
    expected = (-F.logsigmoid(r[0] - r[1]) - F.logsigmoid(r[2] - r[3] - 1.5)) / 2
    assert float(loss) == pytest.approx(float(expected), abs=1e-6)


# ---------------------------------------------------------------- resume


@pytest.mark.slow  # 23 s per stage; CI keeps test_resume's kill -9 of an SFT run (the same checkpoint code)
@pytest.mark.parametrize("stage", ["dpo", "rm"])
def test_kill_9_then_resume_is_bit_identical(stage, tiny_llama, tmp_path):
    def cfg_file(out):
        return write_config(tmp_path / f"{out.name}.yaml", model={"name_or_path": str(tiny_llama)}, method={"type": "full"},
                            data={"train": [{"path": str(PAIRS), "max_samples": 48}], "max_length": 512},
                            train={"stage": stage, "max_steps": 8, "micro_batch_size": 2, "learning_rate": 1e-3,
                                   "output_dir": str(out), "logging_steps": 1, "save_steps": 4, "report_to": ["none"]})
    reference = tmp_path / "whole"
    assert main(["train", str(cfg_file(reference))]) == 0
    out = tmp_path / "killed"
    config_path = cfg_file(out)
    proc = start(config_path)
    wait_for(out / "checkpoint-4" / MARKER, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "summary.json").exists() and complete_checkpoints(out)
    assert main(["train", str(config_path), "--set", "train.resume=auto"]) == 0
    assert same_weights(out, reference)


def test_bundled_preference_pairs_load_whole_and_the_eval_split_is_apart():
    import unicodedata

    from vitune.data.formats import OTHER_PARSERS, detect_format
    from vitune.data.sources import read_rows

    prompts = {}
    for path, count in ((PAIRS, 270), (EVAL_PAIRS, 48)):
        rows = [raw.row for raw in read_rows(str(path))]
        assert len(rows) == count
        records = [OTHER_PARSERS[detect_format(r, {})](r, {}) for r in rows]
        assert all(r.chosen.content != r.rejected.content for r in records)
        prompts[path] = {r.prompt_messages[-1].text for r in records}
        assert len(prompts[path]) == count  # no prompt twice
        assert all(unicodedata.is_normalized("NFC", line) for line in path.read_text(encoding="utf-8").splitlines())
        kinds = {r["failure"] for r in rows}
        assert kinds == {"wrong_fact", "english", "no_diacritics", "rude", "off_topic", "rambling"}
    assert not prompts[PAIRS] & prompts[EVAL_PAIRS]  # the held-out pairs are never trained on


def test_data_inspect_shows_chosen_and_rejected_as_the_model_sees_them(tiny_llama, tmp_path, capsys):
    config_path = write_config(tmp_path / "dpo.yaml", model={"name_or_path": str(tiny_llama)},
                               data={"train": [{"path": str(PAIRS), "max_samples": 4}], "max_length": 512},
                               train={"stage": "dpo"})
    assert main(["data", "inspect", str(config_path), "-n", "1"]) == 0
    out = capsys.readouterr().out
    assert "row 1 of 4, chosen:" in out and "row 1 of 4, rejected:" in out
    assert "rows read / kept / rejected" in out and "4 / 4 / 0" in out
    assert main(["data", "inspect", str(config_path), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["train_rows"] == 4 and stats["length_percentiles"]["max"] <= 512


def test_unpaired_rows_given_to_sft_are_one_line(tiny_llama, tmp_path):
    rows = write_jsonl(tmp_path / "u.jsonl", [{"prompt": "Chào?", "completion": "Chào bạn.", "label": True}])
    cfg = config(tiny_llama, tmp_path / "s", "sft")
    cfg.data.train[0].path = str(rows)
    cfg.data.eval = None
    with pytest.raises(DataError, match=r"u.jsonl:1: unpaired preference \(prompt/completion/label\) rows cannot train "
                                        r"stage sft"):
        run_training(cfg)
