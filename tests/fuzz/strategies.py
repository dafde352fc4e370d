"""Hypothesis strategies for everything a user writes or points vitune at.

Strategies draw plain data (dicts, strings, bytes). Paths that only exist while a case runs
are written as placeholders (`@MODEL@`, `@DATA@`, ...) that `targets.py` fills in, so a
drawn case stays printable and replayable.
"""

from __future__ import annotations

import csv
import io
import json

import yaml
from hypothesis import strategies as st

# ---------------------------------------------------------------- text and JSON values

ODD_TEXTS = [
    "", " ", "\n", "\t\t", "\u200b", "\ufeff", "\x00", "a\u0300\u0301\u0302", "hoà thuý khoẻ", "HÒA Thủy",
    "Thủ đô của Việt Nam là gì?", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 😀👩‍👩‍👧", "مرحبا עברית", "\u202etxet",
    "<|eot_id|>", "<|im_start|>assistant\n", "</s><s>", "{{ messages }}", "{% raw %}", "[/]", "[bold]x",
    ":smile:", "\\", "'\"", "ư" * 3000,
]
odd_text = st.one_of(st.text(max_size=30), st.sampled_from(ODD_TEXTS))
plain_words = st.sampled_from(["Xin chào", "Hà Nội.", "1+1?", "2", "Dịch sang tiếng Anh.", "Hello"])
words = st.one_of(plain_words, plain_words, plain_words, odd_text)  # mostly usable, so cases get past the reader

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**12), 10**12), st.floats(allow_nan=True, allow_infinity=True), odd_text
)
json_values = st.recursive(
    scalars, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=10), kids, max_size=3),
    max_leaves=8,
)

# ---------------------------------------------------------------- valid rows of every format

ROLES_OK = {"sharegpt": ("human", "gpt"), "messages": ("user", "assistant")}
ODD_ROLES = ["tool", "function", "bot", "USER", "Human", "", None, 3, ["user"], {"r": 1}]


def _turns(fmt: str, pairs: list[tuple[str, str]], system) -> list[dict]:
    role, content = ("from", "value") if fmt == "sharegpt" else ("role", "content")
    user, bot = ROLES_OK[fmt]
    turns = [{role: "system", content: system}] if system is not None else []
    for q, a in pairs:
        turns += [{role: user, content: q}, {role: bot, content: a}]
    return turns


@st.composite
def valid_row(draw, fmt: str | None = None) -> dict:
    fmt = fmt or draw(st.sampled_from(["alpaca", "sharegpt", "messages", "text", "preference"]))
    if fmt == "alpaca":
        row = {"instruction": draw(words), "output": draw(words)}
        if draw(st.booleans()):
            row["input"] = draw(words)
        if draw(st.booleans()):
            row["system"] = draw(words)
        if draw(st.booleans()):
            row["history"] = draw(st.lists(st.lists(words, min_size=2, max_size=2), max_size=2))
        return row
    if fmt in ("sharegpt", "messages"):
        pairs = draw(st.lists(st.tuples(words, words), min_size=1, max_size=3))
        system = draw(st.none() | words)
        key = "conversations" if fmt == "sharegpt" else "messages"
        return {key: _turns(fmt, pairs, system)}
    if fmt == "text":
        return {"text": draw(words)}
    style = draw(st.sampled_from(["prompt", "instruction", "conversations"]))
    row = {"chosen": draw(words), "rejected": draw(words)}
    if style == "prompt":
        row["prompt"] = draw(words)
    elif style == "instruction":
        row["instruction"] = draw(words)
    else:
        row["conversations"] = _turns("sharegpt", [(draw(words), draw(words))], None)[:-1]
    return row


# ---------------------------------------------------------------- mutations of valid data

MUTATIONS = ["retype", "empty", "delete", "rename", "add", "odd_text", "drop_item", "dup_item", "reverse", "role"]


@st.composite
def mutated(draw, value, depth: int = 0):
    """`value` with one change somewhere inside it: a key deleted, renamed or added, a value
    retyped (number, null, list, dict), emptied, a list item dropped or repeated, a role changed."""
    if isinstance(value, (dict, list)) and value and depth < 4 and draw(st.booleans()):
        if isinstance(value, dict):
            key = draw(st.sampled_from(sorted(value, key=str)))
            return {**value, key: draw(mutated(value[key], depth + 1))}
        i = draw(st.integers(0, len(value) - 1))
        return [*value[:i], draw(mutated(value[i], depth + 1)), *value[i + 1:]]
    op = draw(st.sampled_from(MUTATIONS))
    if isinstance(value, dict) and value and op in ("delete", "rename", "role"):
        key = draw(st.sampled_from(sorted(value, key=str)))
        rest = {k: v for k, v in value.items() if k != key}
        if op == "delete":
            return rest
        if op == "rename":
            return {**rest, draw(st.sampled_from(["Instruction", "question", "answer", "msgs", "from", "role", ""])
                                 | st.text(max_size=8)): value[key]}
        return {**value, key: draw(st.sampled_from(ODD_ROLES))}
    if isinstance(value, dict) and op == "add":
        return {**value, draw(st.text(max_size=10)): draw(json_values)}
    if isinstance(value, list) and value and op in ("drop_item", "dup_item", "reverse"):
        i = draw(st.integers(0, len(value) - 1))
        if op == "drop_item":
            return value[:i] + value[i + 1:]
        if op == "dup_item":
            return value[: i + 1] + value[i:]
        return value[::-1]
    if op == "empty":
        return type(value)() if isinstance(value, (str, list, dict)) else ""
    if op == "odd_text":
        return draw(odd_text)
    return draw(json_values)


def any_row():
    """Mostly a valid instruction/conversation row, often a mutated one, sometimes any JSON value
    or a text/preference row (which stage sft refuses for the whole file, so they stay rare)."""
    sft = st.sampled_from(["alpaca", "sharegpt", "messages"]).flatmap(valid_row)
    return st.one_of(
        *[sft] * 6, *[sft.flatmap(mutated)] * 3, valid_row().flatmap(mutated).flatmap(mutated), json_values,
        st.integers(0, 9).flatmap(lambda n: sft if n else valid_row()),
    )


# ---------------------------------------------------------------- data files

def _plain(row) -> bool:
    """No empty or whitespace-only text anywhere in the row."""
    if isinstance(row, dict):
        return all(_plain(v) for v in row.values())
    if isinstance(row, list):
        return all(_plain(v) for v in row)
    return not isinstance(row, str) or bool(row.strip())


BAD_LINES = ["{", "{'instruction': 'x'}", "[1, 2]", "null", '"text"', "NaN", '{"a": 1}}', "\x00\x01", "{\"instruction\": \"x\",}"]


@st.composite
def jsonl_bytes(draw) -> bytes:
    # usually a few clean rows among the odd ones, so cases reach tokenisation and the counts
    clean = st.sampled_from(["alpaca", "sharegpt", "messages"]).flatmap(valid_row).filter(_plain)
    rows = draw(st.lists(clean, max_size=3)) + draw(st.lists(any_row(), min_size=1, max_size=6))
    lines = [json.dumps(row, ensure_ascii=draw(st.booleans())).encode("utf-8") for row in draw(st.permutations(rows))]
    for _ in range(draw(st.sampled_from([0, 0, 1, 2]))):
        bad = draw(st.sampled_from(BAD_LINES).map(str.encode) | st.text(max_size=20).map(str.encode)
                   | st.sampled_from([b"\xff\xfe\x00", b"{\"text\": \"\xc3\"}", b""]))
        lines.insert(draw(st.integers(0, len(lines))), bad)
    eol = draw(st.sampled_from([b"\n", b"\r\n"]))
    body = eol.join(lines) + draw(st.sampled_from([b"", eol]))
    return (b"\xef\xbb\xbf" if draw(st.booleans()) else b"") + body


@st.composite
def json_bytes(draw) -> bytes:
    rows = draw(st.lists(any_row(), max_size=5))
    shape = draw(st.sampled_from(["list", "list", "list", "wrapped", "two_lists", "scalar", "truncated", "garbage"]))
    if shape == "list":
        text = json.dumps(rows, ensure_ascii=False)
    elif shape == "wrapped":
        text = json.dumps({"train": rows})
    elif shape == "two_lists":
        text = json.dumps({"train": rows, "test": rows})
    elif shape == "scalar":
        text = json.dumps(draw(scalars))
    elif shape == "truncated":
        full = json.dumps(rows)
        text = full[: draw(st.integers(0, max(0, len(full) - 1)))]
    else:
        text = draw(st.text(max_size=40))
    return (b"\xef\xbb\xbf" if draw(st.booleans()) else b"") + text.encode("utf-8")


CSV_COLUMNS = ["instruction", "input", "output", "text", "conversations", "messages", "chosen", "rejected", "prompt", ""]


@st.composite
def csv_bytes(draw) -> bytes:
    if draw(st.integers(0, 4)) == 0:
        return draw(st.sampled_from(['a,"b\n1,2', '"', ",,,\n,,,", "instruction\n", "\ufeffinstruction,output\nx,y\n"])
                    | st.text(max_size=40)).encode("utf-8")
    columns = draw(st.lists(st.sampled_from(CSV_COLUMNS) | st.text(max_size=6), min_size=1, max_size=4))
    buf = io.StringIO()
    writer = csv.writer(buf, quoting=draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL, csv.QUOTE_NONNUMERIC])))
    writer.writerow(columns)
    for _ in range(draw(st.integers(0, 4))):
        cells = draw(st.lists(words | st.integers().map(str) | st.sampled_from(['"', '""', ",", "\n", "a\"b"]),
                              min_size=0, max_size=len(columns) + 1))
        writer.writerow(cells)
    return buf.getvalue().encode("utf-8")


@st.composite
def data_file(draw) -> tuple[str, bytes]:
    """(file name, contents) of a user's data file: mostly JSONL, also JSON, CSV and garbage parquet."""
    kind = draw(st.sampled_from(["jsonl"] * 8 + ["json"] * 2 + ["csv", "parquet"]))
    if kind == "jsonl":
        return "data.jsonl", draw(jsonl_bytes())
    if kind == "json":
        return "data.json", draw(json_bytes())
    if kind == "csv":
        return "data.csv", draw(csv_bytes())
    return "data.parquet", draw(st.sampled_from([b"", b"PAR1", b"PAR1\x00\x00PAR1"]) | st.binary(max_size=30))


FORMATS = ["auto", "alpaca", "sharegpt", "messages", "text", "preference"]
TEMPLATES = ["auto", "llama3", "chatml", "alpaca", "mistral", "llama2", "vistral", "vicuna"]


@st.composite
def data_settings(draw) -> dict:
    """A valid `data:` section for a file at @DATA@: the settings a user can combine."""
    # text and preference rows cannot train stage sft (the whole file is refused): rarely chosen
    fmt = draw(st.sampled_from(["auto"] * 8 + ["alpaca", "sharegpt", "messages"] * 2 + ["text", "preference"]))
    spec = {"path": "@DATA@", "format": fmt, "max_samples": draw(st.none() | st.integers(1, 6))}
    if draw(st.integers(0, 4)) == 0:
        spec["columns"] = draw(st.dictionaries(st.sampled_from(["instruction", "output", "input", "conversations", "from", "value", "messages"]),
                                               st.sampled_from(["question", "answer", "from", "role", "content", "text"]), max_size=2))
    if draw(st.integers(0, 4)) == 0:
        spec["weight"] = draw(st.sampled_from([0.5, 1.5, 2.0]))
    data = {
        "train": [spec],
        "on_error": draw(st.sampled_from(["skip", "skip", "skip", "raise"])),
        "max_length": draw(st.sampled_from([4, 32, 128, 512, 512, 2048])),
        "overflow": draw(st.sampled_from(["drop", "truncate"])),
        "packing": draw(st.booleans()),
        "train_on_prompt": draw(st.booleans()),
        "mask_history": draw(st.booleans()),
        "normalize": {"unicode": draw(st.sampled_from(["NFC", "NFKC", "none"])), "vi_tone": draw(st.sampled_from(["keep", "new", "old"]))},
        "cache": draw(st.booleans()),
    }
    if draw(st.integers(0, 5)) == 0:
        data["val_size"] = draw(st.sampled_from([0.5, 1, 3]))
    elif draw(st.integers(0, 5)) == 0:
        data["eval"] = [{"path": "@DATA@", "max_samples": 2}]
    return data


# ---------------------------------------------------------------- YAML configs

def valid_config() -> dict:
    return {
        "model": {"name_or_path": "@MODEL@", "template": "auto"},
        "method": {"type": "lora", "lora": {"r": 4, "alpha": 8}},
        "data": {"train": [{"path": "@DATA@", "max_samples": 4}], "max_length": 64, "on_error": "skip"},
        "train": {"epochs": 1, "micro_batch_size": 1, "output_dir": "@OUT@", "report_to": ["none"]},
    }


YAML_SNIPPETS = [
    "",
    "# only a comment\n",
    "---\n...\n",
    "- model\n- data\n",
    "42\n",
    "just text\n",
    "model: [\n",
    "model: {name_or_path: @MODEL@}\ndata: {train: [{path: @DATA@}]}\nmodel: {name_or_path: x}\n",
    "base: &b {name_or_path: @MODEL@}\nmodel: *b\ndata: {train: [{path: @DATA@}]}\n",
    "m: &m {name_or_path: @MODEL@}\nmodel: {<<: *m, template: auto}\ndata: {train: [{path: @DATA@}]}\n",
    "model: &a {name_or_path: @MODEL@, template: *a}\ndata: {train: [{path: @DATA@}]}\n",
    "model: {name_or_path: @MODEL@}\ndata: &d {train: [*d]}\n",
    "model: {name_or_path: *undefined}\n",
    "model: !!python/object:os.system {}\n",
    "model: {name_or_path: !!binary aGVsbG8=}\ndata: {train: [{path: @DATA@}]}\n",
    "model: {name_or_path: @MODEL@}\ndata: {train: [{path: @DATA@}]}\ntrain: {output_dir: 2024-01-01}\n",
    "model: {name_or_path: @MODEL@}\ndata: {train: !!set {a, b}}\n",
    "model: {name_or_path: @MODEL@}\ndata: {train: [{path: @DATA@}]}\neval: {data: [@DATA@], limit: 1}\n",
    "model: {name_or_path: @MODEL@}\ndata: {train: [{path: @DATA@}]}\neval: {data: @DATA@}\n",
    "model: {name_or_path: @MODEL@}\ndata: {train: [{path: @DATA@}]}\neval: {data: [@DATA@, @DATA@]}\n",
    "? [a, b]\n: c\n",
    "1: 2\ntrue: false\n~: x\n",
    "model: {1: 2, null: 3, true: 4}\ndata: {train: [{path: @DATA@}]}\n",
    "model:\n\tname_or_path: x\n",
    "\ufeffmodel: {name_or_path: @MODEL@}\ndata: {train: [{path: @DATA@}]}\n",
    "model: {name_or_path: @MODEL@}\ndata: {train: [{path: @DATA@}]}\n---\nsecond: document\n",
    "[" * 300 + "]" * 300 + "\n",
    "a: " + "[" * 2000 + "\n",
]


@st.composite
def config_text(draw) -> bytes:
    """A YAML config file: a valid one mutated, a random structure, random text or a tricky snippet."""
    kind = draw(st.sampled_from(["mutated", "mutated", "mutated", "twice", "random", "text", "snippet", "bytes"]))
    if kind in ("mutated", "twice"):
        cfg = draw(mutated(valid_config()))
        if kind == "twice":
            cfg = draw(mutated(cfg))
        text = yaml.safe_dump(cfg, allow_unicode=draw(st.booleans()))
    elif kind == "random":
        text = yaml.safe_dump(draw(json_values | st.dictionaries(st.sampled_from(["model", "method", "data", "train", "eval"]), json_values)))
    elif kind == "text":
        text = draw(st.text(max_size=60))
    elif kind == "snippet":
        text = draw(st.sampled_from(YAML_SNIPPETS))
    else:
        return draw(st.sampled_from([b"\xff\xfe\x00m", b"model: \xe9t\xe9\n", b"\x00\x00"]) | st.binary(max_size=30))
    return text.encode("utf-8")


# ---------------------------------------------------------------- --set overrides

KEY_PATHS = [
    "model.name_or_path", "model.template", "model.dtype", "model.trust_remote_code", "method.type", "method.lora.r",
    "method.lora.target_modules", "method.quantization.bits", "data.train", "data.train.0", "data.train.0.path",
    "data.train.0.format", "data.train.0.max_samples", "data.train.0.columns", "data.train.0.columns.instruction",
    "data.train.1.path", "data.train.-1", "data.eval", "data.val_size", "data.max_length", "data.on_error",
    "data.normalize.unicode", "data.cache_dir", "data.num_proc", "train.epochs", "train.learning_rate",
    "train.output_dir", "train.overwrite", "train.resume", "train.report_to", "train.report_to.0", "train.deepspeed", "train.seed",
    "train.micro_batch_size", "train.gradient_checkpointing", "model", "data", "train", "method",
    "eval", "eval.data", "eval.data.0", "eval.task", "eval.limit", "eval.generate", "eval.shots",
]
SET_VALUES = [
    "", "null", "~", "true", "no", "1e-4", "1E5", "1e400", "-1", "0", "0x10", "inf", ".nan", ".", "e", "3.5", "[1, 2",
    "[a, b]", "{a: 1}", "{", "'quoted", "&a x", "*a", "!!python/name:os.system", "!!binary aGk=", "a: b", "- x",
    "@MODEL@", "@DATA@", "@DATA@/sub", "@OUT@", "auto", "lora", "qlora", "full", "[" * 1500, "x=y=z", "2024-01-01", "[/]",
]


@st.composite
def override(draw) -> str:
    key = draw(st.sampled_from(KEY_PATHS) | st.sampled_from(KEY_PATHS).map(lambda k: k + draw(
        st.sampled_from([".", "..x", ".0", ".99", ".x.y", "=", " "]))) | st.text(max_size=15))
    value = draw(st.sampled_from(SET_VALUES) | odd_text)
    sep = draw(st.sampled_from(["=", "=", "=", "", " = ", ":"]))
    return f"{key}{sep}{value}"


# ---------------------------------------------------------------- argument vectors

COMMAND_TOKENS = ["train", "data", "inspect", "convert", "estimate", "init-model", "chat", "--help", "help"]
OPTION_TOKENS = [
    "--set", "--dry-run", "--nproc", "--device", "--json", "-n", "--to", "--from", "--force", "--arch", "--out",
    "--seed", "--preset", "--prompt", "--system", "--template", "--temperature", "--top-p", "--max-new-tokens", "--base",
    "--", "-", "--set=", "-nx", "--json=1", "--unknown",
]
VALUE_TOKENS = [
    "@CONFIG@", "@BADCONFIG@", "@DATA@", "@MODEL@", "@MISSING@", "@OUT@/out.jsonl", "@OUT@", "sharegpt", "alpaca",
    "messages", "chatml", "T4", "H100", "CPU", "tpu", "0", "1", "-1", "nan", "1e9", "-0.5", "gpt9",
    "train.epochs=1", "data.max_length=8", "=", "", "smollm2-135m-instruct", "x.gguf", "@DATA@.gguf",
]


def _tokens():
    return st.sampled_from(COMMAND_TOKENS) | st.sampled_from(OPTION_TOKENS) | st.sampled_from(VALUE_TOKENS) | st.text(max_size=10)


@st.composite
def argv(draw) -> list[str]:
    """A random argument vector, usually starting with a real command."""
    head = draw(st.sampled_from([[], ["train"], ["data"], ["data", "inspect"], ["data", "convert"], ["estimate"],
                                 ["init-model"], ["chat"]]))
    return head + draw(st.lists(_tokens(), max_size=7))


# ---------------------------------------------------------------- broken files (tokenizer, run folders)

TEMPLATE_SOURCES = [
    "{% for m in messages %}",  # not valid Jinja
    "{{ raise_exception('this template refuses') }}",  # raises while rendering
    "{{ messages[0]['content'] | nosuchfilter }}",  # unknown filter
    "{{ messages[99]['content'] }}",
    "{{ 1 / 0 }}",
    "",
    "constant text",
    "{% for m in messages %}{{ m.content }}{% endfor %}",  # renders, but never the assistant's answer apart
]


@st.composite
def broken_file(draw, name: str, original: bytes):
    """How one file of a model folder is broken, as a replayable spec: ("delete",), ("empty",),
    ("truncate", fraction), ("garbage", bytes), ("json", value) for valid JSON of the wrong
    shape or with one key mutated, or ("template", source) for a tokenizer's chat_template."""
    kinds = ["delete", "empty", "truncate", "garbage", "json_shape"]
    small_json = name.endswith(".json") and len(original) < 20_000
    if small_json:
        kinds += ["json_key", "json_key"]
    if name == "tokenizer_config.json":
        kinds += ["template", "template", "template"]
    kind = draw(st.sampled_from(kinds))
    if kind in ("delete", "empty"):
        return (kind,)
    if kind == "truncate":
        return ("truncate", draw(st.floats(0, 0.999)))
    if kind == "garbage":
        return ("garbage", draw(st.binary(max_size=40)))
    if kind == "json_shape":
        return ("json", draw(json_values))
    if kind == "template":
        return ("template", draw(st.sampled_from(TEMPLATE_SOURCES) | json_values))
    return ("json", draw(mutated(json.loads(original))))


def apply_break(spec: tuple, original: bytes) -> bytes | None:
    """The file's new contents under `spec` (None = delete it)."""
    kind = spec[0]
    if kind == "delete":
        return None
    if kind == "empty":
        return b""
    if kind == "truncate":
        return original[: int(len(original) * spec[1])]
    if kind == "garbage":
        return spec[1]
    if kind == "template":
        data = json.loads(original)
        data["chat_template"] = spec[1]
        return json.dumps(data).encode()
    return json.dumps(spec[1]).encode()


# ---------------------------------------------------------------- multiple-choice rows (vitune eval)

@st.composite
def mc_row(draw) -> dict:
    """A VMLU-style row, usually valid, with any field missing, mistyped or odd."""
    n = draw(st.integers(0, 6))
    row = {"id": draw(st.sampled_from(["q1", "q2", "q3"]) | scalars),
           "question": draw(words | scalars),
           "choices": draw(st.just([f"{'ABCDEF'[i]}. {draw(words)}" for i in range(n)]) | scalars
                           | st.lists(words | scalars, max_size=3)),
           "answer": draw(st.sampled_from(["A", "B", "c", "E", "", "AB", "1"]) | scalars)}
    for key in draw(st.lists(st.sampled_from(list(row)), max_size=2, unique=True)):
        del row[key]
    return row


@st.composite
def mc_file(draw) -> tuple[str, bytes]:
    rows = draw(st.lists(mc_row(), min_size=1, max_size=5))
    if draw(st.integers(0, 3)) == 0:  # the CSV shape: question, A, B, ..., answer
        lines = ["question,A,B,C,answer"] + [",".join(draw(st.sampled_from(["x", "", "1", "\"a,b\"", "Hà Nội"]))
                                                     for _ in range(5)) for _ in rows]
        return "mc.csv", "\n".join(lines).encode("utf-8")
    return "mc.jsonl", b"\n".join(json.dumps(r, ensure_ascii=False, default=str).encode("utf-8") for r in rows)
