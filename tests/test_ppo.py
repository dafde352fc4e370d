"""rl.algorithm: ppo on the shared runner: a complete run folder (the value head beside an ordinary
adapter), the reference for each method, a reward that goes up, the rules of the rl section, two
processes training what one does, and resume after kill -9 (bit-identical)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vitune.cli import main
from vitune.train.checkpoint import MARKER, complete_checkpoints

from conftest import ROOT
from test_rl import ALPACA, error_of, records, rewards_module, rl_config  # noqa: F401 (a fixture)

PPO = {"algorithm": "ppo", "num_generations": 1, "max_completion_length": 8, "ppo_epochs": 2, "num_mini_batches": 2}


def ppo_config(tmp_path: Path, model: Path, out: Path, rl=None, **train) -> Path:
    train.setdefault("rewards", [{"function": "my_rewards:letter_n"}])
    rewards = train.pop("rewards")
    train.setdefault("warmup_ratio", 0.0)  # the first step already updates (a warm-up step has learning rate 0)
    train.setdefault("data", {"train": [{"path": str(ALPACA), "max_samples": 16}], "val_size": 4, "max_length": 128})
    return rl_config(tmp_path, model, out, rewards=rewards, rl={**PPO, **(rl or {})}, **train)


def test_a_ppo_run_writes_an_ordinary_adapter_with_the_value_head_beside_it(tiny_llama, tmp_path, rewards_module,
                                                                            capsys):
    from safetensors.torch import load_file

    out = tmp_path / "ppo"
    assert main(["train", str(ppo_config(tmp_path, tiny_llama, out))]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stage"] == "rl" and summary["steps"] == 2
    head = load_file(out / "value_head.safetensors")
    assert sorted(head) == ["linear.bias", "linear.weight"] and head["linear.weight"].shape == (1, 256)
    adapter = load_file(out / "adapter_model.safetensors")
    assert adapter and all("lora_" in key for key in adapter)  # no value head, no reference copy inside
    assert not (out / "ref").exists()
    logged = [r for r in records(out) if "loss" in r]
    assert [r["step"] for r in logged] == [1, 2]
    for key in ("reward", "reward_std", "kl", "entropy", "completions/mean_length", "policy_loss", "value_loss",
                "explained_variance", "clipfrac", "value_clipfrac", "approx_kl", "rewards/letter_n/mean", "grad_norm"):
        assert all(key in r for r in logged), key
    assert [r["ppo_updates"] for r in logged] == [4.0, 4.0]  # 2 epochs x 2 minibatches
    assert logged[0]["kl"] == 0.0  # the first rollout comes from the reference itself (a new adapter is the base)
    held = [r for r in records(out) if "eval_reward" in r]
    assert [r["step"] for r in held] == [0, 2]
    assert all(r["eval_completions/mean_length"] <= 8 for r in held)
    assert summary["eval_reward_start"] == held[0]["eval_reward"] and summary["eval_reward_end"] == held[1]["eval_reward"]
    assert summary["eval_reward_sem_end"] == held[1]["eval_reward_sem"] > 0
    shown = " ".join(capsys.readouterr().out.split())
    assert (f"held-out prompts: mean reward {summary['eval_reward_start']:.4f} (start) -> "
            f"{summary['eval_reward_end']:.4f} (end) (standard error {summary['eval_reward_sem_end']:.4f})") in shown
    # the folder is an ordinary adapter: vitune chat / merge load it
    from vitune.infer.chat import load_chat_model
    chat = load_chat_model(str(out))
    assert type(chat.model).__name__ == "PeftModelForCausalLM"


def test_full_fine_tuning_keeps_a_frozen_copy_as_the_reference(tiny_llama, tmp_path, rewards_module):
    from safetensors.torch import load_file

    out = tmp_path / "full"
    assert main(["train", str(ppo_config(tmp_path, tiny_llama, out, learning_rate=1e-4)), "--set",
                 "method.type=full", "--set", "train.max_steps=2"]) == 0
    logged = [r for r in records(out) if "loss" in r]
    assert logged[0]["kl"] == 0.0 and logged[1]["kl"] != 0.0  # the copy stayed where the policy started
    weights = load_file(out / "model.safetensors")
    assert not any(key.startswith("v_head") for key in weights)


def test_continuing_an_sft_adapter_takes_it_frozen_as_the_reference(tiny_llama, tmp_path, rewards_module):
    first = tmp_path / "first"
    assert main(["train", str(ppo_config(tmp_path, tiny_llama, first, learning_rate=5e-2))]) == 0
    out = tmp_path / "second"
    config = ppo_config(tmp_path, tiny_llama, out)
    assert main(["train", str(config), "--set", f"model.adapter={first}"]) == 0
    logged = [r for r in records(out) if "loss" in r]
    assert logged[0]["kl"] == 0.0  # policy and reference both start as the first run's adapter
    assert not (out / "ref").exists()


@pytest.mark.slow  # ~1 min
def test_mean_reward_goes_up_with_an_easy_reward(tiny_llama, tmp_path, rewards_module):
    out = tmp_path / "learns"
    config = ppo_config(tmp_path, tiny_llama, out, max_steps=10, micro_batch_size=8, learning_rate=2e-2,
                        scheduler="constant", rl={"beta": 0.0, "ppo_epochs": 4, "num_mini_batches": 2})
    assert main(["train", str(config), "--set", "method.type=full"]) == 0
    rewards = [r["reward"] for r in records(out) if "loss" in r]
    assert sum(rewards[-3:]) / 3 > 2 * rewards[0], rewards
    summary = json.loads((out / "summary.json").read_text())
    # the same 4 held-out prompts, sampled from the same seeds before the first step and after the last
    assert summary["eval_reward_end"] - summary["eval_reward_start"] > 2 * summary["eval_reward_sem_end"]


# ---------------------------------------------------------------- the rules


@pytest.mark.parametrize("settings, message", [
    ({"algorithm": "grpo", "gamma": 0.9},
     "rl.gamma is only used with rl.algorithm: ppo (this run is grpo)"),
    ({"algorithm": "ppo", "loss_type": "dr_grpo"},
     "rl.loss_type is only used with rl.algorithm: grpo (this run is ppo)"),
    ({"algorithm": "rloo", "importance_sampling_level": "sequence"},
     "rl.importance_sampling_level is only used with rl.algorithm: grpo (this run is rloo)"),
    ({"algorithm": "grpo", "num_generations": 1},
     "rl.num_generations = 1: grpo compares each prompt's completions with each other; give at least 2"),
    ({"algorithm": "ppo", "kl_estimator": "k2"}, "rl.kl_estimator"),
    ({"algorithm": "ppo", "gamma": 1.5}, "rl.gamma"),
])
def test_keys_of_another_algorithm_and_bad_values_are_one_line(settings, message, tiny_llama, tmp_path,
                                                                rewards_module, capsys):
    config = rl_config(tmp_path, tiny_llama, tmp_path / "bad", rl=settings)
    assert main(["train", str(config)]) == 2
    error = error_of(capsys)
    assert message in error and "Traceback" not in error and len(error.splitlines()) == 1


def test_minibatches_must_divide_the_micro_batch(tiny_llama, tmp_path, rewards_module, capsys):
    config = ppo_config(tmp_path, tiny_llama, tmp_path / "mb", micro_batch_size=3)
    assert main(["train", str(config)]) == 2
    assert error_of(capsys) == ("error: rl.num_mini_batches 2 must divide train.micro_batch_size 3 (each update takes "
                                "that share of every micro-batch); set train.micro_batch_size to 2")


def test_ppo_with_deepspeed_is_refused_before_training(tiny_llama, tmp_path, rewards_module, capsys):
    config = ppo_config(tmp_path, tiny_llama, tmp_path / "ds",
                        deepspeed=str(ROOT / "examples" / "deepspeed" / "zero2.json"))
    assert main(["train", str(config)]) == 2
    assert error_of(capsys).startswith("error: rl.algorithm: ppo steps the optimizer several times per step")
    assert not (tmp_path / "ds").exists()


# ---------------------------------------------------------------- scale-out and resume


@pytest.mark.slow  # two launches of 2 processes
def test_two_processes_train_exactly_what_one_does(tiny_llama, tmp_path, rewards_module):
    """The same global batch of 8 completions: one process (2 micro-batches of 4) against two (one each);
    each samples its own prompts from per-row seeds; the means and the whitening are over both."""
    one = ppo_config(tmp_path, tiny_llama, tmp_path / "one", max_steps=3, gradient_accumulation=2)
    two = ppo_config(tmp_path, tiny_llama, tmp_path / "two", max_steps=3)
    # no LoRA dropout (its random numbers fall on other rows in another batch shape); 16 training prompts:
    # whole steps of 8 in both (a short last step would be 4 prompts for one process, dropped for two)
    same = ["--set", "method.lora.dropout=0.0", "--set", "data.train.0.max_samples=20"]
    assert main(["train", str(one), *same]) == 0
    assert main(["train", str(two), "--nproc", "2", *same]) == 0
    def by_step(run: Path, kind: str) -> dict[int, dict]:
        return {r["step"]: r for r in records(run) if kind in r}

    for kind, steps, keys in (
            ("loss", {1, 2, 3}, ("loss", "reward", "kl", "value_loss", "policy_loss", "approx_kl", "explained_variance",
                                 "real_tokens")),
            ("eval_reward", {0, 2, 3}, ("eval_reward", "eval_reward_sem", "eval_loss", "eval_kl"))):
        a, b = by_step(tmp_path / "one", kind), by_step(tmp_path / "two", kind)
        assert a.keys() == b.keys() == steps
        for key in keys:
            pairs = [(a[s][key], b[s][key]) for s in steps]
            # within float rounding: the held-out KL (differences of log-probabilities, summed) moves ~1e-5
            assert all(abs(x - y) < 1e-4 for x, y in pairs), (key, pairs)


@pytest.mark.slow
def test_kill_9_then_resume_continues_from_the_checkpoint(tiny_llama, tmp_path, rewards_module):
    from safetensors.torch import load_file

    def run(out: Path) -> Path:
        return ppo_config(tmp_path, tiny_llama, out, max_steps=6, save_steps=2, learning_rate=1e-2)

    def train(*args: str) -> None:
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
    assert (out / "checkpoint-2" / "value_head.safetensors").is_file()
    after = int(complete_checkpoints(out)[-1].name.split("-")[1])
    train(str(config), "--set", "train.resume=auto")
    train_records = [r for r in records(out) if "loss" in r]
    assert [r["step"] for r in train_records] == list(range(1, 7))
    assert [r["reward"] for r in train_records if r["step"] > after] == [
        r["reward"] for r in records(reference) if "loss" in r and r["step"] > after]
    for name in ("adapter_model.safetensors", "value_head.safetensors"):
        a, b = load_file(out / name), load_file(reference / name)
        assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a), name


def test_the_example_rewards_do_what_their_docstrings_show():
    import doctest
    import importlib

    rewards = importlib.import_module("examples.rewards")
    failures, tried = doctest.testmod(rewards)
    assert (failures, tried) == (0, 6)
