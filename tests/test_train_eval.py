"""Evaluation while training (the eval: section): vitune eval's figures of the model being trained,
logged as eval/<file>/<figure> before the first step, every train.eval_steps steps and at the end;
the same numbers as `vitune eval` of the finished run (and of the base model at step 0); config
and data mistakes in one line before training; a resumed run keeps the figures up to its checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vitune.cli import main
from vitune.eval.runner import headline

from conftest import ROOT, write_config, write_jsonl

VMLU = ROOT / "data" / "vmlu_vi.jsonl"
QA = ROOT / "data" / "qa_vi_eval.jsonl"
CORPUS_EVAL = ROOT / "data" / "corpus_vi_eval.jsonl"
PAIRS = ROOT / "data" / "preference_vi_eval.jsonl"
FILES = [VMLU, QA, CORPUS_EVAL, PAIRS]
EVAL = {"data": [str(p) for p in FILES], "generate": True, "limit": 4, "max_new_tokens": 4, "batch_size": 4}
# what `vitune eval` is given for the same figures
EVAL_ARGS = ["--limit", "4", "--generate", "--max-new-tokens", "4", "--batch-size", "4"]


def config(tmp_path: Path, model: Path, name: str, eval_section=EVAL, **train) -> Path:
    return write_config(
        tmp_path / f"{name}.yaml",
        model={"name_or_path": str(model)},
        method={"type": "lora", "lora": {"dropout": 0.0}},
        data={"train": [{"path": str(ROOT / "data" / "alpaca_vi.jsonl"), "max_samples": 16}], "max_length": 128},
        train={"max_steps": 3, "micro_batch_size": 4, "learning_rate": 1e-2, "warmup_ratio": 0.0, "logging_steps": 1,
               "output_dir": str(tmp_path / name), "report_to": ["none"], **train},
        **({"eval": eval_section} if eval_section else {}),
    )


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def evaluations(run: Path) -> dict[int, dict]:
    """{step: {eval/<file>/<figure>: value}} of the evaluation lines of metrics.jsonl."""
    out: dict[int, dict] = {}
    for r in records(run):
        figures = {k: v for k, v in r.items() if k.startswith("eval/")}
        if figures:
            assert r["step"] not in out, f"two evaluations at step {r['step']}"
            out[r["step"]] = figures
    return out


def vitune_eval(target: Path, files: list[Path], out: Path) -> dict[str, float]:
    """{eval/<file>/<figure>: value} as `vitune eval TARGET --data FILES` reports them for the model."""
    assert main(["eval", str(target), "--data", *map(str, files), *EVAL_ARGS, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    return {f"eval/{Path(f['path']).stem}/{k}": v for f in result["files"] for k, v in headline(f["model"]).items()}


def error_of(capsys) -> str:
    return " ".join(capsys.readouterr().err.split())


@pytest.fixture(scope="module")
def run(tiny_llama, tmp_path_factory) -> Path:
    """A LoRA run of 3 steps evaluated every 2: at steps 0, 2 and 3."""
    tmp = tmp_path_factory.mktemp("train_eval")
    assert main(["train", str(config(tmp, tiny_llama, "run", eval_steps=2))]) == 0
    return tmp / "run"


def test_evaluations_come_before_training_every_eval_steps_and_at_the_end(run):
    logged = evaluations(run)
    assert sorted(logged) == [0, 2, 3]
    assert set(logged[3]) == {
        "eval/vmlu_vi/acc", "eval/vmlu_vi/acc_norm", "eval/vmlu_vi/vmlu_acc",
        "eval/qa_vi_eval/loss", "eval/qa_vi_eval/perplexity", "eval/qa_vi_eval/exact_match", "eval/qa_vi_eval/chrf",
        "eval/qa_vi_eval/rouge_l", "eval/qa_vi_eval/repetition", "eval/corpus_vi_eval/bits_per_char", "eval/corpus_vi_eval/perplexity",
        "eval/preference_vi_eval/implicit_reward_accuracy", "eval/preference_vi_eval/implicit_reward_margin"}
    # the training log of every step is still there (an evaluation's log does not replace it)
    assert [r["step"] for r in records(run) if "loss" in r] == [1, 2, 3]


def test_the_last_figures_equal_vitune_eval_of_the_finished_run(run, tmp_path):
    reported = vitune_eval(run, FILES, tmp_path / "eval.json")
    logged = evaluations(run)[3]
    assert set(logged) == set(reported)
    for key, value in reported.items():
        assert logged[key] == pytest.approx(value, abs=1e-6), key
    assert logged["eval/qa_vi_eval/loss"] != evaluations(run)[0]["eval/qa_vi_eval/loss"]  # the model did train


def test_the_step_0_figures_equal_vitune_eval_of_the_base_model(run, tiny_llama, tmp_path):
    # preference pairs need a reference: the base model alone has none
    reported = vitune_eval(tiny_llama, FILES[:3], tmp_path / "eval.json")
    logged = evaluations(run)[0]
    assert set(reported) == {k for k in logged if "preference_vi_eval" not in k}
    for key, value in reported.items():
        assert logged[key] == pytest.approx(value, abs=1e-6), key
    # at step 0 LoRA's B matrices are zero: the policy is its reference, every implicit reward is 0
    assert logged["eval/preference_vi_eval/implicit_reward_margin"] == 0.0


def test_the_summary_holds_each_figures_first_and_last_value(run):
    summary = json.loads((run / "summary.json").read_text())
    logged = evaluations(run)
    assert summary["evaluation"]["eval/vmlu_vi/acc_norm"] == {
        "first": logged[0]["eval/vmlu_vi/acc_norm"], "first_step": 0,
        "last": logged[3]["eval/vmlu_vi/acc_norm"], "last_step": 3}
    assert set(summary["evaluation"]) == set(logged[3])


def test_evaluating_changes_no_training_step(run, tiny_llama, tmp_path):
    assert main(["train", str(config(tmp_path, tiny_llama, "plain", eval_section=None, eval_steps=2))]) == 0
    losses = [[(r["step"], r["loss"], r["grad_norm"]) for r in records(folder) if "loss" in r] for folder in (run, tmp_path / "plain")]
    assert losses[0] == losses[1]
    assert "evaluation" not in json.loads((tmp_path / "plain" / "summary.json").read_text())


def test_the_eval_curves_are_plotted_by_vitune_eval(run, tmp_path):
    from PIL import Image

    from vitune.eval.plot import plot_evaluations

    out = plot_evaluations(run, tmp_path / "curves.png")
    assert Image.open(out).size[0] == 800


def test_without_eval_steps_the_model_is_evaluated_before_and_after_training(tiny_llama, tmp_path):
    only_text = {"data": [str(CORPUS_EVAL)], "limit": 2}
    assert main(["train", str(config(tmp_path, tiny_llama, "ends", eval_section=only_text, max_steps=2))]) == 0
    assert {step: sorted(f) for step, f in evaluations(tmp_path / "ends").items()} == {
        step: ["eval/corpus_vi_eval/bits_per_char", "eval/corpus_vi_eval/perplexity"] for step in (0, 2)}


def test_a_resumed_run_keeps_the_evaluations_up_to_its_checkpoint(tiny_llama, tmp_path):
    only_text = {"data": [str(CORPUS_EVAL)], "limit": 2}
    path = config(tmp_path, tiny_llama, "resumed", eval_section=only_text, max_steps=4, eval_steps=2, save_steps=2)
    assert main(["train", str(path)]) == 0
    run = tmp_path / "resumed"
    uninterrupted = evaluations(run)
    assert sorted(uninterrupted) == [0, 2, 4]
    # as if the run had stopped after evaluating at step 3: that line is not before the checkpoint
    with open(run / "metrics.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"step": 3, "eval/corpus_vi_eval/bits_per_char": 99.0}) + "\n")
    assert main(["train", str(path), "--set", f"train.resume={run / 'checkpoint-2'}"]) == 0
    resumed = evaluations(run)  # step 0 and 2 kept (not evaluated again), 3 dropped, 4 evaluated again
    assert resumed == uninterrupted
    summary = json.loads((run / "summary.json").read_text())
    assert summary["evaluation"]["eval/corpus_vi_eval/bits_per_char"]["first_step"] == 0


# ---------------------------------------------------------------- mistakes, before training


@pytest.mark.parametrize("section, expected", [
    ({"data": ["missing.jsonl"]}, "eval.data[0] = 'missing.jsonl': file not found"),
    ({"data": [str(VMLU)], "limt": 4}, "unknown key 'eval.limt'; did you mean 'eval.limit'?"),
    ({"data": [str(VMLU)], "task": "mcq"}, "eval.task = 'mcq' is not allowed; expected 'auto', 'multiple_choice'"),
    ({"data": []}, "eval.data = []: list should have at least 1 item"),
    ({"data": [str(VMLU), str(ROOT / "tests" / ".." / "data" / "vmlu_vi.jsonl")]},
     "eval.data[1] = '" + str(ROOT / "tests" / ".." / "data" / "vmlu_vi.jsonl") + "': its figures would be logged as "
     "eval/vmlu_vi/... like those of '" + str(VMLU) + "'; give the files different names"),
])
def test_config_mistakes_in_the_eval_section_are_one_line_exit_2(tiny_llama, tmp_path, capsys, section, expected):
    path = config(tmp_path, tiny_llama, "bad", eval_section=section)
    assert main(["train", str(path)]) == 2
    assert expected in error_of(capsys)
    assert not (tmp_path / "bad").exists()  # nothing trained, no run folder


def test_a_bad_row_in_an_eval_file_names_file_and_line_before_training(tiny_llama, tmp_path, capsys):
    row = json.loads(VMLU.read_text(encoding="utf-8").splitlines()[0])
    bad = write_jsonl(tmp_path / "mc.jsonl", [row, {**row, "id": "x2", "answer": "E"}])
    assert main(["train", str(config(tmp_path, tiny_llama, "bad", eval_section={"data": [str(bad)]}))]) == 2
    assert error_of(capsys).endswith(
        f"eval.data[0]: {bad}:2: answer 'E', but the choices are A, B, C, D; fix the row, or set data.on_error: "
        "skip to leave such rows out")
    assert not (tmp_path / "bad").exists()


def test_a_reward_model_run_refuses_the_eval_section(tiny_llama, tmp_path, capsys):
    path = config(tmp_path, tiny_llama, "rm", eval_section={"data": [str(VMLU)]}, stage="rm")
    assert main(["train", str(path)]) == 2
    assert "the eval section scores a language model (vitune eval's tasks); a reward model" in error_of(capsys)
