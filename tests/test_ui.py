"""The web UI's server side without a browser: the form -> config -> CLI validation path, the
training process it starts (a run that dies, a folder in use), progress.json, the language
default, and the inspection figures it shares with `vitune data inspect --json`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from conftest import ROOT, train_run, write_config, write_jsonl
from vitune.cli import main
from vitune.ui import forms
from vitune.ui.text import TEXT, default_language

pytest.importorskip("gradio")


def values(**changes) -> list:
    v = dict(forms.DEFAULTS, **changes)
    return [v[k] for k in forms.FIELDS]


def test_the_form_writes_the_config_a_user_would_write():
    raw = forms.raw_config(dict(forms.DEFAULTS, **{"method.type": "full", "train.max_steps": 8.0,
                                                   "data.train": "data/alpaca_vi.jsonl, data/sharegpt_vi.jsonl"}))
    assert raw == {
        "model": {"name_or_path": "runs/smollm2-135m-instruct", "template": "auto"},
        "train": {"stage": "sft", "epochs": 1.0, "max_steps": 8, "learning_rate": 1e-3, "micro_batch_size": 1,
                  "gradient_accumulation": 1, "logging_steps": 5, "output_dir": "runs/ui-run", "overwrite": False},
        "method": {"type": "full"},  # no lora or quantization settings: the config refuses them with full
        "data": {"train": [{"path": "data/alpaca_vi.jsonl"}, {"path": "data/sharegpt_vi.jsonl"}], "max_length": 1024,
                 "packing": True, "val_size": 20},
    }
    qlora = forms.raw_config(dict(forms.DEFAULTS, **{"method.type": "qlora"}))["method"]
    assert qlora == {"type": "qlora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0}, "quantization": {"bits": 4}}


def test_the_data_field_takes_paths_as_data_train_does(tiny_llama, tmp_path):
    assert forms.data_paths(f"{tmp_path}\n\n data/x.jsonl , org/dataset ") == [str(tmp_path), "data/x.jsonl", "org/dataset"]
    assert forms.data_paths(None) == [] and forms.data_paths(True) == ["True"]
    good = {"model.name_or_path": str(tiny_llama), "data.max_length": 512}
    empty = tmp_path / "empty"
    empty.mkdir()
    checked = forms.check({**forms.DEFAULTS, **good, "data.train": str(empty)})
    assert (checked.field, checked.message) == (
        "data.train", f"data.train: {empty}: folder has no data files (.json, .jsonl, .csv, .parquet, .arrow, .txt)")
    write_jsonl(empty / "rows.jsonl", [{"instruction": "Thủ đô của Việt Nam là gì?", "output": "Hà Nội."}])
    checked = forms.check({**forms.DEFAULTS, **good, "data.train": str(empty)})  # a folder of data files
    assert checked.message == "" and checked.config.data.train[0].path == str(empty)
    assert forms.check({**forms.DEFAULTS, **good, "data.train": str(tmp_path / "no.jsonl")}).message == (
        f"data.train: file not found: {tmp_path / 'no.jsonl'}")


def test_each_problem_is_the_cli_message_against_its_field(tiny_llama, monkeypatch):
    from vitune.config import validate_config
    from vitune.errors import ConfigError

    monkeypatch.chdir(ROOT)
    good = {"model.name_or_path": str(tiny_llama), "data.train": "data/alpaca_vi.jsonl", "data.max_length": 512}
    checked = forms.check(dict(forms.DEFAULTS, **good))
    assert (checked.field, checked.message) == (None, "") and checked.config.train.learning_rate == 1e-3
    assert checked.yaml.startswith("model:\n  name_or_path: ")

    bad = dict(forms.DEFAULTS, **good, **{"train.learning_rate": 0})
    with pytest.raises(ConfigError) as cli:
        validate_config(forms.raw_config(bad), source="form")
    assert (forms.check(bad).field, forms.check(bad).message) == ("train.learning_rate", str(cli.value))
    assert forms.check(bad).message == "form: train.learning_rate = 0: input should be greater than 0"

    cases = {
        "model.name_or_path": {"model.name_or_path": "runs/no-such-model"},
        "data.train": {"data.train": "data/no_such_file.jsonl"},
        "data.max_length": {"data.max_length": 999_999},  # beyond the model's max_position_embeddings (2048)
        "method.lora.r": {"method.lora.r": -4},
        "train.epochs": {"train.epochs": None},  # an emptied number box
        "train.micro_batch_size": {"train.micro_batch_size": "many"},
    }
    for field, change in cases.items():
        checked = forms.check({**forms.DEFAULTS, **good, **change})
        assert checked.config is None and checked.field == field, (field, checked.message)
        assert "\n" not in checked.message and checked.message
    assert forms.check({**forms.DEFAULTS, **good, "data.max_length": 999_999}).message == (
        "data.max_length = 999999 is longer than the model's max_position_embeddings (2048); lower it to at most 2048")


def test_the_check_button_fills_errors_estimate_advice_and_yaml(tiny_llama, monkeypatch):
    from vitune.ui.app import Ui

    monkeypatch.chdir(ROOT)
    ui = Ui(Path("runs"), "en")
    good = {"model.name_or_path": str(tiny_llama), "data.train": "data/alpaca_vi.jsonl", "data.max_length": 512,
            "train.learning_rate": 5e-2}
    out = ui.check_form("en", "CPU", *values(**good))
    errors, general, estimate, advice, yaml_text = out[:len(forms.FIELDS)], *out[len(forms.FIELDS):]
    assert errors == [""] * len(forms.FIELDS) and general == "The config is valid."
    assert "| **peak on CPU** |" in estimate and "tokens/s" in estimate
    assert advice.startswith("- train.learning_rate: 0.05 is outside 1e-6..1e-3")
    assert "learning_rate: 0.05" in yaml_text
    out = ui.check_form("vi", "CPU", *values(**dict(good, **{"method.lora.alpha": 0})))
    at = forms.FIELDS.index("method.lora.alpha")
    assert out[at] == "**lỗi:** form: method.lora.alpha = 0: input should be greater than 0"
    assert [e for i, e in enumerate(out[:len(forms.FIELDS)]) if i != at] == [""] * (len(forms.FIELDS) - 1)
    assert out[len(forms.FIELDS) + 3] == ""  # no YAML for a config that does not validate


def wait_for(job, seconds=120):
    code = job.wait(seconds)
    assert code is not None, "the training process did not end"
    return code


def test_a_training_process_that_dies_shows_its_last_lines_and_exit_code(tiny_llama, tmp_path, monkeypatch):
    from vitune.ui.app import Ui

    monkeypatch.chdir(ROOT)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "Câu hỏi không có đáp án"}] * 3)
    ui = Ui(tmp_path / "runs", "en")
    form = values(**{"model.name_or_path": str(tiny_llama), "data.train": str(bad), "data.max_length": 256,
                     "data.val_size": 0, "train.output_dir": str(tmp_path / "runs" / "dies")})
    assert ui.start("en", "CPU", *form).startswith("running: `vitune train ")
    assert wait_for(ui.job) == 2
    status, log, *plots = ui.poll("en")
    assert status.startswith("**failed (exit code 2)**")
    last = log.splitlines()[-1]
    assert last.startswith("error: ") and f"{bad}:1" in last and "Traceback" not in log
    assert plots == [None, None, None, None]


def test_two_runs_into_one_folder_are_refused(tiny_llama, tmp_path, monkeypatch):
    from vitune.train.run_lock import output_dir_lock
    from vitune.ui.app import Ui

    monkeypatch.chdir(ROOT)
    ui = Ui(tmp_path / "runs", "en")
    out = tmp_path / "runs" / "busy"
    form = values(**{"model.name_or_path": str(tiny_llama), "data.train": "data/alpaca_vi.jsonl",
                     "data.max_length": 256, "data.val_size": 0, "train.max_steps": 400, "train.output_dir": str(out),
                     "method.type": "full"})
    with output_dir_lock(out):  # another vitune run holds the folder
        message = ui.start("en", "CPU", *form)
    assert message.startswith(f"**error:** train.output_dir {out} is in use by another vitune run (PID ")
    assert ui.job is None
    ui.start("en", "CPU", *form)
    try:
        assert ui.start("en", "CPU", *form) == f"**error:** {TEXT['already_running'][0]}"
        deadline = time.time() + 120
        while not (out / "progress.json").is_file() and time.time() < deadline:
            time.sleep(0.5)
        assert ui.stop("en") == TEXT["stop_sent"][0]  # Ctrl-C: the run checkpoints and ends
        assert wait_for(ui.job) == 130
    finally:
        if ui.job.running:
            ui.job.process.kill()
    status, log, *_ = ui.poll("en")
    assert status.startswith("**stopped (exit code 130)**")
    progress = json.loads((out / "progress.json").read_text())
    assert progress["status"] == "stopped" and 0 < progress["step"] < 400 and progress["max_steps"] == 400
    assert any(p.name.startswith("checkpoint-") for p in out.iterdir())
    assert ui.stop("en") == TEXT["nothing_to_stop"][0]

    # Resume: the newest checkpoint, trained on to the form's (here lowered) max_steps
    step = progress["step"]
    form[forms.FIELDS.index("train.max_steps")] = step + 2
    assert ui.start("en", "CPU", *form, resume=True).endswith(" --set train.resume=auto")
    assert wait_for(ui.job) == 0
    assert f"resuming from {out / f'checkpoint-{step}'}" in ui.job.log().replace("\n", "")
    done = json.loads((out / "summary.json").read_text())
    assert done["steps"] == step + 2
    assert ui.poll("en")[0].startswith(f"**finished** · `{out}` · step {step + 2} / {step + 2}")


def test_progress_json_says_where_a_run_is(tiny_llama, tmp_path):
    run = train_run(tmp_path, tiny_llama, "run")
    progress = json.loads((run / "progress.json").read_text())
    assert {k: progress[k] for k in ("status", "step", "max_steps")} == {"status": "finished", "step": 2, "max_steps": 2}
    assert progress["eta_s"] == 0.0 and progress["elapsed_s"] > 0


def test_inspect_json_has_the_formats_and_the_packing_efficiency(tiny_llama, tmp_path, capsys):
    from vitune.config import load_config
    from vitune.data.packing import pack_rows, packing_efficiency
    from vitune.train.inspection import inspect_data

    rows = [{"instruction": "Thủ đô của Việt Nam là gì?", "output": "Hà Nội."},
            {"conversations": [{"from": "human", "value": "Xin chào"}, {"from": "gpt", "value": "Chào bạn!"}]},
            {"instruction": "Một dòng thiếu câu trả lời"}]
    data = write_jsonl(tmp_path / "mixed.jsonl", rows)
    config = write_config(tmp_path / "c.yaml", model={"name_or_path": str(tiny_llama)},
                          data={"train": [{"path": str(data)}], "max_length": 64, "on_error": "skip"})
    assert main(["data", "inspect", str(config), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["formats"] == {str(data): {"alpaca": 2, "sharegpt": 1}}  # the third row is read, then rejected
    seen = inspect_data(load_config(config))
    assert stats["packing_efficiency"] == round(packing_efficiency(pack_rows(seen.rows, 64), 64), 4)
    assert stats["packing_efficiency"] == round(sum(len(r.input_ids) for r in seen.rows) / 64, 4)  # one bin


def test_the_language_follows_the_system_locale():
    assert default_language({"LANG": "vi_VN.UTF-8"}) == "vi"
    assert default_language({"LANG": "en_US.UTF-8"}) == "en"
    assert default_language({"LC_ALL": "vi_VN", "LANG": "en_US.UTF-8"}) == "vi"
    assert all(english and vietnamese for english, vietnamese in TEXT.values())


def test_vitune_ui_refuses_a_bad_language_and_a_port_in_use_in_one_line(capsys):
    import socket

    assert main(["ui", "--lang", "fr"]) == 2
    assert capsys.readouterr().err.strip() == "error: --lang fr: choose auto, vi or en"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert main(["ui", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and str(port) in err and len(err.splitlines()) == 1
