"""Tracebacks the fuzz targets found, each now one line "error: ..." (exit 2), as plain tests.

Each test names the fuzz target that found it; the message is asserted exactly.
"""

from __future__ import annotations

import json
import shutil

from vitune.cli import main

from conftest import write_config, write_jsonl


def run(argv, capsys):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def model_copy(tiny_llama, folder):
    """A tiny model folder whose files can be broken (weights linked, not copied)."""
    folder.mkdir()
    for f in tiny_llama.iterdir():
        if f.suffix == ".safetensors":
            (folder / f.name).symlink_to(f)
        else:
            shutil.copy(f, folder / f.name)
    return folder


# ---------------------------------------------------------------- config-yaml


def test_config_that_is_not_utf8(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"\xff\xfe\x00m")
    assert run(["estimate", path], capsys) == (2, f"error: {path}: not UTF-8 at byte 0; save the config as UTF-8\n")


def test_config_with_a_control_character_is_one_line(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"\x1f")
    assert run(["estimate", path], capsys) == (
        2, f"error: {path}: not valid YAML (unacceptable character #x001f: special characters are not allowed)\n")


# ---------------------------------------------------------------- set-overrides


def test_brackets_in_a_message_are_text_not_markup(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("model: {name_or_path: x}\n", encoding="utf-8")
    assert run(["estimate", path, "--set", "model.name_or_path[/]"], capsys) == (
        2, "error: --set 'model.name_or_path[/]': write it as key.path=value, e.g. --set train.learning_rate=1e-4\n")


# ---------------------------------------------------------------- data-rows, data-convert


def test_unreadable_csv_is_one_line_without_progress_bars(tmp_path, capsys):
    src = tmp_path / "data.csv"
    src.write_text('a,"b\n1,2', encoding="utf-8")
    assert run(["data", "convert", src, tmp_path / "out.jsonl", "--to", "alpaca"], capsys) == (
        2, f"error: {src}: cannot read as csv (An error occurred while generating the dataset)\n")


# ---------------------------------------------------------------- init-model


def test_init_model_out_is_a_file(tmp_path, capsys):
    out = tmp_path / "a_file"
    out.write_text("x")
    assert run(["init-model", "--arch", "llama", "--out", out], capsys) == (
        2, f"error: --out {out}: {out} is a file, not a folder; choose another --out\n")
    assert run(["init-model", "--arch", "llama", "--out", out / "sub"], capsys) == (
        2, f"error: --out {out / 'sub'}: {out} is a file, not a folder; choose another --out\n")


# ---------------------------------------------------------------- tokenizer-folder


def test_tokenizer_config_that_is_null(tiny_llama, tmp_path, capsys):
    folder = model_copy(tiny_llama, tmp_path / "model")
    (folder / "tokenizer_config.json").write_text("null")
    data = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "a", "output": "b"}])
    config = write_config(tmp_path / "run.yaml", model={"name_or_path": str(folder)}, data={"train": [{"path": str(data)}]})
    assert run(["data", "inspect", "--json", config], capsys) == (
        2, f"error: cannot load the tokenizer of '{folder}' (AttributeError: 'NoneType' object has no attribute 'get'); "
        "its tokenizer.json, tokenizer_config.json or config.json may be damaged or hand-edited: restore them from "
        "the original model\n")


def test_tokenizer_model_max_length_that_is_not_a_number(tiny_llama, tmp_path, capsys):
    folder = model_copy(tiny_llama, tmp_path / "model")
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**settings, "model_max_length": "x"}))
    assert run(["chat", folder, "--prompt", "hi", "--max-new-tokens", "1"], capsys) == (
        2, f"error: {folder}: model_max_length = 'x' in tokenizer_config.json must be a whole number of tokens\n")


def test_model_config_with_a_field_of_the_wrong_type(tiny_llama, tmp_path, capsys):
    folder = model_copy(tiny_llama, tmp_path / "model")
    settings = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**settings, "attention_bias": ""}))
    config = write_config(tmp_path / "run.yaml", model={"name_or_path": str(folder)}, data={"train": [{"path": "x.jsonl"}]})
    assert run(["estimate", "--json", config], capsys) == (
        2, f"error: cannot load the config of '{folder}' (StrictDataclassFieldValidationError: Validation error for "
        "field 'attention_bias':); its config.json may be damaged or hand-edited: restore them from the original model\n")


# ---------------------------------------------------------------- run-folder (chat)


def test_chat_with_truncated_weights(tiny_llama, tmp_path, capsys):
    folder = model_copy(tiny_llama, tmp_path / "model")
    weights = folder / "model.safetensors"
    head = weights.read_bytes()[:100]
    weights.unlink()
    weights.write_bytes(head)
    assert run(["chat", folder, "--prompt", "hi", "--max-new-tokens", "1"], capsys) == (
        2, f"error: cannot load the model of '{folder}' (SafetensorError: Error while deserializing header: invalid "
        "header length); its config.json or model weights may be damaged or hand-edited: restore them from the "
        "original model\n")


def test_chat_with_a_config_json_without_model_type(tiny_llama, tmp_path, capsys):
    folder = model_copy(tiny_llama, tmp_path / "model")
    (folder / "config.json").write_text('{"a": 1}')
    assert run(["chat", folder, "--prompt", "hi", "--max-new-tokens", "1"], capsys) == (
        2, f"error: cannot load the model of '{folder}' (ValueError: Unrecognized model in {folder}. Should have a "
        "`model_type` key in its config.json.); its config.json or model weights may be damaged or hand-edited: "
        "restore them from the original model\n")


def test_chat_with_a_damaged_adapter_config(fuzz_world, tmp_path, capsys):
    run_dir = model_copy(fuzz_world.lora_run, tmp_path / "run")
    (run_dir / "adapter_config.json").write_text("{garbage")
    assert run(["chat", run_dir, "--prompt", "hi"], capsys) == (
        2, f"error: {run_dir / 'adapter_config.json'}: not a JSON object (damaged?); restore it from the run, or retrain\n")
    (run_dir / "adapter_config.json").write_text('{"base_model_name_or_path": null}')
    assert run(["chat", run_dir, "--prompt", "hi"], capsys) == (
        2, f"error: {run_dir / 'adapter_config.json'}: base_model_name_or_path is None, not a model; pass --base "
        "MODEL_FOLDER_OR_HUB_ID\n")


def test_chat_sampling_options_out_of_range_are_refused_before_loading(capsys):
    # generate() raised these in its worker thread: a traceback, and the answer stream waited forever
    assert run(["chat", "runs/none", "--temperature", "0.7", "--top-p", "-0.5"], capsys) == (
        2, "error: --top-p -0.5: use a number above 0 and at most 1, such as 0.9\n")
    assert run(["chat", "runs/none", "--temperature", "nan"], capsys) == (
        2, "error: --temperature nan: use 0 (greedy) or a positive number such as 0.7\n")
    assert run(["chat", "runs/none", "--max-new-tokens", "0"], capsys) == (2, "error: --max-new-tokens 0: use at least 1\n")
    for bad in ("0", "nan", "-1", "inf"):
        assert run(["chat", "runs/none", "--repetition-penalty", bad], capsys) == (
            2, f"error: --repetition-penalty {float(bad)}: use a positive number, 1 for none, such as 1.2\n")


def test_an_error_inside_generate_reaches_the_caller(tiny_llama):
    import pytest

    from vitune.data.records import Message
    from vitune.infer.chat import load_chat_model

    bot = load_chat_model(str(tiny_llama))
    with pytest.raises(ValueError, match="top_p"):
        bot.answer([Message("user", "hi")], max_new_tokens=1, temperature=0.7, top_p=-1.0)


def test_convert_from_an_unknown_format(tmp_path, capsys):
    src = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "a", "output": "b"}])
    assert run(["data", "convert", src, tmp_path / "o.jsonl", "--to", "alpaca", "--from", "chatml"], capsys) == (
        2, "error: --from 'chatml': choose one of auto, alpaca, sharegpt, messages, text, preference, unpaired\n")


def test_convert_to_a_folder_or_under_a_file(tmp_path, capsys):
    src = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "a", "output": "b"}])
    (tmp_path / "out.jsonl").mkdir()
    assert run(["data", "convert", src, tmp_path / "out.jsonl", "--to", "sharegpt"], capsys) == (
        2, f"error: {tmp_path / 'out.jsonl'} is a folder; give the path of the output file, e.g. "
        f"{tmp_path / 'out.jsonl' / 'converted.jsonl'}\n")
    assert run(["data", "convert", src, src / "x.jsonl", "--to", "sharegpt"], capsys) == (
        2, f"error: {src / 'x.jsonl'}: {src} is a file, not a folder; choose another output path\n")


def test_a_byte_order_mark_starts_the_file_not_the_first_row(tmp_path):
    from vitune.data.sources import read_rows

    row = {"instruction": "Xin chào", "output": "Chào bạn"}
    (tmp_path / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(row).encode() + b"\r\n")
    (tmp_path / "a.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([row]).encode())
    assert [r.row for r in read_rows(str(tmp_path / "a.jsonl"))] == [row]
    assert [r.row for r in read_rows(str(tmp_path / "a.json"))] == [row]


def test_set_value_nested_too_deeply(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("model: {name_or_path: x}\n", encoding="utf-8")
    assert run(["estimate", path, "--set", "train.seed=" + "[" * 5000], capsys) == (
        2, "error: --set train.seed: the value is nested too deeply to be a config value\n")


def test_config_nested_too_deeply(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("model: " + "[" * 5000, encoding="utf-8")
    assert run(["estimate", path], capsys) == (2, f"error: {path}: nested too deeply to be a run config\n")


def test_output_dir_or_cache_dir_that_is_a_file(tiny_llama, tmp_path, capsys):
    data = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "a", "output": "b"}])
    config = write_config(tmp_path / "run.yaml", model={"name_or_path": str(tiny_llama)},
                          data={"train": [{"path": str(data)}]})
    assert run(["train", config, "--dry-run", "--set", f"train.output_dir={data}"], capsys) == (
        2, f"error: train.output_dir {data} is a file; choose a folder\n")
    code, err = run(["data", "inspect", config, "--json", "--set", f"data.cache_dir={data}"], capsys)
    assert (code, err) == (2, f"error: data.cache_dir {data}: cannot write the prepared-data cache there (Not a "
                              "directory); choose another folder or set data.cache: false\n")


def test_paths_that_look_like_markup_are_printed_as_they_are(tiny_llama, tmp_path, capsys):
    folder = tmp_path / "[" / "y]"  # the path holds "[/y]", rich's closing-tag syntax
    folder.mkdir(parents=True)
    data = write_jsonl(folder / "a.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "no answer"}])
    config = write_config(folder / "run.yaml", model={"name_or_path": str(tiny_llama)},
                          data={"train": [{"path": str(data)}], "on_error": "skip"})
    assert main(["data", "inspect", str(config)]) == 0
    out = " ".join(capsys.readouterr().out.split())  # the table and lines wrap at the terminal's width
    assert f"rejected {data}:2: alpaca row: missing field 'output'" in out
    write_jsonl(data, [{"instruction": "a", "output": "b"}])
    assert main(["data", "convert", str(data), str(folder / "o.jsonl"), "--to", "sharegpt"]) == 0
    assert " ".join(capsys.readouterr().out.split()) == f"wrote 1 sharegpt rows to {folder / 'o.jsonl'}"


def test_a_weight_that_keeps_no_row_says_so(tiny_llama, tmp_path, capsys):
    # was: "no usable training rows in a.jsonl (1 read, 0 rejected)"
    data = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "a", "output": "b"}])
    config = write_config(tmp_path / "run.yaml", model={"name_or_path": str(tiny_llama)},
                          data={"train": [{"path": str(data), "weight": 0.4}]})
    assert run(["data", "inspect", config, "--json"], capsys) == (
        2, f"error: {data}: weight 0.4 keeps none of its 1 usable row(s); raise its weight in data.train\n")


def test_control_characters_in_a_message_stay_on_one_line(tmp_path, capsys):
    assert run(["train", "--dry-run", "a\nb.yaml"], capsys) == (
        2, "error: config file not found: a\\nb.yaml (give the path of a YAML file; `vitune examples list` shows ready "
           "ones, `vitune examples copy quickstart .` puts one here)\n")


def test_cache_dir_with_a_nul(tiny_llama, tmp_path, capsys):
    data = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "a", "output": "b"}])
    config = write_config(tmp_path / "run.yaml", model={"name_or_path": str(tiny_llama)}, data={"train": [{"path": str(data)}]})
    code, err = run(["data", "inspect", config, "--json", "--set", "data.cache_dir=\x00"], capsys)
    assert (code, err) == (2, "error: data.cache_dir \\x00: cannot write the prepared-data cache there (embedded null "
                              "byte); choose another folder or set data.cache: false\n")


def test_chat_with_a_generation_config_whose_token_id_is_not_one(tiny_llama, tmp_path, capsys):
    folder = model_copy(tiny_llama, tmp_path / "model")
    settings = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**settings, "bos_token_id": {}}))
    assert run(["chat", folder, "--prompt", "hi", "--max-new-tokens", "1"], capsys) == (
        2, f"error: {folder}: generation_config.json has bos_token_id = {{}}, not a token id (0 to 4095); fix it or "
        "delete generation_config.json\n")


# ---------------------------------------------------------------- argv


def test_a_tilde_path_naming_no_user_is_not_found(tmp_path, capsys, monkeypatch):
    # "~0" names the home of a user "0"; pathlib raised RuntimeError where no such user exists
    monkeypatch.chdir(tmp_path)
    assert run(["chat", "--max-new-tokens", "1", "~0"], capsys) == (
        2, "error: model not found: ~0 (model.name_or_path must be a local model folder or a Hub id such as Viet-Mistral/Vistral-7B-Chat)\n")
