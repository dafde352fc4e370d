"""Stage rl: GRPO and RLOO through TRL on the shared runner -- prompts rendered as chat renders
them, generation stopping at the end of turn, rewards (functions and reward models) and their
one-line errors, the batch rule, learning that raises the reward, and resume after kill -9."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vitune.cli import main
from vitune.config import validate_config
from vitune.train.checkpoint import MARKER, complete_checkpoints

from conftest import ROOT, write_config, write_jsonl

ALPACA = ROOT / "data" / "alpaca_vi.jsonl"
REWARDS = '''
import math

def short(prompt, completion):
    """Higher for shorter answers: a tiny model learns to end its turn early."""
    return -len(completion) / 10

def constant(prompt, completion):
    return 1.0

def letter_n(prompt, completion):
    """Ten times the share of the answer's characters that are "n": every sampled token moves it."""
    return 10 * completion.count("n") / max(len(completion), 1)

def broken(prompt, completion):
    raise KeyError("score")

def not_a_number(prompt, completion):
    return "good"

def nan(prompt, completion):
    return math.nan

def one_argument(completion):
    return 0.0

THRESHOLD = 0.5
'''


@pytest.fixture
def rewards_module(tmp_path, monkeypatch):
    """A module of reward functions in the working directory, imported as `my_rewards:NAME`."""
    (tmp_path / "my_rewards.py").write_text(REWARDS, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    sys.modules.pop("my_rewards", None)
    yield "my_rewards"
    sys.modules.pop("my_rewards", None)


def rl_config(tmp_path: Path, model: Path, out: Path, rewards=None, data=None, **train) -> Path:
    settings = {"max_steps": 2, "micro_batch_size": 4, "learning_rate": 1e-3, "output_dir": str(out),
                "logging_steps": 1, "report_to": ["none"], "stage": "rl", **train}
    rl = {"rewards": rewards or [{"function": "my_rewards:constant"}], "num_generations": 4,
          "max_completion_length": 12}
    rl.update(settings.pop("rl", {}))
    return write_config(
        tmp_path / f"{out.name}.yaml",
        model={"name_or_path": str(model)},
        method={"type": "lora"},
        data=data or {"train": [{"path": str(ALPACA), "max_samples": 16}], "max_length": 128},
        train=settings,
        rl=rl,
    )


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def error_of(capsys) -> str:
    return " ".join(capsys.readouterr().err.split())


# ---------------------------------------------------------------- runs


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_rl_run_with_lora_writes_a_complete_run_folder(algorithm, tiny_llama, tmp_path, rewards_module):
    out = tmp_path / algorithm
    config = rl_config(tmp_path, tiny_llama, out, rewards=[{"function": "my_rewards:short"}],
                       rl={"algorithm": algorithm, "beta": 0.1})
    assert main(["train", str(config)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stage"] == "rl" and summary["steps"] == 2
    assert (out / "adapter_model.safetensors").is_file()
    assert not (out / "ref").exists()  # only the trained adapter, not TRL's reference copy
    logged = records(out)
    assert [r["step"] for r in logged] == [1, 2]
    for key in ("loss", "reward", "reward_std", "kl", "completions/mean_length", "rewards/short/mean", "real_tokens"):
        assert all(key in r for r in logged), key
    assert all(r["reward"] <= 0 for r in logged)  # -(characters) / 10
    report = json.loads((out / "data_report.json").read_text())
    assert (report["rows_read"], report["rows_kept"], report["rows_rejected"]) == (16, 16, 0)


def test_mean_reward_goes_up_with_an_easy_reward(tiny_llama, tmp_path, rewards_module, capsys):
    # the share of "n" in the answer: a dense reward (every sampled token moves it) that a random
    # tiny model learns in a few steps, every weight trained at a high learning rate; its output is
    # near-uniform over 4,096 tokens (entropy 8.27 nats), so at 5e-3 twelve steps only moved the
    # reward 0.66 -> 0.92 (noise); at 2e-2 it rises within ten
    out = tmp_path / "learns"
    config = rl_config(tmp_path, tiny_llama, out, rewards=[{"function": "my_rewards:letter_n"}], max_steps=10,
                       micro_batch_size=8, learning_rate=2e-2, scheduler="constant",
                       data={"train": [{"path": str(ALPACA), "max_samples": 16}], "val_size": 4, "max_length": 128},
                       rl={"beta": 0.0, "num_generations": 8, "max_completion_length": 8})
    assert main(["train", str(config), "--set", "method.type=full"]) == 0
    rewards = [r["reward"] for r in records(out) if "reward" in r]  # the training steps (not eval_reward)
    assert len(rewards) == 10
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > 2 * first, rewards
    # the same 4 held-out prompts x 8 completions, judged before the first step and after the last
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_reward_end"] > 2 * summary["eval_reward_start"] > 0
    assert summary["eval_rewards_letter_n_mean_end"] == summary["eval_reward_end"]  # one reward, weight 1
    assert summary["eval_loss_start"] is None and summary["eval_loss_end"] is None  # GRPO's loss is ~0: not shown
    assert summary["eval_entropy_end"] < summary["eval_entropy_start"]
    shown = " ".join(capsys.readouterr().out.split())
    assert (f"held-out prompts: mean reward {summary['eval_reward_start']:.4f} (start) -> "
            f"{summary['eval_reward_end']:.4f} (end)") in shown
    assert "held-out loss" not in shown


# ---------------------------------------------------------------- prompts and generation


def test_prompts_are_what_chat_renders_with_one_bos(tiny_llama, tmp_path):
    from vitune.data.templates import resolve_template
    from vitune.models.loading import load_tokenizer
    from vitune.train.stages.rl import VituneGRPOTrainer, prepare_prompts, stop_token_ids

    rows = write_jsonl(tmp_path / "two.jsonl", [
        {"instruction": "Thủ đô của Việt Nam là gì?", "input": "", "output": "Hà Nội."},
        {"conversations": [{"from": "human", "value": "Chào bạn"}, {"from": "gpt", "value": "Chào!"},
                           {"from": "human", "value": "Kể một câu chuyện"}, {"from": "gpt", "value": "Ngày xưa..."}]},
    ])
    config = validate_config(yaml_sections(tiny_llama, rows), source="test")
    tokenizer = load_tokenizer(str(tiny_llama))
    template = resolve_template("auto", tokenizer)
    train, _, report = prepare_prompts(config, tokenizer, template)
    train.sort(key=lambda r: r.source)  # rows come shuffled by train.seed
    assert [r.prompt for r in train] == [
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nThủ đô của Việt Nam là gì?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nChào bạn<|eot_id|><|start_header_id|>assistant"
        "<|end_header_id|>\n\nChào!<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nKể một câu chuyện<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
    ]
    assert [r.question for r in train] == ["Thủ đô của Việt Nam là gì?", "Kể một câu chuyện"]
    assert [r.source for r in train] == [f"{rows}:1", f"{rows}:2"]
    assert report.rows_read == report.rows_kept == 2

    class Tokenizing:  # only what _tokenize_prompts reads
        processing_class = tokenizer

    ids, _, _ = VituneGRPOTrainer._tokenize_prompts(Tokenizing(), [train[0].prompt])
    bos = tokenizer.convert_tokens_to_ids("<|begin_of_text|>")
    assert ids[0][0] == bos and ids[0].count(bos) == 1
    assert stop_token_ids(tokenizer, template) == [tokenizer.convert_tokens_to_ids("<|eot_id|>")]


def yaml_sections(model: Path, data: Path, **data_settings) -> dict:
    return {"model": {"name_or_path": str(model)}, "method": {"type": "lora"},
            "data": {"train": [{"path": str(data)}], "max_length": 128, **data_settings},
            "train": {"stage": "rl", "micro_batch_size": 4},
            "rl": {"rewards": [{"function": "examples.rewards:vietnamese"}], "num_generations": 4}}


def test_prompts_over_max_length_are_rejected_and_counted(tiny_llama, tmp_path):
    from vitune.data.templates import resolve_template
    from vitune.models.loading import load_tokenizer
    from vitune.train.stages.rl import prepare_prompts

    rows = write_jsonl(tmp_path / "long.jsonl", [
        {"instruction": "Ngắn thôi.", "input": "", "output": "Vâng."},
        {"instruction": "Rất dài " * 200, "input": "", "output": "Vâng."},
    ])
    config = validate_config(yaml_sections(tiny_llama, rows), source="test")
    tokenizer = load_tokenizer(str(tiny_llama))
    train, _, report = prepare_prompts(config, tokenizer, resolve_template("auto", tokenizer))
    assert len(train) == 1
    assert (report.rows_read, report.rows_kept, report.rows_rejected) == (2, 1, 1)
    (rejected,) = report.rejections
    assert rejected.source == f"{rows}:2" and rejected.reason == "too long"
    assert rejected.detail.startswith("prompt of ") and rejected.detail.endswith(
        " tokens > data.max_length 128 (raise data.max_length)")


def test_generation_stops_at_the_end_of_turn_and_rewards_see_no_marker(tiny_llama, tmp_path, rewards_module):
    import torch
    from vitune.train.reward_functions import FunctionReward

    seen = []
    reward = FunctionReward("my_rewards:recorder", lambda p, c: seen.append((p, c)) or 0.0, ["<|eot_id|>"])
    assert reward(["x"], ["Hà Nội.<|eot_id|>"], question=["Thủ đô?"], source=["f:1"]) == [0.0]
    assert seen == [("Thủ đô?", "Hà Nội.")]

    # the trainer's generation config stops on the template's end of turn
    from vitune.config import load_config
    from vitune.train.arguments import plan_speed
    from vitune.train.runner import prepare_run
    from vitune.train.stages.rl import RlStage
    from rich.console import Console

    out = tmp_path / "gen"
    config = load_config(rl_config(tmp_path, tiny_llama, out))
    prepared = prepare_run(config, Console(quiet=True))
    stage = prepared.stage
    assert isinstance(stage, RlStage)
    model = stage.adapt_model(stage.load_model(config, prepared.tokenizer), config, False)
    plan = plan_speed(config, model, stage)
    batches = stage.batches(config, plan, prepared.train_rows, [], prepared.tokenizer.pad_token_id, None)
    trainer = stage.make_trainer(config, prepared, model=model,
                                 args=stage.training_arguments(config, prepared, out, plan, has_eval=False),
                                 train_dataset=batches.train, eval_dataset=None, data_collator=None,
                                 processing_class=prepared.tokenizer, callbacks=[])
    eot = prepared.tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert eot in trainer.eos_token_ids and trainer.generation_config.eos_token_id == trainer.eos_token_ids
    assert "ref" not in model.peft_config  # a new adapter: the reference is the adapter disabled
    assert torch.is_tensor(model.base_model.model.lm_head.weight)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("function, expected", [
    ("no_such_module:short",
     "rl.rewards.0.function = no_such_module:short: no module no_such_module in the working directory ({cwd}) or the "
     "installed packages; check the name, or run vitune from the folder that holds it"),
    ("my_rewards:missing", "rl.rewards.0.function = my_rewards:missing: {cwd}/my_rewards.py has no missing; check "
     "the function's name"),
    ("my_rewards:THRESHOLD", "rl.rewards.0.function = my_rewards:THRESHOLD: THRESHOLD in {cwd}/my_rewards.py is a "
     "float, not a function"),
    ("my_rewards:one_argument", "rl.rewards.0.function = my_rewards:one_argument: one_argument(completion) cannot be "
     "called as one_argument(prompt, completion); give it these two parameters"),
    ("my_rewards", "rl.rewards.0.function = 'my_rewards': give it as module:function, e.g. examples.rewards:vietnamese"),
])
def test_a_reward_function_that_cannot_be_used_is_one_line_before_training(
        function, expected, tiny_llama, tmp_path, rewards_module, capsys):
    out = tmp_path / "bad"
    config = rl_config(tmp_path, tiny_llama, out, rewards=[{"function": function}])
    assert main(["train", str(config)]) == 2
    assert error_of(capsys) == "error: " + expected.format(cwd=tmp_path)
    assert not out.exists()


@pytest.mark.parametrize("function, expected", [
    ("broken", "reward my_rewards:broken raised KeyError: 'score' on the prompt of {row}; fix the function (it gets "
     "the prompt and the completion as strings)"),
    ("not_a_number", "reward my_rewards:not_a_number returned 'good' (str) for the prompt of {row}; a reward must be "
     "a finite number (int or float)"),
    ("nan", "reward my_rewards:nan returned nan (float) for the prompt of {row}; a reward must be a finite number "
     "(int or float)"),
])
def test_a_reward_function_that_fails_in_training_names_itself_and_the_row(
        function, expected, tiny_llama, tmp_path, rewards_module, capsys):
    one = write_jsonl(tmp_path / "one.jsonl", [{"instruction": "Xin chào", "input": "", "output": "Chào bạn."}])
    out = tmp_path / "fails"
    config = rl_config(tmp_path, tiny_llama, out, rewards=[{"function": f"my_rewards:{function}"}],
                       data={"train": [{"path": str(one)}], "max_length": 64})
    assert main(["train", str(config)]) == 2
    assert error_of(capsys) == "error: " + expected.format(row=f"{one}:1")
    assert not (out / "summary.json").exists()


def test_a_folder_that_is_no_reward_model_is_one_line(tiny_llama, tmp_path, rewards_module, capsys):
    sft_run = tmp_path / "sft-run"
    sft_run.mkdir()
    (sft_run / "summary.json").write_text(json.dumps({"stage": "sft"}))
    cases = {str(sft_run): f"{sft_run} is not a reward model (stage sft)",
             str(tiny_llama): f"{tiny_llama} is not a reward model (no summary.json (not a finished run))",
             str(tmp_path / "nowhere"): f"{tmp_path / 'nowhere'}: folder not found"}
    for folder, start in cases.items():
        config = rl_config(tmp_path, tiny_llama, tmp_path / "rm", rewards=[{"model": folder}])
        assert main(["train", str(config)]) == 2
        assert error_of(capsys).startswith(f"error: rl.rewards.0.model = {start}")


def test_completions_per_step_must_be_whole_groups(tiny_llama, tmp_path, rewards_module, capsys):
    config = rl_config(tmp_path, tiny_llama, tmp_path / "groups", micro_batch_size=3, gradient_accumulation=2)
    assert main(["train", str(config)]) == 2
    assert error_of(capsys) == (
        "error: train.micro_batch_size 3 x train.gradient_accumulation 2 x 1 process(es) = 6 completions per step, "
        "not a multiple of rl.num_generations 4 (each prompt's 4 completions are compared within one step); set "
        "train.micro_batch_size to 4 (or rl.num_generations to 3)")


# ---------------------------------------------------------------- reward models


def test_a_reward_model_scores_the_prompt_conversation_with_the_completion(tiny_llama, tmp_path, monkeypatch):
    import vitune.train.reward_functions as reward
    from vitune.data.records import Conversation, Message
    from vitune.train.reward_functions import ModelReward, conversation_json

    scored = []

    class FakeScorer:  # RewardScorer's interface: load(run_dir), score(conversations) -> floats
        @classmethod
        def load(cls, run_dir):
            return cls()

        def score(self, conversations):
            scored.extend(conversations)
            return [float(len(c.messages[-1].content)) for c in conversations]

    monkeypatch.setattr(reward, "RewardScorer", FakeScorer)
    judge = ModelReward(str(tmp_path / "rm-run"), ["<|eot_id|>"])
    context = Conversation([Message("user", "Dịch", input="hello")], system="Bạn là trợ lí.", source="f:3")
    assert judge(["p"], ["xin chào<|eot_id|>"], conversation=[conversation_json(context)], source=["f:3"]) == [8.0]
    (conv,) = scored
    assert conv.system == "Bạn là trợ lí." and conv.source == "f:3"
    assert [(m.role, m.content, m.input) for m in conv.messages] == [("user", "Dịch", "hello"),
                                                                      ("assistant", "xin chào", None)]


# ---------------------------------------------------------------- resume


@pytest.mark.slow
def test_kill_9_then_resume_continues_from_the_checkpoint(tiny_llama, tmp_path, rewards_module):
    from safetensors.torch import load_file

    def run(out: Path) -> Path:
        return rl_config(tmp_path, tiny_llama, out, rewards=[{"function": "my_rewards:short"}], max_steps=6,
                         save_steps=2, learning_rate=1e-2)

    def train(*args: str) -> None:
        # each run in a fresh process, as a user runs them: an earlier in-process run of another test
        # (accelerate's process-wide state) was seen to change the last bits of the weights (3.8e-4)
        done = subprocess.run([sys.executable, "-m", "vitune", "train", *args], cwd=tmp_path, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr

    reference = tmp_path / "uninterrupted"
    train(str(run(reference)))
    out = tmp_path / "killed"
    config = run(out)
    proc = subprocess.Popen([sys.executable, "-m", "vitune", "train", str(config)], cwd=tmp_path,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    while not (out / "checkpoint-2" / MARKER).exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "summary.json").exists()
    after = int(complete_checkpoints(out)[-1].name.split("-")[1])
    train(str(config), "--set", "train.resume=auto")
    assert [r["step"] for r in records(out)] == list(range(1, 7))  # each step logged once
    # seeded sampling and restored RNG state: the resumed steps generate and learn what the uninterrupted run did
    assert [r["reward"] for r in records(out) if r["step"] > after] == [
        r["reward"] for r in records(reference) if r["step"] > after]
    a, b = load_file(out / "adapter_model.safetensors"), load_file(reference / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


# ---------------------------------------------------------------- GRPO's variants


def grpo_trainer(tmp_path: Path, model: Path, **rl):
    """TRL's trainer as the runner builds it for this rl section (no training)."""
    from rich.console import Console

    from vitune.config import load_config
    from vitune.train.arguments import plan_speed
    from vitune.train.runner import prepare_run

    out = tmp_path / "variant"
    config = load_config(rl_config(tmp_path, model, out, rl=rl))
    prepared = prepare_run(config, Console(quiet=True))
    stage = prepared.stage
    model = stage.adapt_model(stage.load_model(config, prepared.tokenizer), config, False)
    plan = plan_speed(config, model, stage)
    batches = stage.batches(config, plan, prepared.train_rows, [], prepared.tokenizer.pad_token_id, None)
    return stage.make_trainer(config, prepared, model=model,
                              args=stage.training_arguments(config, prepared, out, plan, has_eval=False),
                              train_dataset=batches.train, eval_dataset=None, data_collator=None,
                              processing_class=prepared.tokenizer, callbacks=[])


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo"])
def test_each_grpo_loss_type_reaches_trls_trainer(loss_type, tiny_llama, tmp_path, rewards_module):
    trainer = grpo_trainer(tmp_path, tiny_llama, loss_type=loss_type)
    assert trainer.args.loss_type == trainer.loss_type == loss_type
    assert trainer.importance_sampling_level == "token"


def test_gspo_is_sequence_level_importance_sampling_and_the_default_loss_is_trls(tiny_llama, tmp_path, rewards_module):
    trainer = grpo_trainer(tmp_path, tiny_llama, importance_sampling_level="sequence", loss_type="grpo")
    assert (trainer.importance_sampling_level, trainer.loss_type) == ("sequence", "grpo")
    from trl import GRPOConfig

    assert grpo_trainer(tmp_path, tiny_llama).loss_type == GRPOConfig("x", use_cpu=True, bf16=False).loss_type == "dapo"


def test_an_unknown_loss_type_is_one_line(tiny_llama, tmp_path, rewards_module, capsys):
    assert main(["train", str(rl_config(tmp_path, tiny_llama, tmp_path / "bad", rl={"loss_type": "ppo"}))]) == 2
    error = error_of(capsys)
    assert error.startswith("error: ") and "rl.loss_type" in error and "dr_grpo" in error and len(error.splitlines()) == 1
