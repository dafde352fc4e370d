"""MkDocs hook: the config reference (docs/reference/config.md and .vi.md) is generated from the
schema, `vitune.config.RunConfig`, each time the site is built, so it lists exactly the keys
vitune accepts, with their types, defaults and descriptions.

The page's markdown holds a line `<!-- vitune:config-reference en -->` (or `vi`); this hook
replaces it with `config_reference(lang)`: one table per section of the schema, found as
vitune.config finds them (`_inner_model`: a field whose type is, or holds, a section model),
then the resolved form of the smallest valid config. tests/test_docs.py imports this file by
path and checks that every key of the schema is on the page.

Descriptions are the schema's own `Field(description=...)` (English on both pages). A key the
schema leaves without a description gets its line from NOTES, in the page's language; a note
for a key that no longer exists fails the build.
"""

from __future__ import annotations

import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

ROOT = Path(__file__).resolve().parents[2]
try:
    from vitune import config as schema
except ImportError:  # building the site from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT / "src"))
    from vitune import config as schema

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

MARKER = re.compile(r"^<!-- vitune:config-reference (?P<lang>en|vi) -->$", re.M)

# What the schema does not say itself (keys without a Field description, and sections), in
# English and Vietnamese. Taken from the hand-written reference this page replaced.
NOTES: dict[str, tuple[str, str]] = {
    "model": ("The model to train, its chat template and how it is loaded.",
              "Mô hình cần huấn luyện, chat template của nó và cách nạp nó."),
    "method": ("How the model is adapted: full fine-tuning, LoRA or QLoRA.",
               "Cách mô hình được điều chỉnh: tinh chỉnh toàn bộ, LoRA hoặc QLoRA."),
    "method.lora": ("lora and qlora only.", "Chỉ cho lora và qlora."),
    "method.lora.dropout": ("Dropout on the LoRA branch (off in the rm and dpo stages).",
                            "Dropout trên nhánh LoRA (tắt ở các giai đoạn rm và dpo)."),
    "method.quantization": ("qlora only (bitsandbytes).", "Chỉ cho qlora (bitsandbytes)."),
    "method.quantization.bits": ("4 (NF4/FP4) | 8 (LLM.int8).", "4 (NF4/FP4) | 8 (LLM.int8)."),
    "data": ("What is trained on and held out, and how rows become tokens.",
             "Dữ liệu huấn luyện và dữ liệu giữ riêng, và cách các dòng trở thành token."),
    "data.train": ("Required, one or more entries; several entries are mixed and shuffled with train.seed.",
                   "Bắt buộc, một hoặc nhiều mục; nhiều mục được trộn và xáo trộn theo train.seed."),
    "data.train.split": ("For Hub datasets.", "Cho dataset trên Hub."),
    "data.train.weight": ("2 repeats the entry's rows twice, 0.5 keeps a seeded random half.",
                          "2 lặp lại các dòng của mục hai lần, 0.5 giữ một nửa ngẫu nhiên theo seed."),
    "data.train.max_samples": ("Read only the first N rows.", "Chỉ đọc N dòng đầu tiên."),
    "data.eval": ("Held-out entries like train (or val_size instead).",
                  "Các mục giữ riêng, giống train (hoặc dùng val_size thay cho nó)."),
    "data.max_length": ("Tokens per row.", "Số token mỗi dòng."),
    "data.train_on_prompt": ("true trains every token, not only the answers.",
                             "true huấn luyện mọi token, không chỉ các câu trả lời."),
    "data.mask_history": ("true trains only the last assistant turn.",
                          "true chỉ huấn luyện lượt trả lời cuối cùng của assistant."),
    "data.normalize": ("Vietnamese normalisation of the text.", "Chuẩn hóa văn bản tiếng Việt."),
    "data.normalize.vi_tone": ("Tone-mark placement: keep, new (hoà) or old (hòa).",
                               "Vị trí đặt dấu thanh: keep, new (hoà) hoặc old (hòa)."),
    "data.on_error": ("raise: a bad row stops the run before anything is written; skip: train on the rest "
                      "(rejected rows go to rejects.jsonl).",
                      "raise: một dòng lỗi dừng lần chạy trước khi ghi bất cứ gì; skip: huấn luyện trên phần còn "
                      "lại (các dòng bị loại ghi vào rejects.jsonl)."),
    "data.num_proc": ("Processes for tokenisation.", "Số tiến trình để tokenize."),
    "train": ("The stage, the hyperparameters and the run folder.",
              "Giai đoạn, các siêu tham số và thư mục của lần chạy."),
    "train.epochs": ("Passes over the training rows.", "Số lượt đi qua các dòng huấn luyện."),
    "train.micro_batch_size": ("Rows per process and step (with packing: bins; rm and dpo: pairs, KTO: answers).",
                               "Số dòng mỗi tiến trình mỗi bước (khi packing: số ngăn; rm và dpo: số cặp, KTO: số "
                               "câu trả lời)."),
    "train.gradient_accumulation": ("Micro-batches per optimizer step (global batch = micro_batch_size x "
                                    "gradient_accumulation x processes).",
                                    "Số micro-batch mỗi bước optimizer (batch toàn cục = micro_batch_size x "
                                    "gradient_accumulation x số tiến trình)."),
    "train.learning_rate": ("LoRA/QLoRA about 1e-4..3e-4, full fine-tuning about 1e-5..2e-5.",
                            "LoRA/QLoRA khoảng 1e-4..3e-4, tinh chỉnh toàn bộ khoảng 1e-5..2e-5."),
    "train.seed": ("Data order, LoRA initialisation, dropout.", "Thứ tự dữ liệu, khởi tạo LoRA, dropout."),
    "train.output_dir": ("The run folder.", "Thư mục của lần chạy."),
    "train.save_steps": ("Checkpoint every N steps.", "Lưu checkpoint sau mỗi N bước."),
    "train.save_total_limit": ("Keep the last N checkpoints.", "Giữ lại N checkpoint gần nhất."),
    "train.eval_steps": ("Evaluate every N steps (default: each epoch when there is eval data; the eval "
                         "section: start and end).",
                         "Đánh giá sau mỗi N bước (mặc định: mỗi epoch khi có dữ liệu đánh giá; mục eval: đầu "
                         "và cuối)."),
    "dpo": ("train.stage: dpo only.", "Chỉ cho train.stage: dpo."),
    "rl": ("train.stage: rl only; required there.", "Chỉ cho train.stage: rl; bắt buộc ở giai đoạn đó."),
    "rl.rewards": ("Each entry is a function or a model.", "Mỗi mục là một hàm hoặc một mô hình."),
    "rl.max_completion_length": ("Longest sampled answer, in tokens.", "Câu trả lời lấy mẫu dài nhất, tính bằng token."),
    "rl.temperature": ("Sampling temperature.", "Nhiệt độ lấy mẫu."),
    "eval": ("Optional: vitune eval's figures while training.",
             "Tùy chọn: số đo của vitune eval trong khi huấn luyện."),
}

TEXT = {
    "en": {"key": "key", "type": "type", "default": "default", "description": "description",
           "required": "required", "section": "section", "optional": "optional section",
           "defaults": "section; every key has a default",
           "list": "a list of entries, each with the keys below",
           "example": "The smallest valid config, resolved",
           "example_intro": "A config needs only `model.name_or_path` and one `data.train` entry; every other key "
                            "takes its default. Resolved, with every default written out, it is the `config.yaml` a "
                            "run folder holds (the sections its method and stage do not use, here "
                            "`method.quantization` and `dpo`, are written with their defaults and dropped again when "
                            "the folder is read back):"},
    "vi": {"key": "khóa", "type": "kiểu", "default": "mặc định", "description": "mô tả",
           "required": "bắt buộc", "section": "mục", "optional": "mục tùy chọn",
           "defaults": "mục; mọi khóa đều có giá trị mặc định",
           "list": "một danh sách các mục, mỗi mục có các khóa dưới đây",
           "example": "Config hợp lệ nhỏ nhất, đã phân giải",
           "example_intro": "Một config chỉ cần `model.name_or_path` và một mục `data.train`; mọi khóa khác lấy "
                            "giá trị mặc định. Sau khi phân giải, ghi ra đầy đủ mọi giá trị mặc định, nó chính là "
                            "`config.yaml` trong thư mục của lần chạy (các mục mà phương pháp và giai đoạn của lần "
                            "chạy không dùng, ở đây là `method.quantization` và `dpo`, được ghi với giá trị mặc định "
                            "và bị bỏ đi khi đọc lại thư mục):"},
}

SMALLEST = {"model": {"name_or_path": "runs/smollm2-135m-instruct"},
            "data": {"train": [{"path": "data/alpaca_vi.jsonl"}]}}


def section_model(field: FieldInfo) -> type[BaseModel] | None:
    """The section model a field holds (itself, in a list, or optional), as vitune.config finds it."""
    return schema._inner_model(field.annotation)


def schema_keys(model: type[BaseModel] = schema.RunConfig, prefix: str = "") -> list[str]:
    """Every key path of the schema, sections included, in the schema's order."""
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        inner = section_model(field)
        if inner is not None:
            keys += schema_keys(inner, prefix + name + ".")
    return keys


def type_name(annotation: Any) -> str:
    """A field's type as a user writes its values: `auto` | `sdpa`, list of str, int or null."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return " | ".join(f"`{yaml_value(a)}`" for a in args)
    if origin in (Union, types.UnionType):
        optional = type(None) in args
        names = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or `null`" if optional else "")
    if origin is list:
        return f"list of {type_name(args[0])}"
    if origin is dict:
        return f"mapping of {type_name(args[0])} to {type_name(args[1])}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "entry"
    return getattr(annotation, "__name__", str(annotation))


def limits(field: FieldInfo) -> str:
    """The field's numeric and length limits, e.g. `> 0`, `>= 0, < 1`, `at least 1`."""
    out = []
    for item in field.metadata:
        for attr, sign in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            if getattr(item, attr, None) is not None:
                out.append(f"{sign} {getattr(item, attr)}")
        if getattr(item, "min_length", None) is not None:
            out.append(f"at least {item.min_length}")
    return ", ".join(out)


def yaml_value(value: Any) -> str:
    """A value as it is written in the YAML file (true, null, [tensorboard], 0.0002)."""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


def default_text(field: FieldInfo, words: dict[str, str]) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        return "" if isinstance(value, BaseModel) else f"`{yaml_value(value)}`"
    if field.default is PydanticUndefined:
        return f"**{words['required']}**"
    return f"`{yaml_value(field.default)}`"


def cell(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def describe(path: str, field: FieldInfo | None, model: type[BaseModel] | None, lang: str) -> str:
    parts = []
    if field is not None and field.description:
        parts.append(field.description)
    elif model is not None and model.__dict__.get("__doc__"):  # a section's own docstring
        parts.append(" ".join(model.__dict__["__doc__"].split()))
    note = NOTES.get(path) or NOTES.get(path.replace("data.eval.", "data.train.", 1))  # eval entries are train entries
    if note:
        parts.append(note[0 if lang == "en" else 1])
    return " ".join(parts)


def section_markdown(model: type[BaseModel], prefix: str, level: int, lang: str) -> list[str]:
    """The table of one section's keys, then each of its sub-sections under a heading of its own."""
    words = TEXT[lang]
    lines = [f"| {words['key']} | {words['type']} | {words['default']} | {words['description']} |",
             "|---|---|---|---|"]
    subsections = []
    for name, field in model.model_fields.items():
        path = prefix + name
        inner = section_model(field)
        if inner is not None:
            subsections.append((path, field, inner))
            kind = words["list"] if holds_list(field.annotation) else words["section"]
            lines.append(f"| `{path}` | {kind} | {default_text(field, words) or '—'} | "
                         f"[{words['section']} `{path}`](#{slug(path)}) |")
            continue
        kind = type_name(field.annotation)
        bounds = limits(field)
        if bounds:
            kind += f" ({bounds})"
        lines.append(f"| `{path}` | {cell(kind)} | {cell(default_text(field, words))} | "
                     f"{cell(describe(path, field, None, lang))} |")
    out = lines + [""]
    for path, field, inner in subsections:
        out += section_heading(path, field, inner, level, lang)
        out += section_markdown(inner, path + ".", level + 1, lang)
    return out


def slug(path: str) -> str:
    """The anchor of a section's heading: method.lora -> method-lora."""
    return path.replace(".", "-")


def holds_list(annotation: Any) -> bool:
    """Whether a field holds a list of entries (data.train, optional data.eval, rl.rewards)."""
    if typing.get_origin(annotation) is list:
        return True
    return any(holds_list(arg) for arg in typing.get_args(annotation))


def section_heading(path: str, field: FieldInfo, inner: type[BaseModel], level: int, lang: str) -> list[str]:
    words = TEXT[lang]
    required = field.default is PydanticUndefined and field.default_factory is None
    optional = field.default is None
    is_list = holds_list(field.annotation)
    status = words["required"] if required else words["optional"] if optional else words["defaults"]
    if is_list:
        status += "; " + words["list"]
    lines = [f"{'#' * level} `{path}` {{ #{slug(path)} }}", "", f"*{status}.*"]
    text = describe(path, field, inner, lang)
    if text:
        lines += ["", text]
    return lines + [""]


def smallest_config_yaml() -> str:
    """The smallest valid config, resolved as a run folder's config.yaml holds it."""
    return schema.dump_config(schema.RunConfig.model_validate(SMALLEST))


def config_reference(lang: str = "en") -> str:
    """The generated part of the config reference page, in `lang` (en or vi), as markdown."""
    unknown = sorted(set(NOTES) - set(schema_keys()))
    if unknown:
        raise ValueError(f"docs/hooks/config_reference.py: NOTES names keys the schema does not have: {unknown}")
    words = TEXT[lang]
    out = []
    for name, field in schema.RunConfig.model_fields.items():
        inner = section_model(field)
        out += section_heading(name, field, inner, 2, lang)
        out += section_markdown(inner, name + ".", 3, lang)
    out += [f"## {words['example']} {{ #smallest-config }}", "", words["example_intro"], "", "```yaml",
            smallest_config_yaml().rstrip(), "```", ""]
    return "\n".join(out)


def on_page_markdown(markdown: str, page, config, files) -> str:
    return MARKER.sub(lambda m: config_reference(m.group("lang")), markdown)
