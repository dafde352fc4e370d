"""`vitune push`: what goes up from a folder (checkpoints, tensorboard logs, progress.json, the pickled
TrainingArguments, rejected rows and hidden files stay home), and every way it cannot go -- a Hub
that cannot be reached, no token, an unfinished run, a folder that is not there -- is one line and
exit 2. Nothing here reaches a real Hub."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest

from vitune.cli import main
from vitune.export.push import plan_upload


def make(folder: Path, *names: str) -> Path:
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("{}", encoding="utf-8")
    return folder


def finished_run(tmp_path: Path) -> Path:
    """The files `vitune push` looks at before it talks to the Hub (a real run's are in test_card.py)."""
    return make(tmp_path / "run", "config.yaml", "summary.json", "adapter_config.json", "adapter_model.safetensors")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def no_login(monkeypatch, tmp_path):
    """No token anywhere: neither in the environment nor in a stored login."""
    from huggingface_hub import constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err.strip()


def test_what_goes_up_leaves_out_checkpoints_logs_progress_pickles_rejects_and_hidden_files(tmp_path):
    folder = make(tmp_path / "run", "README.md", "adapter_config.json", "adapter_model.safetensors", "config.yaml",
                  "summary.json", "metrics.jsonl", "data_report.json", "eval.json", "evals/20260101-000000-qa.json",
                  "tokenizer.json", "tokenizer_config.json", "progress.json", "training_args.bin", "rejects.jsonl",
                  "checkpoint-2/adapter_model.safetensors", "checkpoint-2/trainer_state.json",
                  "checkpoint-4/optimizer.pt", "tensorboard/events.out.tfevents.1", ".checkpoint-staging/x",
                  ".git/config", "evals/.partial-1")
    upload = plan_upload(folder)
    assert upload.files == ["README.md", "adapter_config.json", "adapter_model.safetensors", "config.yaml",
                            "data_report.json", "eval.json", "evals/20260101-000000-qa.json", "metrics.jsonl",
                            "summary.json", "tokenizer.json", "tokenizer_config.json"]
    assert upload.left_out == [".checkpoint-staging/", ".git/", "checkpoint-2/", "checkpoint-4/", "evals/.partial-1",
                               "progress.json", "rejects.jsonl", "tensorboard/", "training_args.bin"]
    assert upload.bytes == 2 * len(upload.files)


def test_a_dry_run_lists_what_would_go_up_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    folder = make(tmp_path / "gguf", "run-q8_0.gguf", "progress.json")
    assert main(["push", str(folder), "--repo", "me/run-gguf", "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"would upload 2 files (0.0 MiB) of {folder} to me/run-gguf (main) at http://127.0.0.1:9:",
        "  README.md", "  run-q8_0.gguf", "left out: progress.json"]
    assert not (folder / "README.md").exists()


def test_an_unreachable_hub_is_one_line_naming_the_endpoint_and_exit_2(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    # online: tests/conftest.py keeps the Hub offline for every other test
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    port = closed_port()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_TOKEN", "dummy")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    run = finished_run(tmp_path)
    assert main(["push", str(run), "--repo", "me/run"]) == 2
    assert re.fullmatch(rf"error: cannot reach the Hub at http://127\.0\.0\.1:{port}: .*Connection refused; "
                        "check your network or HF_ENDPOINT", one_error_line(capsys))
    assert not (run / "README.md").exists()  # nothing written before the Hub answered


def test_no_token_is_one_line_saying_how_to_log_in(tmp_path, capsys, monkeypatch, no_login):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    assert main(["push", str(finished_run(tmp_path)), "--repo", "me/run"]) == 2
    assert one_error_line(capsys) == ("error: no Hugging Face token to push with: log in with `hf auth login`, or set "
                                      "HF_TOKEN to a write token from http://127.0.0.1:9/settings/tokens")


def test_an_unfinished_run_a_missing_folder_a_file_and_a_bad_repo_id_are_one_line_each(tmp_path, capsys):
    run = finished_run(tmp_path)
    (run / "summary.json").unlink()
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    cases = [
        ([str(run)], f"error: {run} is an unfinished run (no summary.json): train it to the end (or resume it) first"),
        ([str(tmp_path / "nope")], f"error: {tmp_path / 'nope'}: folder not found (give a run folder such as "
                                   "runs/quickstart, a merged folder or a folder of GGUF exports)"),
        ([str(tmp_path / "m.gguf")], f"error: {tmp_path / 'm.gguf'} is a file; give the folder it is in ({tmp_path}): "
                                     "its files and card go up together"),
        ([str(make(tmp_path / "empty", "notes.txt"))],
         f"error: {tmp_path / 'empty'}: no model in it (no adapter_config.json, config.json or .gguf file); give a "
         "folder written by vitune train, merge, export gguf or init-model"),
    ]
    for argv, line in cases:
        assert main(["push", *argv, "--repo", "me/run"]) == 2
        assert one_error_line(capsys) == line
    make(run, "summary.json")
    assert main(["push", str(run), "--repo", "me/bad name"]) == 2
    assert one_error_line(capsys).startswith("error: --repo 'me/bad name': not a Hub repository id (")


def test_an_adapter_trained_on_a_local_copy_goes_up_naming_the_hub_model_as_its_base(tmp_path, capsys, monkeypatch):
    import json

    from vitune.export.push import hub_adapter_config

    base = tmp_path / "smollm2"
    base.mkdir()
    (base / "README.md").write_text("---\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\nlicense: apache-2.0\n---\n"
                                    "# SmolLM2\n", encoding="utf-8")
    run = finished_run(tmp_path)
    settings = {"base_model_name_or_path": str(base), "peft_type": "LORA", "r": 8}
    (run / "adapter_config.json").write_text(json.dumps(settings), encoding="utf-8")
    hub, sent = hub_adapter_config(run)
    assert hub == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert json.loads(sent) == {**settings, "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}
    assert json.loads((run / "adapter_config.json").read_text(encoding="utf-8")) == settings  # unchanged here

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    assert main(["push", str(run), "--repo", "me/run", "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"adapter_config.json goes up naming its base HuggingFaceTB/SmolLM2-135M-Instruct (here {base}, a local "
        "copy; the file here is not changed)")

    (base / "README.md").unlink()  # a local base with no Hub id known: the file goes up as it is
    assert hub_adapter_config(run) is None
    (run / "adapter_config.json").write_text(json.dumps({**settings, "base_model_name_or_path": "Qwen/Qwen3-0.6B"}),
                                             encoding="utf-8")
    assert hub_adapter_config(run) is None  # already a Hub id


def test_the_commit_holds_the_planned_files_and_the_rewritten_adapter_config(tmp_path, capsys, monkeypatch):
    """What push hands huggingface_hub (a stand-in HfApi records it; no Hub is reached): the
    repository made or kept, then one commit of the planned files, adapter_config.json's bytes
    naming the Hub base."""
    import json

    import huggingface_hub

    calls = []

    class RecordingApi:
        def __init__(self, endpoint, token):
            calls.append(("api", endpoint, token))

        def create_repo(self, repo, private, exist_ok, repo_type):
            calls.append(("create_repo", repo, private, exist_ok, repo_type))

        def create_commit(self, repo, operations, revision, commit_message):
            calls.append(("create_commit", repo, revision, commit_message,
                          {op.path_in_repo: op.path_or_fileobj for op in operations}))

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_TOKEN", "dummy")
    base = tmp_path / "smollm2"
    base.mkdir()
    (base / "README.md").write_text("---\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\n---\n", encoding="utf-8")
    run = make(tmp_path / "run", "config.yaml", "summary.json", "adapter_model.safetensors", "progress.json")
    (run / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base)}), encoding="utf-8")
    (run / "README.md").write_text("# mine\n", encoding="utf-8")  # a card of the user's own: kept
    assert main(["push", str(run), "--repo", "me/run"]) == 0
    assert calls[:2] == [("api", "http://127.0.0.1:9", "dummy"), ("create_repo", "me/run", False, True, "model")]
    kind, repo, revision, message, files = calls[2]
    assert (kind, repo, revision, message) == ("create_commit", "me/run", "main", "vitune push run")
    assert files == {"README.md": str(run / "README.md"), "adapter_model.safetensors": str(run / "adapter_model.safetensors"),
                     "config.yaml": str(run / "config.yaml"), "summary.json": str(run / "summary.json"),
                     "adapter_config.json": b'{\n  "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"\n}\n'}
    assert len(calls) == 3
