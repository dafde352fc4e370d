"""`vitune ui`: the whole path in a browser page (Gradio), on the CLI's own functions.

Every tab calls what its command calls (data inspection, config validation, the estimate and
advice, `vitune train` as a process, chat, eval, merge and GGUF export); the page adds only
layout, the language switch and polling. A user mistake comes back as the CLI's one-line
message, shown next to its field; anything else is shown as one line too, and the server keeps
serving.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import gradio as gr
import pandas as pd

from vitune.config import STAGE_INFO
from vitune.errors import UserError
from vitune.ui import forms, jobs
from vitune.ui.chat import ChatSessions, chat_tab
from vitune.ui.text import LANGUAGES, TEXT, error_md, one_line, page_words, t

CSS = ".vitune-error {color: #b91c1c; font-weight: 600} .vitune-error p {margin: 0}"
DEVICES = ["CPU", "T4", "L4", "RTX4090", "A100", "H100", "H200"]
QUANTS = ["f16", "bf16", "f32", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k_m", "q5_k_m", "q6_k"]
CURVES = {  # plot: the metrics.jsonl keys it draws
    "plot_loss": ("loss", "eval_loss", "value_loss"),  # value_loss: PPO's value head
    "plot_lr": ("learning_rate",),
    "plot_speed": ("tokens_per_s",),
    "plot_reward": ("rewards/accuracy", "rewards/margin", "eval_rewards/accuracy", "eval_rewards/margin"),
    "plot_rl_reward": ("reward", "eval_reward"),  # rl: the mean reward of the step's / held-out completions
    "plot_kl": ("kl", "eval_kl"),  # rl: how far the policy moved from its reference
}


class Ui:
    """The server's state: one training process at a time, started from this page. `state_dir`
    holds what the page generates (the YAML of each run it starts), outside the runs folder."""

    def __init__(self, root: Path, lang: str, state_dir: Path | None = None):
        self.root = Path(root)
        self.lang = lang
        self.state_dir = Path(state_dir) if state_dir else jobs.default_state_dir()
        self.job: jobs.TrainingJob | None = None
        self.lock = threading.Lock()
        self.chat = ChatSessions()

    # ------------------------------------------------------------- data tab

    def inspect(self, model, template, files, max_length, packing, n, lang):
        """Inspect as `vitune data inspect` does. Returns the inspection in words of no language
        (kept by the page, to show it again in the other language) and its rendering."""
        from vitune.data.inspect import token_pieces
        from vitune.data.preference import TokenizedPair

        raw = forms.inspection_config(model, template, files, max_length, packing)
        try:
            from vitune.config import validate_config
            from vitune.train.inspection import inspect_data

            if not raw["data"]["train"]:
                raise UserError("data.train: give at least one data file or folder")
            seen = inspect_data(validate_config(raw, source="form"))
        except Exception as exc:
            view = {"error": one_line(exc)}
            return view, *show_inspection(view, lang)
        rows = []
        for i, row in enumerate(seen.rows[: int(n or 0)]):
            for seq in row.sequences if isinstance(row, TokenizedPair) else [row]:
                header = dict(i=i + 1, n=len(seen.rows), tokens=len(seq.input_ids),
                              trained=sum(label != -100 for label in seq.labels))
                rows.append((header, [(text, on) for text, on in token_pieces(seen.tokenizer, seq)]))
        view = {"stats": seen.stats, "rows": rows,
                "rejected": [(r.source, r.reason, r.detail) for r in seen.report.rejections[:20]]}
        return view, *show_inspection(view, lang)

    # ------------------------------------------------------------- train tab

    def check_form(self, lang, device, *values):
        checked = forms.check(dict(zip(forms.FIELDS, values)))
        message = error_md(page_words(checked.message, lang), lang)
        errors = [message if key == checked.field else "" for key in forms.FIELDS]
        general = message if checked.message and checked.field is None else (t("valid", lang) if checked.config else "")
        advice = forms.advice_lines(checked)
        advice_md = "\n".join(f"- {a}" for a in advice) if advice else (t("no_advice", lang) if checked.config else "")
        return [*errors, general, forms.estimate_text(checked, device, lang), advice_md, checked.yaml]

    def save_yaml(self, yaml_text, path, lang):
        if not yaml_text:
            return error_md(t("err_no_yaml", lang), lang)
        target = Path(os.path.expanduser(path or ""))
        if not path or target.is_dir():
            return error_md(t("err_yaml_name", lang, path=target / "run.yaml"), lang)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(yaml_text, encoding="utf-8")
        except OSError as exc:
            return error_md(t("err_cannot_write", lang, path=target, reason=exc.strerror), lang)
        return f"{t('saved', lang)}: `{target}`"

    def start(self, lang, device, *values, resume: bool = False):
        """`vitune train` on the form's YAML (written to the page's state folder) in its own
        process, once every start-up check of `vitune train` passes."""
        checked = forms.check(dict(zip(forms.FIELDS, values)), resume=resume)
        if checked.config is None:
            return error_md(page_words(checked.message, lang), lang)
        with self.lock:
            if self.job and self.job.running:
                return error_md(t("already_running", lang), lang)
            out = Path(checked.config.train.output_dir)
            from vitune.train.run_lock import output_dir_lock

            try:  # the CLI refuses a folder in use too; say it here before a process starts
                with output_dir_lock(out):
                    pass
            except UserError as exc:
                return error_md(str(exc), lang)
            try:
                self.state_dir.mkdir(parents=True, exist_ok=True)
                config_path = self.state_dir / f"{out.name}.yaml"
                config_path.write_text(checked.yaml, encoding="utf-8")
            except OSError as exc:
                return error_md(t("err_cannot_write", lang, path=self.state_dir, reason=exc.strerror), lang)
            overrides = ["train.resume=auto", "train.overwrite=false"] if resume else []
            self.job = jobs.TrainingJob.start(config_path, out, overrides, resuming=resume)
        return f"{t('running', lang)}: `vitune train {config_path}`" + (" --set train.resume=auto" if resume else "")

    def stop(self, lang):
        if self.job and self.job.stop():
            return t("stop_sent", lang)
        return t("nothing_to_stop", lang)

    def poll(self, lang):
        """The job's status (with its phase, step and time left), the last lines of its output,
        and its plots with a line for each that has no points yet; an earlier run's files in
        the folder are not this job's (a new Start clears the page)."""
        job = self.job
        if job is None:
            return t("no_job", lang), "", *_plots({}, lang)
        p = job.progress() or {}
        code = job.exit_code
        if code is None:
            phase = p.get("phase")
            phase = t(f"phase {phase}", lang) if f"phase {phase}" in TEXT else (phase or t("starting", lang))
            status = f"{t('running', lang)}** · **{phase}"
        elif code == 0:
            status = t("finished", lang)
        elif code == 130 or p.get("status") == "stopped":
            status = f"{t('stopped', lang)} ({t('exit_code', lang)} {code})"
        else:
            status = f"{t('failed', lang)} ({t('exit_code', lang)} {code})"
        text = f"**{status}** · `{job.output_dir}`"
        if p.get("max_steps"):
            text += f" · {t('step', lang)} {p['step']} / {p['max_steps']}"
            if p.get("eta_s") is not None and code is None:
                text += f" · {t('left', lang)} {_duration(p['eta_s'])}"
        return text, job.log(), *_plots(job.curves(), lang)

    # ------------------------------------------------------------- runs tab

    def runs(self, root, key, lang):
        """The runs table, the overlay's choices (the runs of this folder, the newest three picked)
        and their curves, and the runs' evaluation results, with the headers in `lang`."""
        found = jobs.list_runs(Path(root or self.root))
        rows = [jobs.run_summary(r) for r in found]
        for row in rows:
            row["status"] = t(row["status"], lang) if row["status"] in TEXT else row["status"]
        names = [str(r) for r in found]
        evals = [row for r in found for row in jobs.eval_results(r)]
        message = "" if found else t("no_runs", lang)
        return (table(rows, list(rows[0]) if rows else [], lang), gr.update(choices=names, value=names[:3]),
                table(evals, list(evals[0]) if evals else ["run", "evaluation", "file", "metric", "model", "base"], lang), message,
                self.overlay(names[:3], key, lang))

    def overlay(self, runs, key, lang):
        key = key or "loss"
        points = [{"step": step, "value": value, "run": Path(r).name}
                  for r in runs or [] for step, value in jobs.curves(Path(r)).get(key, [])]
        # the legend is set with the data: the plot keeps its first legend while only its data changes
        return gr.update(value=pd.DataFrame(points, columns=["step", "value", "run"]) if points else None,
                         colors_in_legend=sorted({p["run"] for p in points}), x_title=t("step", lang), y_title=key,
                         color_title=t("col run", lang))

    # ------------------------------------------------------------- chat tab

    def models(self, root):
        choices = [str(p) for p in jobs.list_models(Path(root or self.root))]
        return gr.update(choices=choices, value=choices[0] if choices else None), \
            gr.update(choices=choices, value=choices[0] if choices else None), \
            gr.update(choices=choices, value=choices[0] if choices else None)

    # ------------------------------------------------------------- eval and export tabs

    def evaluate(self, target, files, limit, generate, with_base, lang, progress=gr.Progress()):
        """`vitune eval` of the target: its rows (kept by the page for the language switch), the
        table in `lang` and where it was saved."""
        from vitune.eval import report
        from vitune.eval.runner import evaluate

        paths = forms.data_paths(files)
        try:
            if not target:
                raise UserError(t("err_eval_target", lang))
            if not paths:
                raise UserError(t("err_eval_files", lang))
            result = evaluate(target, paths, base="auto" if with_base else "none", generate=bool(generate),
                              limit=int(limit) or None, batch_size=8, max_new_tokens=64)
            report.save(result, report.default_out(target))  # kept in evals/ too: the Runs tab lists each
            out = report.default_out(target) / report.LATEST
        except Exception as exc:
            return [], None, error_md(one_line(exc), lang)
        model, base = report.rows_of(result, "model"), report.rows_of(result, "base")
        rows = [{"file": f, "metric": m, "model": round(v, 4),
                 "base": round(base[(f, m)], 4) if (f, m) in base else None,
                 "difference": round(v - base[(f, m)], 4) if (f, m) in base else None}
                for (f, m), v in model.items()]
        return rows, table(rows, ["file", "metric", "model", "base", "difference"], lang), f"{t('saved', lang)}: `{out}`"

    def export(self, source, kind, out, quant, force, lang):
        """Merge or GGUF export in a thread; its progress lines stream into the page."""
        lines: list[str] = []
        done: dict = {}

        def work():
            try:
                if kind == "merge":
                    from vitune.export.merge import merge_run

                    lines.append(t("export_merging", lang, source=source, out=out))
                    done["result"] = merge_run(source, out, force=bool(force))
                    lines.append(t("export_wrote", lang, out=out))
                else:
                    from vitune.export.gguf import export_gguf

                    r = export_gguf(source, out, quant=quant, force=bool(force), say=lines.append)
                    lines.append(t("export_wrote_gguf", lang, out=out, arch=r["architecture"], quant=r["quant"],
                                   mib=r["bytes"] / 2**20, tensors=r["tensors"]))
            except Exception as exc:
                done["error"] = one_line(exc)

        if not source or not out:
            yield "", error_md(t("err_export_target", lang), lang)
            return
        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        while worker.is_alive():
            yield "\n".join(lines), ""
            time.sleep(0.5)
        yield "\n".join(lines), error_md(done["error"], lang) if "error" in done else t("done", lang)


def table(rows: list[dict], columns: list[str], lang: str) -> pd.DataFrame:
    """Rows of a CLI function as a table whose headers are in `lang` (a header without words
    of its own, such as a metric name, stays)."""
    named = [t(f"col {c}", lang) if f"col {c}" in TEXT else c for c in columns]
    return pd.DataFrame([[row.get(c) for c in columns] for row in rows], columns=named)


def show_inspection(view: dict | None, lang: str):
    """An inspection (Ui.inspect) in `lang`: the summary, the first rejected rows (or a line
    saying there are none), the error, the rows as the model sees them."""
    if not view:
        return "", gr.update(value=None, visible=False), "", "", []
    if "error" in view:
        return "", gr.update(value=None, visible=False), "", error_md(page_words(view["error"], lang), lang), []
    s = view["stats"]
    lines = [f"| {t('tab_data', lang)} | |", "|---|---|",
             f"| {t('rows', lang)} | {s['rows_read']} / {s['rows_kept']} / {s['rows_rejected']} |"]
    for reason, count in s["rejected_by_reason"].items():
        lines.append(f"| &nbsp;&nbsp;{t('rejected_by', lang)}: {reason} | {count} |")
    lines.append(f"| {t('truncated', lang)} | {s['rows_truncated']} |")
    lines.append(f"| {t('train_eval_rows', lang)} | {s['train_rows']} / {s['eval_rows']} |")
    lines.append(f"| {t('tokens', lang)} | {s['total_tokens']:,} ({s['trained_token_fraction']:.1%}) |")
    p = s["length_percentiles"]
    if p:
        lines.append(f"| {t('lengths', lang)} | {p['p50']} / {p['p90']} / {p['p99']} / {p['max']} |")
    if s["packing_efficiency"] is not None:
        lines.append(f"| {t('packing_eff', lang)} | {s['packing_efficiency']:.1%} |")
    for path, counts in s["formats"].items():
        kinds = ", ".join(f"{k} {v}" for k, v in counts.items())
        lines.append(f"| {t('detected', lang)}: {Path(path).name} | {kinds} |")
    if s["template"]:  # "auto" resolved to the tokenizer's own template (a built-in says its name)
        name = t("tokenizer_template", lang) if s["template"] == "auto" else s["template"]
        lines.append(f"| {t('data_template', lang)} | {name} |")
    summary = "\n".join(lines)
    for notice in s["template_notices"]:
        summary += f"\n\n> {t('notice', lang)}: {notice}"
    rejected = [dict(zip(("file:line", "reason", "detail"), r)) for r in view["rejected"]]
    shown = []
    for header, pieces in view["rows"]:
        # the trained tokens are shown by colour alone (no legend): the same in both languages
        shown += [(f"\n[{t('row_of', lang, **header)}]\n", None)] + [(text, "trained" if on else None) for text, on in pieces]
    return (summary, gr.update(value=table(rejected, ["file:line", "reason", "detail"], lang), visible=bool(rejected)),
            "" if rejected else t("no_rejected", lang), "", shown)


def _plots(found: dict, lang: str) -> list:
    """The training plots from {key: [(step, value)]}: each as points (one logged step is a
    visible point), hidden with a line saying so while it has none."""
    plots, notes = [], []
    for plot, keys in CURVES.items():
        points = [{"step": step, "value": value, "series": key} for key in keys for step, value in found.get(key, [])]
        frame = pd.DataFrame(points, columns=["step", "value", "series"]) if points else None
        plots.append(gr.update(value=frame, visible=bool(points), colors_in_legend=[k for k in keys if k in found],
                               x_title=t("step", lang), y_title=t("axis value", lang), color_title=t("axis curve", lang)))
        notes.append("" if points else t("no_points", lang, plot=t(plot, lang)))
    return plots + notes


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


def build(root: Path, lang: str = "en", state_dir: Path | None = None) -> gr.Blocks:
    """The page. Each component whose words depend on the language is registered with its key
    (or, for choices, with a function of the language that gives them)."""
    ui = Ui(root, lang, state_dir)
    relabel: list[tuple[object, object, str]] = []  # (component, text key or lang -> value, attribute)

    def L(component, key, attr: str = "label"):
        relabel.append((component, key, attr))
        return component

    models_here = [str(p) for p in jobs.list_models(ui.root)]
    default_model = next((m for m in models_here if not (Path(m) / "summary.json").is_file()), forms.DEFAULTS["model.name_or_path"])
    with gr.Blocks(title="vitune") as page:
        with gr.Row():
            title = L(gr.Markdown(f"## {t('title', lang)}"), "title", "title")
            language = L(gr.Radio([(name, code) for code, name in LANGUAGES.items()], value=lang,
                                  label=t("language", lang), elem_id="language", scale=0, min_width=260), "language")
        lang_state = gr.State(lang)

        # --------------------------------------------------------- data
        with L(gr.Tab(t("tab_data", lang), id="data", elem_id="tab-data"), "tab_data"):
            with gr.Row():
                d_model = L(gr.Textbox(default_model, label=t("model", lang), elem_id="data-model"), "model")
                d_template = L(gr.Textbox("auto", label=t("template", lang), elem_id="data-template"), "template")
            with gr.Row():
                d_files = L(gr.Textbox(forms.DEFAULTS["data.train"], lines=3, label=t("files", lang), elem_id="data-files"), "files")
                # uploaded files are added to the list above: one place says what is inspected
                d_upload = L(gr.UploadButton(t("upload", lang), file_count="multiple", type="filepath", scale=0,
                                             min_width=200, elem_id="data-upload"), "upload")
            with gr.Row():
                d_len = L(gr.Number(1024, label=t("max_length", lang), precision=0, elem_id="data-max-length"), "max_length")
                d_pack = L(gr.Checkbox(True, label=t("packing", lang)), "packing")
                d_n = L(gr.Number(2, label=t("rows_shown", lang), precision=0), "rows_shown")
            d_go = L(gr.Button(t("inspect", lang), variant="primary", elem_id="data-inspect"), "inspect", "value")
            d_view = gr.State(None)  # the last inspection, shown again when the language changes
            d_summary = gr.Markdown(elem_id="data-summary")
            d_rejected = L(gr.Dataframe(label=t("first_rejected", lang), elem_id="data-rejected", interactive=False,
                                        visible=False), "first_rejected")
            d_no_rejected = gr.Markdown(elem_id="data-no-rejected")
            d_error = gr.Markdown(elem_classes="vitune-error", elem_id="data-error")
            d_rows = gr.HighlightedText(color_map={"trained": "green"}, show_legend=False, show_inline_category=False,
                                        combine_adjacent=True, show_label=False, elem_id="data-rows")
            d_shown = [d_summary, d_rejected, d_no_rejected, d_error, d_rows]
            d_upload.upload(lambda uploads, text: "\n".join([text.rstrip()] * bool(text.strip()) + list(uploads or [])),
                            [d_upload, d_files], d_files)
            d_go.click(ui.inspect, [d_model, d_template, d_files, d_len, d_pack, d_n, lang_state], [d_view, *d_shown])

        # --------------------------------------------------------- train
        with L(gr.Tab(t("tab_train", lang), id="train", elem_id="tab-train"), "tab_train"):
            inputs, errors = {}, {}
            d = forms.DEFAULTS

            def field(key, component):
                inputs[key] = L(component, key.split(".")[-1] if key.split(".")[-1] in _TEXT_KEYS else _label_key(key))
                errors[key] = gr.Markdown(elem_classes="vitune-error", elem_id=f"error-{key.replace('.', '-')}")
                return inputs[key]

            with gr.Row():
                with gr.Column():
                    field("model.name_or_path", gr.Textbox(default_model, label=t("model", lang), elem_id="f-model"))
                    field("model.template", gr.Textbox(d["model.template"], label=t("template", lang)))
                with gr.Column():
                    # every stage of the config's table; rl's rewards are not a form field: its error says to add them
                    stages = lambda code: [(f"{s.name}: {_stage_summary(s, code)}", s.name) for s in STAGE_INFO.values()]  # noqa: E731
                    L(field("train.stage", gr.Dropdown(stages(lang), value="sft", label=t("stage", lang))), stages, "choices")
                    field("method.type", gr.Radio(["lora", "qlora", "full"], value="lora", label=t("method", lang), elem_id="f-method"))
            with gr.Row():
                field("method.lora.r", gr.Number(d["method.lora.r"], precision=0, label=t("lora_r", lang)))
                field("method.lora.alpha", gr.Number(d["method.lora.alpha"], precision=0, label=t("lora_alpha", lang)))
                field("method.lora.dropout", gr.Number(d["method.lora.dropout"], label=t("lora_dropout", lang)))
                field("method.quantization.bits", gr.Dropdown([4, 8], value=4, label=t("bits", lang)))
            with gr.Row():
                field("data.train", gr.Textbox(d["data.train"], lines=2, label=t("files", lang), elem_id="f-data"))
                with gr.Column():
                    field("data.max_length", gr.Number(d["data.max_length"], precision=0, label=t("max_length", lang), elem_id="f-max-length"))
                    field("data.packing", gr.Checkbox(True, label=t("packing", lang)))
                    field("data.val_size", gr.Number(d["data.val_size"], label=t("val_size", lang), elem_id="f-val-size"))
            with gr.Row():
                field("train.epochs", gr.Number(d["train.epochs"], label=t("epochs", lang), elem_id="f-epochs"))
                field("train.max_steps", gr.Number(d["train.max_steps"], precision=0, label=t("max_steps", lang), elem_id="f-max-steps"))
                field("train.learning_rate", gr.Number(d["train.learning_rate"], label=t("learning_rate", lang), elem_id="f-lr"))
                field("train.micro_batch_size", gr.Number(d["train.micro_batch_size"], precision=0, label=t("micro_batch_size", lang)))
                field("train.gradient_accumulation", gr.Number(1, precision=0, label=t("gradient_accumulation", lang)))
            with gr.Row():
                field("train.logging_steps", gr.Number(d["train.logging_steps"], precision=0, label=t("logging_steps", lang), elem_id="f-logging"))
                field("train.eval_steps", gr.Number(0, precision=0, label=t("eval_steps", lang)))
                field("train.save_steps", gr.Number(0, precision=0, label=t("save_steps", lang)))
                field("train.output_dir", gr.Textbox(str(ui.root / "ui-run"), label=t("output_dir", lang), elem_id="f-output"))
                field("train.overwrite", gr.Checkbox(False, label=t("overwrite", lang), elem_id="f-overwrite"))
            with gr.Row():
                device = L(gr.Dropdown(DEVICES, value="CPU", label=t("device", lang), scale=0, min_width=160), "device")
                check = L(gr.Button(t("check", lang), elem_id="train-check"), "check", "value")
                start = L(gr.Button(t("start", lang), variant="primary", elem_id="train-start"), "start", "value")
                stop = L(gr.Button(t("stop", lang), variant="stop", elem_id="train-stop"), "stop", "value")
                resume = L(gr.Button(t("resume", lang), elem_id="train-resume"), "resume", "value")
            general = gr.Markdown(elem_id="train-message")
            with gr.Row():
                with gr.Column():
                    L(gr.Markdown(f"**{t('estimate', lang)}**"), "estimate", "bold")
                    estimate = gr.Markdown(elem_id="train-estimate")
                with gr.Column():
                    L(gr.Markdown(f"**{t('advice', lang)}**"), "advice", "bold")
                    advice = gr.Markdown(elem_id="train-advice")
            yaml_box = L(gr.Code(language="yaml", label=t("yaml", lang), interactive=False, elem_id="train-yaml"), "yaml")
            with gr.Row():
                yaml_path = L(gr.Textbox(str(ui.root / "ui-run.yaml"), label=t("save_yaml_to", lang)), "save_yaml_to")
                save = L(gr.Button(t("save_yaml", lang)), "save_yaml", "value")
            L(gr.Markdown(f"**{t('progress', lang)}**"), "progress", "bold")
            status = gr.Markdown(elem_id="train-status")
            plots, no_points = [], []
            with gr.Row():
                for key in CURVES:  # points, not lines: a run that logged one step shows it
                    with gr.Column(min_width=200):
                        plots.append(L(gr.ScatterPlot(x="step", y="value", color="series", label=t(key, lang),
                                                      elem_id=f"train-{key}", height=260, visible=False), key))
                        no_points.append(gr.Markdown(t("no_points", lang, plot=t(key, lang)), elem_id=f"train-{key}-none"))
            log = L(gr.Textbox(lines=8, max_lines=12, label=t("log", lang), interactive=False, elem_id="train-log"), "log")
            form = [inputs[k] for k in forms.FIELDS]
            checked_outputs = [*(errors[k] for k in forms.FIELDS), general, estimate, advice, yaml_box]
            check.click(ui.check_form, [lang_state, device, *form], checked_outputs)
            # the learning rate follows the method unless the user typed one
            inputs["method.type"].change(forms.learning_rate_for, [inputs["method.type"], inputs["train.learning_rate"]],
                                         inputs["train.learning_rate"])
            # the estimate and advice follow the form as it changes (the latest change wins)
            gr.on([c.change for c in (*form, device)], ui.check_form, [lang_state, device, *form], checked_outputs,
                  trigger_mode="always_last", show_progress="hidden")
            save.click(ui.save_yaml, [yaml_box, yaml_path, lang_state], general)
            start.click(ui.check_form, [lang_state, device, *form],
                        [*(errors[k] for k in forms.FIELDS), general, estimate, advice, yaml_box]).then(
                ui.start, [lang_state, device, *form], general)
            resume.click(lambda lang, dev, *v: ui.start(lang, dev, *v, resume=True), [lang_state, device, *form], general)
            stop.click(ui.stop, lang_state, general)
            timer = gr.Timer(2.0)
            timer.tick(ui.poll, lang_state, [status, log, *plots, *no_points])

        # --------------------------------------------------------- runs
        with L(gr.Tab(t("tab_runs", lang), id="runs", elem_id="tab-runs"), "tab_runs"):
            with gr.Row():
                r_root = L(gr.Textbox(str(ui.root), label=t("root", lang), elem_id="runs-root"), "root")
                r_refresh = L(gr.Button(t("refresh", lang), elem_id="runs-refresh", scale=0), "refresh", "value")
            r_message = gr.Markdown()
            r_table = L(gr.Dataframe(label=t("runs_table", lang), interactive=False, elem_id="runs-table"), "runs_table")
            with gr.Row():
                r_pick = L(gr.Dropdown([], multiselect=True, label=t("compare_runs", lang), elem_id="runs-pick"), "compare_runs")
                r_key = L(gr.Dropdown(["loss", "eval_loss", "learning_rate", "tokens_per_s", "grad_norm",
                                       "rewards/accuracy", "eval_rewards/accuracy", "reward", "eval_reward", "kl",
                                       "value_loss"], value="loss",
                                      label=t("curve_key", lang), scale=0, min_width=220), "curve_key")
            r_plot = gr.LinePlot(x="step", y="value", color="run", height=320, elem_id="runs-plot")
            r_evals = L(gr.Dataframe(label=t("eval_results", lang), interactive=False, elem_id="runs-evals"), "eval_results")
            runs_shown = [r_table, r_pick, r_evals, r_message, r_plot]
            r_refresh.click(ui.runs, [r_root, r_key, lang_state], runs_shown)
            r_pick.input(ui.overlay, [r_pick, r_key, lang_state], r_plot)
            r_key.change(ui.overlay, [r_pick, r_key, lang_state], r_plot)

        # --------------------------------------------------------- chat
        with L(gr.Tab(t("tab_chat", lang), id="chat", elem_id="tab-chat"), "tab_chat"):
            c_run, c_refresh = chat_tab(ui.chat, L, lang, lang_state, models_here)

        # --------------------------------------------------------- eval
        with L(gr.Tab(t("tab_eval", lang), id="eval", elem_id="tab-eval"), "tab_eval"):
            with gr.Row():
                e_target = L(gr.Dropdown(models_here, value=models_here[0] if models_here else None, allow_custom_value=True,
                                         label=t("eval_target", lang), elem_id="eval-target"), "eval_target")
                e_files = L(gr.Textbox("data/vmlu_vi.jsonl\ndata/qa_vi_eval.jsonl", lines=2,
                                       label=t("eval_files", lang), elem_id="eval-files"), "eval_files")
            with gr.Row():
                e_limit = L(gr.Number(40, precision=0, label=t("eval_limit", lang), elem_id="eval-limit"), "eval_limit")
                e_generate = L(gr.Checkbox(False, label=t("eval_generate", lang)), "eval_generate")
                e_base = L(gr.Checkbox(False, label=t("eval_base", lang)), "eval_base")
                e_go = L(gr.Button(t("run_eval", lang), variant="primary", elem_id="eval-run"), "run_eval", "value")
            e_message = gr.Markdown(elem_id="eval-message")
            e_rows = gr.State([])  # the last evaluation's rows, shown again when the language changes
            e_table = gr.Dataframe(interactive=False, elem_id="eval-table")
            e_go.click(ui.evaluate, [e_target, e_files, e_limit, e_generate, e_base, lang_state], [e_rows, e_table, e_message])

        # --------------------------------------------------------- export
        with L(gr.Tab(t("tab_export", lang), id="export", elem_id="tab-export"), "tab_export"):
            with gr.Row():
                x_source = L(gr.Dropdown(models_here, value=models_here[0] if models_here else None, allow_custom_value=True,
                                         label=t("export_source", lang), elem_id="export-source"), "export_source")
                kinds = lambda code: [(t("export_merge", code), "merge"), (t("export_gguf", code), "gguf")]  # noqa: E731
                x_kind = L(L(gr.Radio(kinds(lang), value="gguf", label=t("export_kind", lang)), "export_kind"), kinds, "choices")
            with gr.Row():
                x_out = L(gr.Textbox(str(ui.root / "model.gguf"), label=t("export_out", lang), elem_id="export-out"), "export_out")
                x_quant = L(gr.Dropdown(QUANTS, value="q8_0", label=t("quant", lang)), "quant")
                x_force = L(gr.Checkbox(False, label=t("force", lang)), "force")
                x_go = L(gr.Button(t("run_export", lang), variant="primary", elem_id="export-run"), "run_export", "value")
            x_log = gr.Textbox(lines=8, interactive=False, show_label=False, elem_id="export-log")
            x_message = gr.Markdown(elem_id="export-message")
            x_go.click(ui.export, [x_source, x_kind, x_out, x_quant, x_force, lang_state], [x_log, x_message])

        c_refresh.click(ui.models, r_root, [c_run, e_target, x_source])

        components = list(dict.fromkeys(c for c, _, _ in relabel))  # a component may be registered twice

        def switch(code):
            updates: dict = {c: {} for c in components}
            for component, key, attr in relabel:
                text = key(code) if callable(key) else t(key, code)
                if attr == "title":
                    updates[component]["value"] = f"## {text}"
                elif attr == "bold":
                    updates[component]["value"] = f"**{text}**"
                else:
                    updates[component][attr] = text
            return [code, *(gr.update(**updates[c]) for c in components)]

        # what is already shown is shown again in the new language: the data inspection and the
        # evaluation from what the page kept; the form's check, the training status and plots and
        # the runs by running them again (not left to the timer: a busy queue delays its tick)
        language.change(switch, language, [lang_state, *components]).then(
            show_inspection, [d_view, lang_state], d_shown).then(
            ui.poll, lang_state, [status, log, *plots, *no_points]).then(
            ui.check_form, [lang_state, device, *form], checked_outputs).then(
            ui.runs, [r_root, r_key, lang_state], runs_shown).then(
            lambda rows, code: table(rows, ["file", "metric", "model", "base", "difference"], code), [e_rows, lang_state], e_table)
        page.load(ui.runs, [r_root, r_key, lang_state], runs_shown)
    page.vitune = ui  # the tests reach the server's state through it
    return page


_TEXT_KEYS = {"template", "epochs", "learning_rate", "micro_batch_size", "gradient_accumulation", "max_length",
              "packing", "val_size", "max_steps", "logging_steps", "eval_steps", "save_steps", "output_dir",
              "overwrite", "stage"}


def _label_key(key: str) -> str:
    return {"model.name_or_path": "model", "method.type": "method", "method.lora.r": "lora_r",
            "method.lora.alpha": "lora_alpha", "method.lora.dropout": "lora_dropout",
            "method.quantization.bits": "bits", "data.train": "files"}[key]


def _stage_summary(stage, lang: str) -> str:
    key = f"stage {stage.name}"
    return t(key, lang) if key in TEXT else stage.summary


def launch(root: Path, host: str, port: int, lang: str, block: bool = True, state_dir: Path | None = None):
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    page = build(root, lang, state_dir)
    page.queue(default_concurrency_limit=4)
    page.launch(server_name=host, server_port=port, prevent_thread_lock=not block, quiet=True, show_error=False,
                css=CSS, footer_links=[], allowed_paths=[str(Path(root).resolve())])
    return page
