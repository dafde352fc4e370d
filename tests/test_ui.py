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
from vitune.ui import forms, jobs
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
        "train": {"stage": "sft", "epochs": 1.0, "max_steps": 8, "learning_rate": 2e-4, "micro_batch_size": 1,
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
    assert (checked.field, checked.message) == (None, "") and checked.config.train.learning_rate == 2e-4
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
    assert advice.startswith("- train.learning_rate: 5e-2 is outside 5e-5..5e-4, the usual range for LoRA")
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
    assert [p["visible"] for p in plots[:6]] == [False] * 6 and plots[6] == "Loss: no points yet."


@pytest.mark.slow  # CI's 20-minute budget (fresh-clone durations, 2026-12-08); make test-all runs it
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
        while not (jobs.progress(out) or {}).get("step") and time.time() < deadline:  # stop while training
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


def test_the_learning_rate_follows_the_method_unless_the_user_typed_one():
    assert forms.DEFAULTS["train.learning_rate"] == 2e-4
    assert [forms.learning_rate_for(m, 2e-4) for m in ("full", "qlora", "lora")] == [2e-5, 2e-4, 2e-4]
    assert forms.learning_rate_for("lora", 2e-5) == 2e-4 and forms.learning_rate_for("full", None) == 2e-5
    assert forms.learning_rate_for("full", 5e-4) == 5e-4  # typed by the user: kept


def test_check_runs_the_start_up_checks_of_vitune_train_and_says_them_in_the_page_words(tiny_llama, tmp_path,
                                                                                       monkeypatch):
    from vitune.ui.app import Ui

    monkeypatch.chdir(ROOT)
    out = tmp_path / "old-run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    form = {"model.name_or_path": str(tiny_llama), "data.train": "data/alpaca_vi.jsonl", "data.max_length": 256,
            "train.output_dir": str(out)}
    checked = forms.check(dict(forms.DEFAULTS, **form))
    assert (checked.field, checked.message) == ("train.output_dir", (
        f"train.output_dir {out} already exists and is not empty; choose another folder "
        "or set train.overwrite: true (e.g. --set train.overwrite=true)"))
    at = forms.FIELDS.index("train.output_dir")
    ui = Ui(tmp_path / "runs", "en", state_dir=tmp_path / "state")
    assert ui.check_form("en", "CPU", *values(**form))[at] == (
        f"**error:** train.output_dir {out} already exists and is not empty; choose another folder "
        "or tick “Replace the folder if it exists”")
    assert ui.check_form("vi", "CPU", *values(**form))[at] == (
        f"**lỗi:** train.output_dir {out} đã có và không trống; hãy chọn thư mục khác "
        "hoặc đánh dấu “Ghi đè thư mục nếu đã có”")
    assert ui.start("en", "CPU", *values(**form)) == ui.check_form("en", "CPU", *values(**form))[at]
    assert ui.job is None
    assert forms.check(dict(forms.DEFAULTS, **form, **{"train.overwrite": True})).message == ""


def test_a_cli_flag_in_a_message_becomes_the_page_control_that_sets_it():
    from vitune.ui.text import page_words

    message = "stopped at step 4; resume with: vitune train CONFIG --set train.resume=auto"
    assert page_words(message, "en") == "stopped at step 4; resume with: press “Resume”"
    assert page_words(message, "vi") == "stopped at step 4; resume with: bấm “Tiếp tục”"
    assert page_words("data.train: file not found: a.jsonl", "vi") == "data.train: không tìm thấy tệp: a.jsonl"
    assert page_words("model.name_or_path: no such folder", "vi") == "model.name_or_path: no such folder"


def test_generated_configs_go_to_the_page_state_folder_not_the_runs_folder(tiny_llama, tmp_path, monkeypatch):
    from vitune.ui.app import Ui
    from vitune.ui.jobs import default_state_dir

    assert default_state_dir({"VITUNE_UI_STATE_DIR": "/srv/ui", "XDG_STATE_HOME": "/x"}) == Path("/srv/ui")
    assert default_state_dir({"XDG_STATE_HOME": "/x"}) == Path("/x/vitune/ui")
    assert default_state_dir({"HOME": "/home/u"}) == Path.home() / ".local/state/vitune/ui"
    monkeypatch.chdir(ROOT)
    root = tmp_path / "runs"
    ui = Ui(root, "en", state_dir=tmp_path / "state")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "Câu hỏi không có đáp án"}])
    form = values(**{"model.name_or_path": str(tiny_llama), "data.train": str(bad), "data.max_length": 256,
                     "data.val_size": 0, "train.output_dir": str(root / "r")})
    assert ui.start("en", "CPU", *form) == f"running: `vitune train {tmp_path / 'state' / 'r.yaml'}`"
    wait_for(ui.job)
    assert (tmp_path / "state" / "r.yaml").read_text().startswith("model:\n")
    assert not (root / ".vitune-ui").exists()


def test_the_estimate_shows_the_predicted_speed_as_a_range_in_the_page_language(tiny_llama, monkeypatch):
    from types import SimpleNamespace

    import vitune.models.estimate

    monkeypatch.chdir(ROOT)
    r = SimpleNamespace(base_weights=0.25, lora_params=0.01, gradients=0.01, optimizer_states=0.02, activations=0.5,
                        logits_loss=0.125, device="CPU", total=0.915, trainable_params=1234567, total_params=9876543,
                        predicted_tokens_per_s=27.0, tokens_per_s_range=(20.2, 35.4))
    monkeypatch.setattr(vitune.models.estimate, "estimate", lambda *a: r)
    checked = forms.check(dict(forms.DEFAULTS, **{"model.name_or_path": str(tiny_llama),
                                                  "data.train": "data/alpaca_vi.jsonl", "data.max_length": 256}))
    assert forms.estimate_text(checked, "CPU", "en").splitlines() == [
        "| part | GiB |", "|---|---:|", "| base weights | 0.25 |", "| LoRA adapter | 0.01 |", "| gradients | 0.01 |",
        "| optimizer states | 0.02 |", "| activations | 0.50 |", "| logits + loss | 0.12 |",
        "| **peak on CPU** | **0.92** |", "",
        "trainable 1,234,567 of 9,876,543 parameters; predicted 20–35 tokens/s"]
    vi = forms.estimate_text(checked, "CPU", "vi").splitlines()
    assert vi[0] == "| thành phần | GiB |" and vi[8] == "| **đỉnh trên CPU** | **0.92** |"
    assert vi[-1] == "huấn luyện 1,234,567 trên 9,876,543 tham số; dự đoán 20–35 token/giây"
    del r.tokens_per_s_range  # an Estimate without a range: its single figure
    assert forms.estimate_text(checked, "CPU", "en").endswith("predicted 27 tokens/s")


def test_the_status_shows_the_phase_and_ignores_an_earlier_runs_files(tmp_path):
    import subprocess
    import sys

    from vitune.ui.app import Ui
    from vitune.ui.jobs import TrainingJob

    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 3, "loss": 2.5}\n')
    (out / "progress.json").write_text(json.dumps({"phase": "finished", "status": "finished", "step": 3,
                                                   "max_steps": 3, "eta_s": 0, "started": time.time() - 60}))
    ui = Ui(tmp_path, "en", state_dir=tmp_path / "state")
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    ui.job = TrainingJob(tmp_path / "c.yaml", out, process, started=time.time())
    try:
        status, log, *plots = ui.poll("en")
        assert status == f"**running** · **starting** · `{out}`"  # not the earlier run's step 3 / 3
        assert [p["visible"] for p in plots[:6]] == [False] * 6
        assert plots[6:] == ["Loss: no points yet.", "Learning rate: no points yet.", "Tokens/s: no points yet.",
                             "Accuracy and margin (rm, dpo): no points yet.", "Mean reward (rl): no points yet.",
                             "KL to the reference (rl): no points yet."]
        (out / "progress.json").write_text(json.dumps({"phase": "loading model", "started": time.time()}))
        assert ui.poll("vi")[0] == f"**đang chạy** · **đang tải mô hình** · `{out}`"
        (out / "metrics.jsonl").write_text('{"step": 1, "loss": 2.5, "learning_rate": 0.0002}\n')
        plots = list(ui.poll("vi")[2:])
        assert plots[0]["value"].to_dict("records") == [{"step": 1, "value": 2.5, "series": "loss"}]
        assert (plots[0]["visible"], plots[0]["x_title"], plots[0]["y_title"], plots[0]["color_title"]) == (
            True, "bước", "giá trị", "đường")
        assert plots[6:] == ["", "", "Token/giây: chưa có điểm nào.", "Độ chính xác và biên (rm, dpo): chưa có điểm nào.",
                             "Phần thưởng trung bình (rl): chưa có điểm nào.",
                             "KL so với mô hình tham chiếu (rl): chưa có điểm nào."]
    finally:
        process.kill()
        process.wait()


def test_an_rl_run_shows_its_reward_and_kl_curves_and_ppos_value_loss():
    from vitune.ui.app import _plots

    found = {"reward": [(1, 0.25), (2, 0.5)], "eval_reward": [(0, 0.1), (2, 0.4)], "kl": [(1, 0.0), (2, 0.03)],
             "loss": [(1, 1.5)], "value_loss": [(1, 0.7)]}
    plots = _plots(found, "en")
    loss, reward, kl = plots[0], plots[4], plots[5]
    assert loss["value"].to_dict("records") == [{"step": 1, "value": 1.5, "series": "loss"},
                                                {"step": 1, "value": 0.7, "series": "value_loss"}]
    assert reward["value"].to_dict("records") == [
        {"step": 1, "value": 0.25, "series": "reward"}, {"step": 2, "value": 0.5, "series": "reward"},
        {"step": 0, "value": 0.1, "series": "eval_reward"}, {"step": 2, "value": 0.4, "series": "eval_reward"}]
    assert (reward["visible"], reward["colors_in_legend"]) == (True, ["reward", "eval_reward"])
    assert kl["value"].to_dict("records") == [{"step": 1, "value": 0.0, "series": "kl"},
                                              {"step": 2, "value": 0.03, "series": "kl"}]
    assert plots[6:] == ["", "Learning rate: no points yet.", "Tokens/s: no points yet.",
                         "Accuracy and margin (rm, dpo): no points yet.", "", ""]


def test_tables_and_the_data_summary_are_in_the_page_language(tmp_path):
    from vitune.ui.app import show_inspection, table

    rows = [{"run": "a", "final loss": 1.5, "tokens/s": 30.0, "acc": 0.5}]
    assert list(table(rows, list(rows[0]), "vi").columns) == ["lần chạy", "loss cuối", "token/giây", "acc"]
    stats = {"rows_read": 3, "rows_kept": 3, "rows_rejected": 0, "rejected_by_reason": {}, "rows_truncated": 0,
             "train_rows": 3, "eval_rows": 0, "total_tokens": 1200, "trained_token_fraction": 0.5,
             "length_percentiles": {}, "packing_efficiency": None, "formats": {"/d/a.jsonl": {"alpaca": 3}},
             "template": "auto", "template_notices": ["it adds no system prompt"]}
    summary, rejected, no_rejected, error, shown = show_inspection({"stats": stats, "rows": [], "rejected": []}, "vi")
    assert summary.splitlines()[-4:] == ["| định dạng: a.jsonl | alpaca 3 |",
                                         "| mẫu hội thoại | chat_template của tokenizer |",
                                         "", "> lưu ý: it adds no system prompt"]
    assert (rejected["visible"], no_rejected, error, shown) == (False, "Không có dòng nào bị loại.", "", [])
    summary = show_inspection({"stats": dict(stats, template="chatml"), "rows": [], "rejected": []}, "en")[0]
    assert "| template | chatml |" in summary
