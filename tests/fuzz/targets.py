"""The registry of fuzz targets: one `FuzzTarget` per thing a user controls.

A target draws a case with its `strategy` (plain data), and its `run(case, ws)` writes the
case's files into the workspace `ws` (a fresh folder per case) and returns the Outcome of
`ws.cli(argv)`. The property test in test_fuzz.py runs every target and checks
`check_user_facing` on the outcome, plus the target's own `check` if it has one.

A new command joins by adding an entry to TARGETS (and, if it reads a new kind of file, a
strategy for that file in strategies.py). Keep cases cheap: `train --dry-run` and
`data inspect --json` load the tokenizer and prepare the data but train nothing.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import yaml
from hypothesis import strategies as st

from fuzz import strategies as s
from fuzz.checker import Outcome, check_data_counts, run_cli


@dataclass(frozen=True)
class World:
    """What every case may use, built once per session."""

    model: Path  # tiny Llama model + tokenizer folder
    lora_run: Path  # a finished LoRA run folder (adapter + tokenizer + config.yaml + summary.json)
    full_run: Path  # a finished full fine-tuning run folder


GOOD_ROWS = [
    {"instruction": "Thủ đô của Việt Nam là gì?", "input": "", "output": "Hà Nội."},
    {"conversations": [{"from": "human", "value": "1+1?"}, {"from": "gpt", "value": "2"}]},
    {"instruction": "Dịch sang tiếng Anh.", "input": "Xin chào", "output": "Hello"},
]


class Workspace:
    """A fresh folder for one case, with the placeholders of strategies.py filled in."""

    def __init__(self, root: Path, world: World):
        self.root, self.world = root, world
        self.data = self.write("data.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in GOOD_ROWS))
        self.out = root / "out"
        self.places = {"@MODEL@": str(world.model), "@DATA@": str(self.data), "@OUT@": str(self.out),
                       "@CONFIG@": str(root / "valid.yaml"), "@BADCONFIG@": str(root / "bad.yaml"),
                       "@MISSING@": str(root / "missing.yaml")}
        self.write("valid.yaml", self.fill(yaml.safe_dump(s.valid_config())))
        self.write("bad.yaml", "model: {name_or_path: 3}\ndata: {train: []}\n")

    def fill(self, text: str) -> str:
        for mark, value in self.places.items():
            text = text.replace(mark, value)
        return text

    def write(self, name: str, contents: str | bytes) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(contents, str):
            path.write_text(contents, encoding="utf-8")
        else:
            path.write_bytes(contents)
        return path

    def config(self, cfg: dict, name: str = "run.yaml") -> Path:
        return self.write(name, self.fill(yaml.safe_dump(cfg, allow_unicode=True)))

    def cli(self, argv: list[str], stdin: str = "") -> Outcome:
        return run_cli([self.fill(a) for a in argv], self.root, stdin)


@dataclass(frozen=True)
class FuzzTarget:
    name: str
    strategy: st.SearchStrategy
    run: Callable[[Any, Workspace], Outcome]
    examples: int = 20  # default cases per run; VITUNE_FUZZ_EXAMPLES overrides it
    check: Optional[Callable[[Outcome, Any], None]] = None


# ---------------------------------------------------------------- data rows

def run_data_rows(case, ws: Workspace) -> Outcome:
    (name, contents), data, command = case
    ws.write(name, contents)
    data = {**data, "train": [{**spec, "path": str(ws.root / name)} for spec in data["train"]]}
    if "eval" in data:
        data["eval"] = [{**spec, "path": str(ws.root / name)} for spec in data["eval"]]
    config = ws.config({**s.valid_config(), "data": data})
    return ws.cli([*command, str(config)])


def check_rows(outcome: Outcome, case) -> None:
    _, data, command = case
    if data["on_error"] == "skip" and "--json" in command:
        check_data_counts(outcome)


DATA_COMMANDS = st.sampled_from([["data", "inspect", "--json"]] * 4 + [["data", "inspect", "-n", "2"], ["train", "--dry-run"]])


# ---------------------------------------------------------------- data convert

def run_convert(case, ws: Workspace) -> Outcome:
    (name, contents), to, source_format, force, dst = case
    src = ws.write(name, contents)
    ws.write("a_file", "x")
    (ws.root / "dir.jsonl").mkdir()
    argv = ["data", "convert", str(src), str(ws.root / dst), "--to", to]
    if source_format is not None:
        argv += ["--from", source_format]
    return ws.cli(argv + (["--force"] if force else []))


# ---------------------------------------------------------------- configs and overrides

CONFIG_COMMANDS = st.sampled_from([["estimate", "--json"], ["estimate"], ["data", "inspect", "--json"], ["train", "--dry-run"]])


def run_config_text(case, ws: Workspace) -> Outcome:
    text, command = case
    path = ws.write("run.yaml", ws.fill(text.decode("utf-8", errors="surrogateescape")).encode("utf-8", errors="surrogateescape"))
    return ws.cli([*command, str(path)])


def run_overrides(case, ws: Workspace) -> Outcome:
    overrides, command = case
    argv = [*command, "@CONFIG@"]
    for item in overrides:
        argv += ["--set", item]
    return ws.cli(argv)


# ---------------------------------------------------------------- argument vectors

def _guarded(argv: list[str]) -> list[str]:
    """Keep a random argv from doing real work: no training (train always gets --dry-run), no
    `accelerate launch` (--nproc above 1), no tiny model built, short chat answers."""
    from vitune.models.tiny import TINY_FAMILIES

    def too_big(token: str) -> bool:
        try:
            return int(token) > 1
        except ValueError:
            return False

    out = [t for t in argv if t != "--" and not too_big(t) and t not in TINY_FAMILIES]
    for command, extra in (("train", ["--dry-run"]), ("init-model", ["--arch", "gpt9"]), ("chat", ["--max-new-tokens", "1"])):
        if command in out:
            i = out.index(command) + 1
            out[i:i] = extra
    return out


def run_argv(case, ws: Workspace) -> Outcome:
    argv, stdin = case
    return ws.cli(_guarded(argv), stdin)


# ---------------------------------------------------------------- tokenizer folders

TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json"]


@st.composite
def tokenizer_folder_case(draw):
    names = draw(st.lists(st.sampled_from(TOKENIZER_FILES), min_size=1, max_size=2, unique=True))
    originals = {n: (WORLD_FILES.get(n) or b"{}") for n in names}
    breaks = {n: draw(s.broken_file(n, originals[n])) for n in names}
    command = draw(st.sampled_from([["data", "inspect", "--json"], ["data", "inspect", "--json"], ["estimate", "--json"],
                                    ["chat", "--prompt", "Xin chào", "--max-new-tokens", "2"]]))
    return breaks, draw(st.sampled_from(s.TEMPLATES)), command


# file contents of the tiny model folder, filled in once by the session fixture
WORLD_FILES: dict[str, bytes] = {}


def copy_model(src: Path, dst: Path) -> Path:
    """A model folder whose small files are copies (to break) and whose weights are links."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            (dst / f.name).symlink_to(f)
        elif f.is_file():
            shutil.copy(f, dst / f.name)
    return dst


def break_files(folder: Path, breaks: dict) -> None:
    for name, spec in breaks.items():
        path = folder / name
        original = path.read_bytes() if path.exists() else b""
        new = s.apply_break(spec, original)
        if path.exists() or path.is_symlink():
            path.unlink()
        if new is not None:
            path.write_bytes(new)


def run_tokenizer_folder(case, ws: Workspace) -> Outcome:
    breaks, template, command = case
    folder = copy_model(ws.world.model, ws.root / "model")
    break_files(folder, breaks)
    if command[0] == "chat":
        return ws.cli([command[0], str(folder), *command[1:], "--template", template])
    cfg = s.valid_config()
    cfg["model"] = {"name_or_path": str(folder), "template": template}
    return ws.cli([*command, str(ws.config(cfg))])


# ---------------------------------------------------------------- run folders for chat

RUN_FILES = ["adapter_model.safetensors", "adapter_config.json", "summary.json", "config.yaml", "tokenizer.json",
             "tokenizer_config.json", "model.safetensors", "config.json"]


@st.composite
def run_folder_case(draw):
    kind = draw(st.sampled_from(["lora", "full"]))
    names = draw(st.lists(st.sampled_from(RUN_FILES), max_size=2, unique=True))
    breaks = {n: draw(s.broken_file(n, WORLD_FILES.get(f"{kind}/{n}", b"{}"))) for n in names}
    options = draw(st.fixed_dictionaries({}, optional={
        "--temperature": st.sampled_from(["0", "0.7", "-1", "1e9", "nan"]),
        "--top-p": st.sampled_from(["0.9", "0", "-0.5", "2", "1"]),
        "--max-new-tokens": st.sampled_from(["1", "0", "-3"]),
        "--template": st.sampled_from(s.TEMPLATES + ["nosuch"]),
        "--system": s.words,
        "--base": st.sampled_from(["@MODEL@", "@MISSING@", "org/not-here"]),
    }))
    prompt = draw(st.none() | s.words)
    return kind, breaks, options, prompt


def run_run_folder(case, ws: Workspace) -> Outcome:
    kind, breaks, options, prompt = case
    folder = copy_model(ws.world.lora_run if kind == "lora" else ws.world.full_run, ws.root / "run")
    break_files(folder, breaks)
    argv = ["chat", str(folder)]
    options = {"--max-new-tokens": "2", **options}
    for key, value in options.items():
        argv += [key, value]
    if prompt is not None:
        return ws.cli(argv + ["--prompt", prompt])
    return ws.cli(argv, stdin="Xin chào\n/reset\n\n/exit\n")


def run_export_gguf(case, ws: Workspace) -> Outcome:
    """`vitune export gguf` on a run folder with broken files (a LoRA run is merged first)."""
    (kind, breaks, _options, _prompt), quant = case
    folder = copy_model(ws.world.lora_run if kind == "lora" else ws.world.full_run, ws.root / "run")
    break_files(folder, breaks)
    return ws.cli(["export", "gguf", str(folder), "--out", str(ws.root / "out.gguf"), "--quant", quant])


# ---------------------------------------------------------------- init-model

def run_init_model(case, ws: Workspace) -> Outcome:
    arch, out = case
    ws.write("a_file", "x")
    return ws.cli(["init-model", "--arch", arch, "--out", str(ws.root / out)])


INIT_OUT_BAD = ["a_file", "a_file/sub"]


# ---------------------------------------------------------------- .gguf model files

_GGUF_BASE: list[bytes] = []


def write_llama_gguf(path: Path, embedding_length: int = 8, architecture: str = "llama") -> Path:
    """A small well-formed GGUF (llama unless told): metadata, a 4-token vocabulary, token_embd.weight only."""
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(embedding_length)
    writer.add_head_count(2)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["a", "b", "ab", "<s>"])
    writer.add_token_merges(["a b"])
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_base() -> bytes:
    """The bytes fuzz cases cut and flip: write_llama_gguf's file."""
    if not _GGUF_BASE:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            _GGUF_BASE.append(write_llama_gguf(Path(tmp) / "m.gguf").read_bytes())
    return _GGUF_BASE[0]


@st.composite
def gguf_case(draw):
    data = bytearray(gguf_base())
    cut = draw(st.none() | st.integers(0, len(data)))
    for _ in range(draw(st.integers(0, 4))):
        data[draw(st.integers(4, len(data) - 1))] = draw(st.integers(0, 255))
    command = draw(st.sampled_from([["estimate"], ["data", "inspect"], ["chat"], ["train", "--dry-run"]]))
    return bytes(data[:cut] if cut is not None else data), command


def run_gguf_file(case, ws: Workspace) -> Outcome:
    contents, command = case
    model = ws.write("model.gguf", contents)
    if command == ["chat"]:
        return ws.cli(["chat", str(model), "--prompt", "Xin chào", "--max-new-tokens", "1"])
    config = ws.config({"model": {"name_or_path": str(model)}, "data": {"train": [{"path": "@DATA@"}]},
                        "train": {"output_dir": "@OUT@"}})
    return ws.cli([*command, str(config)])


# ---------------------------------------------------------------- eval

def run_eval(case, ws: Workspace) -> Outcome:
    """`vitune eval` of the full tiny run on a fuzzed data file (multiple choice or any other rows)."""
    (name, contents), task = case
    path = ws.write(name, contents)
    return ws.cli(["eval", str(ws.world.full_run), "--data", str(path), "--task", task, "--limit", "2",
                   "--max-new-tokens", "1", "--out", str(ws.root / "eval.json")])


# ---------------------------------------------------------------- the web UI's server functions

FORM_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                        s.odd_text, st.text(max_size=12), st.sampled_from(["@MODEL@", "@DATA@", "@MISSING@", "0", "-1"]))


@st.composite
def ui_form_case(draw):
    """The training form with a few fields changed to anything a browser can send."""
    from vitune.ui import forms

    values = dict(forms.DEFAULTS, **{"model.name_or_path": "@MODEL@", "data.train": "@DATA@", "data.max_length": 256})
    for key in draw(st.lists(st.sampled_from(forms.FIELDS), max_size=3, unique=True)):
        values[key] = draw(FORM_VALUES)
    return values, draw(st.sampled_from(["en", "vi"])), draw(st.sampled_from(["CPU", "T4", "H100", "nosuch"]))


def ui_outcome(name: str, call) -> Outcome:
    """A page function's result as the CLI's: an error shown on the page is the one line of a 2."""
    import re

    try:
        shown = call()
    except Exception as exc:  # the server must never raise out of a page function
        import traceback

        return Outcome([name], 1, "", "".join(traceback.format_exception(exc)))
    errors = [x for x in shown if isinstance(x, str) and re.match(r"\*\*(error|lỗi):\*\* ", x)]
    if errors:
        return Outcome([name], 2, "", "error: " + re.sub(r"^\*\*(error|lỗi):\*\* ", "", errors[0]) + "\n")
    return Outcome([name], 0, "", "")


def run_ui_form(case, ws: Workspace) -> Outcome:
    from vitune.ui import forms
    from vitune.ui.app import Ui

    values, lang, device = case
    filled = [ws.fill(v) if isinstance(v, str) else v for v in (values[k] for k in forms.FIELDS)]
    return ui_outcome("ui-form", lambda: Ui(ws.root, lang).check_form(lang, device, *filled))


def run_ui_inspect(case, ws: Workspace) -> Outcome:
    from vitune.ui.app import Ui

    (name, contents), lang = case
    path = ws.write(name, contents)
    outcome = ui_outcome("ui-inspect", lambda: Ui(ws.root, lang).inspect(
        str(ws.world.model), "auto", str(path), 256, True, 2, lang))
    return outcome


TARGETS = [
    FuzzTarget("ui-form", ui_form_case(), run_ui_form, 40),
    FuzzTarget("ui-inspect", st.tuples(s.data_file(), st.sampled_from(["en", "vi"])), run_ui_inspect, 30),
    FuzzTarget("data-rows", st.tuples(s.data_file(), s.data_settings(), DATA_COMMANDS), run_data_rows, 60, check_rows),
    FuzzTarget("data-convert", st.tuples(
        s.data_file(), st.sampled_from(["alpaca", "sharegpt", "messages", "chatml", ""]),
        st.none() | st.sampled_from(s.FORMATS + ["chatml", ""]), st.booleans(),
        st.sampled_from(["out.jsonl", "out.json", "out.txt", "sub/out.jsonl", "dir.jsonl", "a_file/x.jsonl", "data.jsonl"]),
    ), run_convert, 50),
    FuzzTarget("config-yaml", st.tuples(s.config_text(), CONFIG_COMMANDS), run_config_text, 100),
    FuzzTarget("set-overrides", st.tuples(st.lists(s.override(), min_size=1, max_size=3), CONFIG_COMMANDS), run_overrides, 80),
    FuzzTarget("argv", st.tuples(s.argv(), st.sampled_from(["", "hỏi\n/exit\n"])), run_argv, 100),
    FuzzTarget("tokenizer-folder", tokenizer_folder_case(), run_tokenizer_folder, 40),
    FuzzTarget("run-folder", run_folder_case(), run_run_folder, 30),
    # a valid arch builds a real tiny model (seconds): only with an --out that must be refused first
    FuzzTarget("init-model", st.one_of(
        st.tuples(st.sampled_from(["llama", "qwen2"]), st.sampled_from(INIT_OUT_BAD)),
        st.tuples(s.odd_text.filter(lambda a: a not in ("llama", "mistral", "qwen2", "bloom")),
                  st.sampled_from(INIT_OUT_BAD + ["new", "a_file"])),
    ), run_init_model, 20),
    FuzzTarget("gguf-file", gguf_case(), run_gguf_file, 30),
    FuzzTarget("export-gguf", st.tuples(run_folder_case(), st.sampled_from(["f16", "q8_0", "q4_0", "bf16", "q3", ""])),
               run_export_gguf, 20),
    FuzzTarget("eval", st.tuples(s.mc_file() | s.data_file(),
                                 st.sampled_from(["auto"] * 4 + ["multiple_choice", "conversations", "text", "preference"])),
               run_eval, 25),
]
