"""Experiment trackers (train.report_to): a short `vitune train` logs into Weights & Biases (offline)
and MLflow (a SQLite store made here), and what each tracker stored, read back with its own reader,
is what the run folder holds: metrics.jsonl's figures under the same keys at the same steps with
the same values (losses, tokens/s, padding, held-out and eval-section figures), summary.json's
numbers as summary/<key>, the run's name and vitune's config (flattened: method.type, ...).
Nothing goes over the network: W&B writes its offline run folder, MLflow a local database."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest

from vitune.cli import main
from vitune.config import RunConfig, load_config, validate_config
from vitune.train.trackers import tracker_runs

from conftest import ROOT, write_config

ALPACA = ROOT / "data" / "alpaca_vi.jsonl"
QA = ROOT / "data" / "qa_vi_eval.jsonl"


def run_config(tmp_path: Path, model: Path, report_to, **train) -> Path:
    """Three steps of full fine-tuning, every step logged, a held-out loss at steps 0 and 2 and after the
    last (the runner's, once training has ended), the eval section's figures at steps 0, 2 and 3."""
    return write_config(
        tmp_path / "run.yaml",
        model={"name_or_path": str(model)},
        method={"type": "full"},
        data={"train": [{"path": str(ALPACA), "max_samples": 20}], "max_length": 128, "val_size": 4},
        train={"max_steps": 3, "micro_batch_size": 4, "learning_rate": 1e-3, "warmup_ratio": 0.0, "logging_steps": 1,
               "eval_steps": 2, "output_dir": str(tmp_path / "my-run"), "report_to": report_to, **train},
        eval={"data": [str(QA)], "limit": 2, "batch_size": 2},
    )


def train(tmp_path: Path, model: Path, report_to, **train_keys) -> tuple[list[dict], dict]:
    """Run `vitune train`; (metrics.jsonl's records, summary.json) of the run folder."""
    tmp_path.mkdir(exist_ok=True)
    assert main(["train", str(run_config(tmp_path, model, report_to, **train_keys))]) == 0
    run = tmp_path / "my-run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return records, json.loads((run / "summary.json").read_text())


def histories(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """{key: [(step, value), ...]} of metrics.jsonl's records: what each tracker must hold."""
    out: dict[str, list] = {}
    for record in records:
        for key, value in record.items():
            if key != "step":
                out.setdefault(key, []).append((record["step"], value))
    return out


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch) -> Path:
    """W&B in offline mode, writing under tmp_path, with no API key and no project of the user's."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "vitune-tests")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return tmp_path / "wandb"


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch) -> str:
    """An MLflow tracking store in a SQLite file under tmp_path; runs go to its experiment vitune-tests."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "vitune-tests")
    return uri


# ---------------------------------------------------------------- reading back what W&B stored


def wandb_records(path: Path):
    """The records of a W&B run's .wandb file, as wandb's protobuf messages. The file is a LevelDB-style
    log (a 7-byte header, then 32 KiB blocks of records, each a 7-byte header and a chunk); wandb 0.31
    ships no Python reader of its own, only the message types."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, message = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:  # padding
            continue
        message = chunk if kind in (1, 2) else message + chunk  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(message)
            yield record


def wandb_runs(folder: Path) -> list[Path]:
    """The .wandb files of the offline runs under `folder`, oldest first."""
    return sorted(folder.glob("offline-run-*/run-*.wandb"))


def wandb_run(path: Path) -> dict:
    """What an offline run's .wandb file holds: its name, project, config, history rows, summary, exit code."""
    out = {"config": {}, "history": [], "summary": {}}

    def key(item) -> str:
        return item.key or "/".join(item.nested_key)

    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["name"], out["project"] = record.run.display_name, record.run.project
            out["config"].update({key(i): json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            out["config"].update({key(i): json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            out["history"].append({key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            out["summary"].update({key(i): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "exit":
            out["exit_code"] = record.exit.exit_code
    return out


def wandb_histories(run: dict) -> dict[str, list[tuple[int, float]]]:
    """{key: [(step, value)]} of the W&B run's history, under the keys metrics.jsonl uses: transformers'
    callback writes train/<key> for a training figure and eval/<key> for eval_<key>."""
    out: dict[str, list] = {}
    for row in run["history"]:
        for name, value in row.items():
            if name.startswith("train/"):
                name = name[len("train/"):]
            elif name.startswith("eval/"):
                name = "eval_" + name[len("eval/"):]
            else:
                continue  # W&B's own (_step, _runtime, _timestamp)
            out.setdefault(name, []).append((row["train/global_step"], value))
    return out


# ---------------------------------------------------------------- reading back what MLflow stored


def mlflow_run(uri: str):
    """(client, the one run of the experiment vitune-tests); no other run anywhere in the store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments)
    assert len(runs) == 1, [r.info.run_name for r in runs]
    assert client.get_experiment(runs[0].info.experiment_id).name == "vitune-tests"
    return client, runs[0]


def mlflow_histories(client, run, keys) -> dict[str, list[tuple[int, float]]]:
    return {key: [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, key),
                                                   key=lambda m: (m.step, m.timestamp))]
            for key in keys}


# ---------------------------------------------------------------- W&B


def test_wandb_offline_run_holds_the_run_name_config_and_every_figure_of_metrics_jsonl(tiny_llama, tmp_path,
                                                                                       wandb_offline):
    records, summary = train(tmp_path, tiny_llama, ["wandb"])
    expected = histories(records)
    # what the run logs, each at its steps: training figures at 1..3, held-out loss at 0, 2 and 3 (the last after
    # training ended), the eval section's figures at 0, 2 and 3
    assert [s for s, _ in expected["loss"]] == [1, 2, 3]
    assert [s for s, _ in expected["tokens_per_s"]] == [1, 2, 3]
    assert [s for s, _ in expected["eval_loss"]] == [0, 2, 3]
    assert [s for s, _ in expected["eval/qa_vi_eval/loss"]] == [0, 2, 3]

    runs = wandb_runs(wandb_offline)
    assert len(runs) == 1
    run = wandb_run(runs[0])
    assert (run["name"], run["project"], run["exit_code"]) == ("my-run", "vitune-tests", 0)
    config = run["config"]
    assert (config["method.type"], config["train.learning_rate"], config["train.max_steps"]) == ("full", 1e-3, 3)
    assert (config["data.train.0.path"], config["data.val_size"], config["train.report_to"]) == (str(ALPACA), 4, ["wandb"])
    assert config["eval.data"] == [str(QA)] and config["train.run_name"] is None
    assert (config["run_name"], config["learning_rate"]) == ("my-run", 1e-3)  # TrainingArguments', by transformers
    stored = wandb_histories(run)
    for key, points in expected.items():
        assert stored[key] == points, key
    assert run["summary"]["train/summary/tokens_per_s"] == summary["tokens_per_s"]
    assert run["summary"]["train/summary/eval_loss_end"] == summary["eval_loss_end"] == expected["eval_loss"][-1][1]
    assert run["summary"]["train/summary/packing_efficiency"] == summary["packing_efficiency"]


def test_a_second_run_in_the_same_process_is_a_run_of_its_own(tiny_llama, tmp_path, wandb_offline):
    train(tmp_path / "a", tiny_llama, ["wandb"], max_steps=1)
    train(tmp_path / "b", tiny_llama, ["wandb"], max_steps=1, run_name="second")
    assert [wandb_run(path)["name"] for path in wandb_runs(wandb_offline)] == ["my-run", "second"]


# ---------------------------------------------------------------- MLflow


def test_mlflow_run_holds_the_run_name_params_and_every_figure_of_metrics_jsonl(tiny_llama, tmp_path, mlflow_store):
    records, summary = train(tmp_path, tiny_llama, ["mlflow"])
    expected = histories(records)
    assert [s for s, _ in expected["eval_loss"]] == [0, 2, 3]

    client, run = mlflow_run(mlflow_store)
    assert (run.info.run_name, run.info.status) == ("my-run", "FINISHED")
    params = run.data.params
    assert (params["method.type"], params["train.learning_rate"], params["train.max_steps"]) == ("full", "0.001", "3")
    assert (params["data.train.0.path"], params["train.report_to"]) == (str(ALPACA), "['mlflow']")
    assert (params["run_name"], params["learning_rate"]) == ("my-run", "0.001")  # TrainingArguments', by transformers
    assert mlflow_histories(client, run, expected) == expected  # the last held-out loss too, logged after training
    assert mlflow_histories(client, run, ["summary/tokens_per_s", "summary/eval_loss_end"]) == {
        "summary/tokens_per_s": [(3, summary["tokens_per_s"])], "summary/eval_loss_end": [(3, summary["eval_loss_end"])]}


# ---------------------------------------------------------------- all three at once


def test_tensorboard_wandb_and_mlflow_at_once_each_hold_the_figures(tiny_llama, tmp_path, wandb_offline,
                                                                     mlflow_store):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    import numpy as np

    records, summary = train(tmp_path, tiny_llama, ["tensorboard", "wandb", "mlflow"], max_steps=2, eval_steps=None)
    expected = histories(records)
    assert [s for s, _ in expected["loss"]] == [1, 2]

    client, run = mlflow_run(mlflow_store)
    assert mlflow_histories(client, run, expected) == expected
    runs = wandb_runs(wandb_offline)
    assert len(runs) == 1
    stored = wandb_histories(wandb_run(runs[0]))
    assert {key: stored[key] for key in expected} == expected
    board = EventAccumulator(str(tmp_path / "my-run" / "tensorboard"))
    board.Reload()
    for key, points in expected.items():
        tag = "eval/" + key[len("eval_"):] if key.startswith("eval_") else "train/" + key
        # TensorBoard keeps scalars as float32
        assert [(e.step, e.value) for e in board.Scalars(tag)] == [(s, float(np.float32(v))) for s, v in points], key
    assert [(e.step, e.value) for e in board.Scalars("train/summary/tokens_per_s")] == [
        (2, float(np.float32(summary["tokens_per_s"])))]


# ---------------------------------------------------------------- the runs' ends, continued runs, other processes


def tracked_config(tmp_path: Path, report_to, **model) -> RunConfig:
    """A config for tracker_runs alone (nothing is trained or loaded)."""
    return validate_config({"model": {"name_or_path": "tiny", **model}, "data": {"train": [{"path": "rows.jsonl"}]},
                            "train": {"output_dir": str(tmp_path / "my-run"), "report_to": report_to}})


def test_a_run_that_fails_is_marked_failed_in_each_tracker(tmp_path, wandb_offline, mlflow_store):
    with pytest.raises(RuntimeError, match="out of memory"):
        with tracker_runs(tracked_config(tmp_path, ["wandb", "mlflow"]), main_process=True):
            raise RuntimeError("out of memory")
    runs = wandb_runs(wandb_offline)
    assert len(runs) == 1 and wandb_run(runs[0])["exit_code"] == 1
    _, run = mlflow_run(mlflow_store)
    assert (run.info.run_name, run.info.status) == ("my-run", "FAILED")


def test_a_continued_mlflow_run_keeps_its_params_and_long_values_are_cut_to_mlflows_limit(tmp_path, mlflow_store,
                                                                                         monkeypatch):
    from mlflow.tracking import MlflowClient
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    with tracker_runs(tracked_config(tmp_path, ["mlflow"], template="chatml"), main_process=True):
        pass
    _, first = mlflow_run(mlflow_store)
    # MLFLOW_RUN_ID continues that run; MLflow refuses to change a param's value, so the first ones stay
    monkeypatch.setenv("MLFLOW_RUN_ID", first.info.run_id)
    long_path = "models/" + "x" * MAX_PARAM_VAL_LENGTH
    with tracker_runs(tracked_config(tmp_path, ["mlflow"], template="vinallama", name_or_path=long_path),
                      main_process=True):
        pass
    _, run = mlflow_run(mlflow_store)
    assert (run.info.run_id, run.info.status) == (first.info.run_id, "FINISHED")
    assert (run.data.params["model.template"], run.data.params["model.name_or_path"]) == ("chatml", "tiny")

    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "long")
    with tracker_runs(tracked_config(tmp_path, ["mlflow"], name_or_path=long_path), main_process=True):
        pass
    client = MlflowClient(tracking_uri=mlflow_store)
    [run] = client.search_runs([client.get_experiment_by_name("long").experiment_id])
    assert run.data.params["model.name_or_path"] == long_path[:MAX_PARAM_VAL_LENGTH]


def test_other_processes_open_no_run(tmp_path, wandb_offline, mlflow_store):
    from mlflow.tracking import MlflowClient

    with tracker_runs(tracked_config(tmp_path, ["wandb", "mlflow"]), main_process=False):
        pass
    assert wandb_runs(wandb_offline) == []
    client = MlflowClient(tracking_uri=mlflow_store)
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


# ---------------------------------------------------------------- several processes


@pytest.mark.slow  # ~60 s on 2 CPU cores: two processes, each importing torch, W&B and MLflow
def test_two_processes_log_one_run_to_each_tracker_from_the_main_process(tiny_llama, tmp_path, wandb_offline,
                                                                          mlflow_store):
    path = run_config(tmp_path, tiny_llama, ["wandb", "mlflow"], max_steps=2, micro_batch_size=2, eval_steps=None)
    assert main(["train", str(path), "--nproc", "2"]) == 0
    records = [json.loads(line) for line in (tmp_path / "my-run" / "metrics.jsonl").read_text().splitlines()]
    expected = histories(records)
    assert [s for s, _ in expected["loss"]] == [1, 2]

    runs = wandb_runs(wandb_offline)  # one run, not one per process
    assert len(runs) == 1
    stored = wandb_histories(wandb_run(runs[0]))
    assert {key: stored[key] for key in expected} == expected
    client, run = mlflow_run(mlflow_store)  # asserts it is the store's only run
    assert (run.info.run_name, run.info.status) == ("my-run", "FINISHED")
    assert mlflow_histories(client, run, expected) == expected


# ---------------------------------------------------------------- mistakes: one line, exit 2, nothing written


@pytest.mark.parametrize("report_to, error", [
    (["comet"], "train.report_to[0] = 'comet' is not allowed; expected 'tensorboard', 'wandb', 'mlflow' or 'none'"),
    (["none", "wandb"], "train.report_to = ['none', 'wandb']: none turns every tracker off; give it alone, or list "
                        "only the trackers to use"),
    (["wandb", "wandb"], "train.report_to = ['wandb', 'wandb']: wandb is listed twice; list each tracker once"),
], ids=["unknown tracker", "none with another", "twice"])
def test_a_wrong_report_to_is_one_line_naming_the_key(tmp_path, capsys, report_to, error):
    path = run_config(tmp_path, tmp_path / "model", report_to)
    assert main(["train", str(path)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {path}: {error}"
    assert not (tmp_path / "my-run").exists()


@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_a_tracker_that_is_not_installed_is_one_line_with_its_install_command(tmp_path, capsys, monkeypatch,
                                                                              tracker):
    monkeypatch.setitem(sys.modules, tracker, None)  # what `import wandb` meets where it is not installed
    # checked at start-up, before the model (none here) is looked for and before anything is written
    assert main(["train", str(run_config(tmp_path, tmp_path / "model", ["tensorboard", tracker]))]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: train.report_to: {tracker} is not installed: pip install 'vitune[{tracker}]'")
    assert not (tmp_path / "my-run").exists()


def test_wandb_online_without_an_api_key_is_one_line_and_leaves_no_run_folder(tiny_llama, tmp_path, capsys,
                                                                             monkeypatch):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a key of the user's
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert main(["train", str(run_config(tmp_path, tiny_llama, ["wandb"]))]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: train.report_to: wandb could not start a run (No API key configured. Use `wandb login` to log in.); "
        "to log without an account or network, set WANDB_MODE=offline")
    assert not (tmp_path / "my-run").exists()  # the tracker opens before the run folder is made


def test_every_tracker_the_config_accepts_is_known_to_the_runner():
    from typing import get_args

    from vitune.config import TrainConfig
    from vitune.train.trackers import TRACKERS

    [accepted] = get_args(TrainConfig.model_fields["report_to"].annotation)
    assert set(get_args(accepted)) == {*TRACKERS, "none"}


def test_a_single_tracker_may_be_given_without_a_list(tmp_path):
    config = load_config(run_config(tmp_path, tmp_path / "model", ["none"]), ["train.report_to=mlflow"])
    assert config.train.report_to == ["mlflow"]
