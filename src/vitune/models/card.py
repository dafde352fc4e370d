"""Model cards: the README.md, with the Hub's YAML metadata, that makes every folder vitune writes
describe itself -- a finished run, a merged folder, a folder of GGUF exports, a preset model.

The story of a card: where the model comes from (models/lineage.py: a Hub id, or what a local base's
own card or GGUF metadata says; never a local path in `base_model`) -> what vitune did to it (the run's
config.yaml and summary.json, `Training`) -> the metadata (huggingface_hub's `ModelCardData`, so the
YAML is the Hub's own) -> the body: settings, figures, data with its SHA-256, eval.json, how to
load, chat and serve it, and a short summary in Vietnamese.

A card ends with a hidden line holding the SHA-256 of the text above it, so a card that vitune
wrote and nobody edited can be written again (`vitune push` refreshes it with the repository's id
and the latest eval.json) while an edited one, or anyone else's README.md, is kept.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from vitune.config import STAGE_INFO, RunConfig, file_sha256, load_run_config, makes_reward_model
from vitune.models.gguf import MARKER, general_metadata
from vitune.models.lineage import CARD, Lineage, gguf_lineage, is_hub_id, lineage

SEAL = re.compile(r"<!-- vitune card sha256:([0-9a-f]{64}) -->")
PEFT_TEMPLATE = "[More Information Needed]"  # in every field of the blank card PEFT saves with an adapter
# The figures of an eval.json file entry that count rows and tokens rather than measure the model
# (vitune.eval.runner keeps the same list, _COUNTS, for its curves)
EVAL_COUNTS = ("scored", "tokens", "characters", "unanswered", "samples")
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt", ".gz")
QUESTION = "Thủ đô của Việt Nam là gì?"


# ---------------------------------------------------------------- what vitune did


@dataclass(frozen=True)
class Training:
    """A finished run: its folder, config.yaml and summary.json."""

    run: Path
    config: RunConfig
    summary: dict

    @property
    def kind(self) -> str:
        return "full" if self.config.method.type == "full" else "adapter"

    @property
    def language_model(self) -> bool:
        return not makes_reward_model(self.config.train.stage)


def training_of(folder: Path) -> Training | None:
    """The finished run behind `folder`: the folder itself, or the run a merged folder was made
    from while that run is still where the merge found it."""
    folder = Path(folder)
    if (folder / "config.yaml").is_file() and (folder / "summary.json").is_file():
        return Training(folder, load_run_config(folder), _json(folder / "summary.json"))
    run = _json(folder / "vitune_merge.json").get("run")
    return training_of(Path(run)) if run and Path(run, "summary.json").is_file() else None


def _json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


# ---------------------------------------------------------------- the cards


def write_run_card(run: Path, config: RunConfig, summary: dict, repo: str | None = None) -> Path:
    """README.md of a finished run (written before its summary.json; PEFT's blank card replaced)."""
    training = Training(Path(run), config, summary)
    base = lineage(config.model.name_or_path)
    relation = "adapter" if training.kind == "adapter" else "finetune"
    library = "peft" if training.kind == "adapter" else "transformers"
    method = {"lora": "A LoRA adapter", "qlora": "A QLoRA adapter (trained on the 4-bit base)",
              "full": "A full fine-tune"}
    intro = f"{method[config.method.type]} of {base.shown()}, trained with vitune."
    what_vi = {"lora": "Bộ điều hợp LoRA cho {base}", "qlora": "Bộ điều hợp QLoRA cho {base}",
               "full": "Mô hình tinh chỉnh toàn bộ từ {base}"}
    shown = repo or config.train.output_dir
    return _write(Path(run), _card(shown, _metadata(base, relation, library, training), intro, base, training,
                                   Path(run), _usage(training.kind, training, base, shown, repo),
                                   what_vi[config.method.type]), always=True)


def write_merged_card(folder: Path, done: dict, shown: str | None = None, repo: str | None = None) -> Path:
    """README.md of a merged folder (`done`: what vitune merge wrote into vitune_merge.json)."""
    training = training_of(Path(done["run"]))
    base = lineage(done["base"])
    shown_base = base.shown()
    intro = (f"{shown_base[:1].upper()}{shown_base[1:]} with the {done['method']} adapter of the vitune run "
             f"`{done['run']}` merged into its weights (`vitune merge`, {done['dtype']}).")
    shown = repo or shown or str(folder)
    return _write(Path(folder), _card(shown, _metadata(base, "merge", "transformers", training), intro, base, training,
                                      Path(folder), _usage("merged", training, base, shown, repo),
                                      "Mô hình {base} đã gộp bộ điều hợp LoRA"), always=True)


def write_gguf_card(gguf_file: Path, source: Path) -> Path | None:
    """README.md beside an exported GGUF file, listing every .gguf file of its folder; None when the
    folder holds a README.md that is not an unedited vitune card (it is kept)."""
    folder = Path(gguf_file).parent
    training = training_of(Path(source))
    base = lineage(training.config.model.name_or_path if training else str(source))
    # a quantisation of the base's own weights, or of weights trained away from it
    trained = training is not None or base.relation in ("adapter", "finetune", "merge")
    metadata = _metadata(base, "finetune" if trained else "quantized", "gguf", training, extra_tags=["gguf"])
    files = sorted(folder.glob("*.gguf"))
    rows = ["| file | type | size |", "|---|---|---|"]
    rows += [f"| {f.name} | {_file_type(f)} | {f.stat().st_size / 2**20:.1f} MiB |" for f in files]
    intro = (f"GGUF files of `{source}` for llama.cpp, Ollama and LM Studio, written by `vitune export gguf`: each "
             f"carries its chat template and end-of-turn token. Base model: {base.shown()}.")
    text = _card(folder.name, metadata, intro, base, training, None, _gguf_usage(Path(gguf_file).name),
                 "Tệp GGUF cho llama.cpp, Ollama và LM Studio, từ {base}", files_table=rows)
    return _write(folder, text, always=False)


def write_preset_card(folder: Path, gguf_file: Path, hub_id: str | None, command: str, about: str,
                      package: str) -> Path | None:
    """README.md of a model folder converted from a GGUF file (`vitune init-model --preset`):
    base_model, licence and languages from the file's metadata (`hub_id` first, where known)."""
    base = gguf_lineage(gguf_file, hub_id=hub_id)
    data = _data_card(base, "quantized" if base.base_model else None, "transformers", ["vitune"], base.language)
    digest = _json(Path(folder) / MARKER).get("sha256") or file_sha256(gguf_file)
    intro = (f"{about}.\n\nWritten by `{command}` from `{Path(gguf_file).name}` (sha256 `{digest}`) of the package "
             f"{package}: its {_file_type(gguf_file)} weights de-quantised to float32, as an ordinary Hugging Face "
             "model folder.")
    shown = str(folder)
    usage = ["", "## Use it", "", "```bash", f"vitune chat {shown}", "```", "",
             f"Fine-tune it with `model.name_or_path: {shown}` in a vitune config; the runs' cards then name "
             f"{base.shown()} as their base."]
    summary = _summary_vi(f"Mô hình {{base}} ở dạng thư mục mô hình Hugging Face, chuyển từ tệp GGUF bằng "
                          f"`{command}`", None, base, usage)
    summary.append(f"Tinh chỉnh: đặt `model.name_or_path: {shown}` trong cấu hình.")
    return _write(Path(folder), _assemble(data, Path(folder).name, [intro, *usage], summary), always=False)


def refresh_card(folder: Path, repo: str | None = None) -> Path | None:
    """The card of `folder` written (again) where that is safe, naming the Hub repository `repo` in its
    examples; None where it is kept. A run or merged folder's card is rebuilt from its files when it is
    missing, PEFT's blank one or vitune's own unedited; a folder of GGUF exports or another model folder
    gets one only when it has none (an export's card named its source, which the folder does not keep)."""
    folder = Path(folder)
    if not replaceable(folder / CARD):
        return None
    merged = _json(folder / "vitune_merge.json")
    if merged.get("run") and merged.get("base"):
        return write_merged_card(folder, merged, repo=repo)
    training = training_of(folder)
    if training is not None:
        return write_run_card(folder, training.config, training.summary, repo=repo)
    if (folder / CARD).is_file():
        return None
    exports = sorted(folder.glob("*.gguf"), key=lambda f: f.stat().st_mtime)
    if exports:
        return write_gguf_card(exports[-1], exports[-1])  # what the newest file's own metadata says of its origin
    shown, unknown = repo or str(folder), Lineage()
    return _write(folder, _assemble(_data_card(unknown, None, "transformers", ["vitune"], None), folder.name,
                                    ["A model folder, pushed with vitune; where it came from is not recorded.",
                                     *_usage("model", None, unknown, shown, repo)],
                                    ["Thư mục mô hình được tải lên bằng vitune; nguồn gốc của nó không được "
                                     "ghi lại."]),
                  always=False)


def replaceable(path: Path) -> bool:
    """Whether a README.md may be written over: missing, PEFT's blank card, or vitune's own, unedited."""
    if not path.is_file():
        return True
    text = path.read_text(encoding="utf-8", errors="replace")
    if PEFT_TEMPLATE in text:
        return True
    body, _, last = text.rstrip("\n").rpartition("\n")
    sealed = SEAL.fullmatch(last.strip())
    return bool(sealed) and hashlib.sha256(body.rstrip().encode("utf-8")).hexdigest() == sealed.group(1)


def _write(folder: Path, text: str, always: bool) -> Path | None:
    path = folder / CARD
    if not always and not replaceable(path):
        return None
    body = text.rstrip()
    path.write_text(f"{body}\n\n<!-- vitune card sha256:{hashlib.sha256(body.encode('utf-8')).hexdigest()} -->\n",
                    encoding="utf-8")
    return path


# ---------------------------------------------------------------- the pieces


def _metadata(base: Lineage, relation: str, library: str, training: Training | None, extra_tags=()):
    tags = ["vitune"]
    if training is not None:
        tags += [training.config.train.stage, training.config.method.type, "vi"]
    return _data_card(base, relation, library, tags + list(extra_tags),
                      ["vi"] if training is not None else base.language, training)


def _data_card(base: Lineage, relation: str | None, library: str, tags: list, language, training=None):
    from huggingface_hub import ModelCardData

    datasets = [data_name(spec.path) for spec in training.config.data.train] if training else None
    reward_model = training is not None and not training.language_model
    return ModelCardData(
        base_model=base.base_model, language=language, library_name=library, datasets=datasets or None, tags=tags,
        pipeline_tag="text-classification" if reward_model else "text-generation", **base.licence,
        **({"base_model_relation": relation} if base.base_model and relation else {}))


def _card(name: str, data, intro: str, base: Lineage, training: Training | None, folder: Path | None,
          usage: list[str], what_vi: str, files_table: list[str] | None = None) -> str:
    """The card's text: the metadata, then the intro, the files, the training's settings, figures and
    data, eval.json's figures (`folder`), the usage and the Vietnamese summary (`what_vi`: what it is,
    "{base}" where the base is named)."""
    title = name.rstrip("/").split("/")[-1]
    parts = [intro]
    if files_table:
        parts += ["", "## Files", "", *files_table]
    if training is not None:
        parts += _settings(training, base) + _figures(training.summary) + _data_table(training)
    if folder is not None:
        parts += _eval_table(folder)
    return _assemble(data, title, parts + usage, _summary_vi(what_vi, training, base, usage))


def _assemble(data, title: str, parts: list[str], summary_vi: list[str]) -> str:
    from huggingface_hub import ModelCard

    body = "\n".join([f"# {title}", "", *parts, "", "## Tóm tắt (tiếng Việt)", "",
                      *(f"- {line}" for line in summary_vi)])
    body = re.sub(r"\n{3,}", "\n\n", body)
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n"))


def _settings(training: Training, base: Lineage) -> list[str]:
    config, summary = training.config, training.summary
    method = config.method
    if method.type == "full":
        how = "full fine-tuning"
    else:
        lora = method.lora
        how = (f"{'QLoRA' if method.type == 'qlora' else 'LoRA'}: r {lora.r}, alpha {lora.alpha}, dropout "
               f"{lora.dropout}, target modules {lora.target_modules}")
        if method.type == "qlora":
            how += f"; base in {method.quantization.bits}-bit {method.quantization.quant_type}"
        if config.model.adapter:
            how += f"; continued from the adapter `{config.model.adapter}`"
    stage = STAGE_INFO[config.train.stage]
    train = config.train
    rows = [("base model", base.shown()), ("stage", f"{stage.name}: {stage.summary}"), ("method", how)]
    if stage.section:  # the stage's own section: its variant (first key) and whatever differs from the defaults
        section = getattr(config, stage.section)
        first = next(iter(type(section).model_fields))
        shown = {first: getattr(section, first), **section.model_dump(mode="json", exclude_defaults=True)}
        rows.append((stage.section, ", ".join(f"{k} {v}" for k, v in shown.items())))
    rows += [("chat template", summary.get("template") or "none"),
             ("data", f"max_length {config.data.max_length}, packing {'on' if config.data.packing else 'off'}"),
             ("optimisation", f"learning rate {train.learning_rate}, {train.scheduler} schedule, warmup ratio "
                              f"{train.warmup_ratio}, micro batch {train.micro_batch_size} x gradient accumulation "
                              f"{train.gradient_accumulation}, seed {train.seed}")]
    return ["", "## Training", "", "| setting | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]


def figures(summary: dict) -> list[tuple[str, object, object]]:
    """(figure, start, end) of a summary.json: the training loss, the held-out figures of the stage
    (eval_<key>_start/_end), the logged ones it follows (<key>_first/_last, e.g. rl's reward) and
    the evaluations while training."""
    rows = [("training loss", summary.get("first_loss"), summary.get("final_loss")),
            ("held-out loss", summary.get("eval_loss_start"), summary.get("eval_loss_end"))]
    for key in summary:
        held_out = re.fullmatch(r"eval_(.+)_start", key)
        if held_out and held_out.group(1) != "loss":
            rows.append((f"held-out {held_out.group(1)}", summary[key], summary.get(f"eval_{held_out.group(1)}_end")))
        logged = re.fullmatch(r"(.+)_first", key)
        if logged:
            rows.append((f"{logged.group(1)} (training steps)", summary[key], summary.get(f"{logged.group(1)}_last")))
    for key, value in (summary.get("evaluation") or {}).items():
        rows.append((f"{key} (while training)", value.get("first"), value.get("last")))
    return [row for row in rows if row[1] is not None or row[2] is not None]


def _figures(summary: dict) -> list[str]:
    lines = ["", "## Results", "", "From summary.json:", "", "| figure | start | end |", "|---|---|---|"]
    lines += [f"| {name} | {_number(start)} | {_number(end)} |" for name, start, end in figures(summary)]
    speed = (f"{summary.get('steps')} steps, {_number(summary.get('real_tokens'))} tokens in "
             f"{summary.get('seconds')} s ({summary.get('tokens_per_s')} tokens/s)")
    if summary.get("peak_memory_gib") is not None:
        speed += f", peak memory {summary['peak_memory_gib']} GiB"
    return lines + ["", speed + "."]


def _data_table(training: Training) -> list[str]:
    config, run = training.config, training.run
    formats = _json(run / "data_report.json").get("formats") or {}
    rejected = Counter()
    if (run / "rejects.jsonl").is_file():
        for line in (run / "rejects.jsonl").read_text(encoding="utf-8", errors="replace").splitlines():
            source = (_loads(line).get("source") or "").rpartition(":")[0]
            rejected[source] += 1
    lines = ["", "## Data", "", "| file | used for | rows read | rows kept | sha256 |", "|---|---|---|---|---|"]
    for role, specs in (("training", config.data.train), ("held-out", config.data.eval or [])):
        for spec in specs:
            path = Path(spec.path)
            read = sum(formats[spec.path].values()) if isinstance(formats.get(spec.path), dict) else None
            kept = read - rejected[spec.path] if read is not None else None
            digest = f"`{file_sha256(path)}`" if path.is_file() else \
                "Hub dataset" if data_name(spec.path) == spec.path else "not found"
            lines.append(f"| {data_name(spec.path)} | {role} | {_number(read)} | {_number(kept)} | {digest} |")
    return lines


def _eval_table(folder: Path) -> list[str]:
    result = _json(folder / "eval.json")
    rows = []
    for entry in result.get("files") or []:
        model, base = entry.get("model") or {}, entry.get("base") or {}
        for key, value in model.items():
            if key not in EVAL_COUNTS and _figure(value) is not None:
                rows.append(f"| {Path(str(entry.get('path'))).name} | {entry.get('task')} | {key} | "
                            f"{_number(_figure(value))} | {_number(_figure(base.get(key)))} |")
    if not rows:
        return []
    return ["", "## Evaluation", "", f"From eval.json (`vitune eval`, {result.get('date', '?')}):", "",
            "| file | task | figure | model | base |", "|---|---|---|---|---|", *rows]


def _usage(kind: str, training: Training | None, base: Lineage, shown: str, repo: str | None) -> list[str]:
    folder = repo.split("/")[-1] if repo else shown
    bash = [f"hf download {repo} --local-dir {folder}"] if repo else []
    language_model = training is None or training.language_model
    if language_model:
        moved = f" --base {base.base_model}" if repo and kind == "adapter" and isinstance(base.base_model, str) else ""
        bash += [f"vitune chat {folder}{moved}", f"vitune serve {folder}"]
    else:
        bash += [f"vitune score {folder} --data pairs.jsonl"]
    head = "AutoModelForCausalLM" if language_model else "AutoModelForSequenceClassification"
    if kind == "adapter":
        load = ["from peft import PeftModel", f"from transformers import {head}, AutoTokenizer", "",
                f'base = {head}.from_pretrained("{base.loadable()}")',
                f'model = PeftModel.from_pretrained(base, "{shown}")']
    else:
        load = [f"from transformers import {head}, AutoTokenizer", "", f'model = {head}.from_pretrained("{shown}")']
    load.append(f'tokenizer = AutoTokenizer.from_pretrained("{shown}")  # with the chat template used in training')
    if language_model:
        load += [f'messages = [{{"role": "user", "content": "{QUESTION}"}}]',
                 'inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", '
                 'return_dict=True)',
                 "output = model.generate(**inputs, max_new_tokens=128)",
                 'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))']
    return ["", "## Use it", "", "```bash", *bash, "```", "", "```python", *load, "```"]


def _gguf_usage(file: str) -> list[str]:
    return ["", "## Use it", "", "```bash", f"llama-cli -m {file} -cnv", f"llama-server -m {file} --port 8080",
            f"vitune chat {file}", "```", "",
            f"Ollama: a `Modelfile` holding `FROM ./{file}`, then `ollama create NAME -f Modelfile`."]


def _summary_vi(what: str, training: Training | None, base: Lineage, usage: list[str]) -> list[str]:
    """A few lines in Vietnamese: what it is, from which model, the losses, the data, how to try it."""
    hub = isinstance(base.base_model, str)
    what = what.replace("{base}", base.base_model if hub else f"mô hình cục bộ `{base.local}`")
    if training is None:
        lines = [f"{what}."]
    else:
        config, summary = training.config, training.summary
        lines = [f"{what}, huấn luyện bằng vitune (giai đoạn {config.train.stage}, "
                 f"{summary.get('steps')} bước)."]
        if summary.get("first_loss") is not None:
            lines.append(f"Loss huấn luyện: {_number(summary['first_loss'])} → "
                         f"{_number(summary.get('final_loss'))}.")
        if summary.get("eval_loss_end") is not None:
            lines.append(f"Loss trên dữ liệu giữ lại: {_number(summary.get('eval_loss_start'))} → "
                         f"{_number(summary['eval_loss_end'])}.")
        lines.append("Dữ liệu: " + ", ".join(data_name(s.path) for s in config.data.train) + ".")
    commands = [line for line in usage if line.startswith(("vitune ", "llama-cli "))]
    if commands:
        lines.append("Dùng thử: " + "; ".join(f"`{c}`" for c in commands) + ".")
    return lines


def _file_type(path: Path) -> str:
    """A GGUF file's type as --quant names it (general.file_type: 7 -> q8_0)."""
    from gguf import LlamaFileType

    value = general_metadata(path).get("general.file_type")
    try:
        return LlamaFileType(int(value)).name.removeprefix("MOSTLY_").removeprefix("ALL_").lower()
    except (TypeError, ValueError):
        return "?"


def data_name(path: str) -> str:
    """A data source as a card names it: a local file by its name (no folders of this machine), a Hub
    dataset by its id."""
    local = Path(path).suffix.lower() in DATA_SUFFIXES or Path(path).expanduser().exists() or not is_hub_id(path)
    return Path(path).name if local else path


def _figure(value):
    """A figure as a number: itself, or an accuracy table by its average."""
    if isinstance(value, dict):
        value = value.get("average")
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _number(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _loads(line: str) -> dict:
    try:
        value = json.loads(line)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
