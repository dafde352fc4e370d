"""The page's words in English and Vietnamese. One key per label, button or message; the
language switch re-labels every component from this table (no reload, nothing lost)."""

from __future__ import annotations

import locale
import os
import re

from vitune.errors import UserError

LANGUAGES = {"vi": "Tiếng Việt", "en": "English"}

TEXT: dict[str, tuple[str, str]] = {  # key: (English, Vietnamese)
    "title": ("vitune: fine-tune open LLMs", "vitune: tinh chỉnh mô hình ngôn ngữ mở"),
    "language": ("Language", "Ngôn ngữ"),
    "root": ("Runs folder", "Thư mục các lần chạy"),
    # tabs
    "tab_data": ("Data", "Dữ liệu"),
    "tab_train": ("Train", "Huấn luyện"),
    "tab_runs": ("Runs", "Các lần chạy"),
    "tab_chat": ("Chat", "Trò chuyện"),
    "tab_eval": ("Evaluate", "Đánh giá"),
    "tab_export": ("Export", "Xuất mô hình"),
    # data and train form
    "model": ("Model (folder, Hub id or .gguf)", "Mô hình (thư mục, mã Hub hoặc tệp .gguf)"),
    "template": ("Chat template (auto = the tokenizer's own)", "Mẫu hội thoại (auto = mẫu của tokenizer)"),
    "files": ("Data files or folders (one per line)", "Tệp hoặc thư mục dữ liệu (mỗi dòng một mục)"),
    "upload": ("…or upload files", "…hoặc tải tệp lên"),
    "format": ("Format", "Định dạng"),
    "max_length": ("Max length (tokens)", "Độ dài tối đa (token)"),
    "packing": ("Packing", "Ghép chuỗi (packing)"),
    "rows_shown": ("Rows to show", "Số dòng hiển thị"),
    "inspect": ("Inspect data", "Kiểm tra dữ liệu"),
    "stage": ("Stage", "Giai đoạn"),
    "method": ("Method", "Phương pháp"),
    "lora_r": ("LoRA rank r", "Hạng LoRA r"),
    "lora_alpha": ("LoRA alpha", "LoRA alpha"),
    "lora_dropout": ("LoRA dropout", "LoRA dropout"),
    "bits": ("QLoRA bits", "Số bit QLoRA"),
    "val_size": ("Held-out rows (count or fraction)", "Dòng giữ lại để đánh giá (số dòng hoặc tỉ lệ)"),
    "epochs": ("Epochs", "Số epoch"),
    "max_steps": ("Max steps (0 = by epochs)", "Số bước tối đa (0 = theo epoch)"),
    "learning_rate": ("Learning rate", "Tốc độ học"),
    "micro_batch_size": ("Micro-batch size", "Kích thước micro-batch"),
    "gradient_accumulation": ("Gradient accumulation", "Tích luỹ gradient"),
    "logging_steps": ("Log every (steps)", "Ghi nhật ký mỗi (bước)"),
    "eval_steps": ("Evaluate every (steps, 0 = at the end)", "Đánh giá mỗi (bước, 0 = khi kết thúc)"),
    "save_steps": ("Checkpoint every (steps, 0 = none)", "Lưu checkpoint mỗi (bước, 0 = không)"),
    "output_dir": ("Run folder", "Thư mục lần chạy"),
    "overwrite": ("Replace the folder if it exists", "Ghi đè thư mục nếu đã có"),
    "device": ("Estimate for", "Ước tính cho"),
    "check": ("Check", "Kiểm tra"),
    "yaml": ("The config it will run", "Cấu hình sẽ chạy"),
    "save_yaml_to": ("Save the YAML as", "Lưu YAML thành"),
    "save_yaml": ("Save YAML", "Lưu YAML"),
    "start": ("Start training", "Bắt đầu huấn luyện"),
    "stop": ("Stop (checkpoint)", "Dừng (lưu checkpoint)"),
    "resume": ("Resume", "Tiếp tục"),
    "estimate": ("Memory and speed estimate", "Ước tính bộ nhớ và tốc độ"),
    "advice": ("Advice", "Lời khuyên"),
    "progress": ("Progress", "Tiến độ"),
    "log": ("Last lines of the training process", "Các dòng cuối của tiến trình huấn luyện"),
    "plot_loss": ("Loss", "Hàm mất mát (loss)"),
    "plot_lr": ("Learning rate", "Tốc độ học"),
    "plot_speed": ("Tokens/s", "Token/giây"),
    "plot_reward": ("Accuracy and margin (rm, dpo)", "Độ chính xác và biên (rm, dpo)"),
    "plot_rl_reward": ("Mean reward (rl)", "Phần thưởng trung bình (rl)"),
    "plot_kl": ("KL to the reference (rl)", "KL so với mô hình tham chiếu (rl)"),
    # runs
    "refresh": ("Refresh", "Làm mới"),
    "runs_table": ("Runs", "Các lần chạy"),
    "compare_runs": ("Runs to overlay", "Các lần chạy để so sánh"),
    "curve_key": ("Curve", "Đường cong"),
    "eval_results": ("Evaluation results (eval.json)", "Kết quả đánh giá (eval.json)"),
    # chat
    "chat_run": ("Run or model", "Lần chạy hoặc mô hình"),
    "system": ("System prompt", "Lời nhắc hệ thống"),
    "temperature": ("Temperature (0 = greedy)", "Nhiệt độ (0 = tham lam)"),
    "max_new_tokens": ("Longest answer (tokens)", "Câu trả lời dài nhất (token)"),
    "with_base": ("Side by side with the base model", "Đặt cạnh mô hình gốc"),
    "message": ("Your message", "Tin nhắn của bạn"),
    "send": ("Send", "Gửi"),
    "clear": ("Clear", "Xoá"),
    "chat_model": ("Fine-tuned", "Đã tinh chỉnh"),
    "chat_base": ("Base model", "Mô hình gốc"),
    "greedy": ("Greedy (temperature 0: the same answer every time)",
               "Tham lam (nhiệt độ 0: lần nào cũng cùng một câu trả lời)"),
    "top_p": ("Top p (nucleus sampling)", "Top p (lấy mẫu hạt nhân)"),
    "repetition_penalty": ("Repetition penalty (1 = off, e.g. 1.2)", "Phạt lặp lại (1 = tắt, ví dụ 1.2)"),
    "stop_answer": ("Stop", "Dừng"),
    # eval
    "eval_target": ("Run or model to evaluate", "Lần chạy hoặc mô hình cần đánh giá"),
    "eval_files": ("Evaluation files (one per line)", "Tệp đánh giá (mỗi dòng một tệp)"),
    "eval_limit": ("Rows per file (0 = all)", "Số dòng mỗi tệp (0 = tất cả)"),
    "eval_generate": ("Generate answers (EM, chrF, ROUGE-L)", "Sinh câu trả lời (EM, chrF, ROUGE-L)"),
    "eval_base": ("Compare with the base model", "So sánh với mô hình gốc"),
    "run_eval": ("Run evaluation", "Chạy đánh giá"),
    # export
    "export_source": ("Run or model folder", "Thư mục lần chạy hoặc mô hình"),
    "export_kind": ("Export as", "Xuất thành"),
    "export_out": ("Write to", "Ghi vào"),
    "quant": ("GGUF quantisation", "Lượng tử hoá GGUF"),
    "force": ("Replace if it exists", "Ghi đè nếu đã có"),
    "run_export": ("Export", "Xuất"),
    # messages
    "no_job": ("No training started from this page yet.", "Chưa có lần huấn luyện nào được bắt đầu từ trang này."),
    "running": ("running", "đang chạy"),
    "finished": ("finished", "đã xong"),
    "failed": ("failed", "thất bại"),
    "stopped": ("stopped", "đã dừng"),
    "step": ("step", "bước"),
    "left": ("left", "còn lại"),
    "exit_code": ("exit code", "mã thoát"),
    "valid": ("The config is valid.", "Cấu hình hợp lệ."),
    "saved": ("Saved", "Đã lưu"),
    "no_advice": ("Nothing unusual in these settings.", "Không có gì bất thường trong các thiết lập này."),
    "no_runs": ("No run folders here yet.", "Chưa có thư mục lần chạy nào ở đây."),
    "already_running": ("A training run started from this page is still running; stop it first.",
                        "Một lần huấn luyện bắt đầu từ trang này vẫn đang chạy; hãy dừng nó trước."),
    "stop_sent": ("Stop requested: the run saves a checkpoint and ends.",
                  "Đã yêu cầu dừng: lần chạy lưu checkpoint rồi kết thúc."),
    "nothing_to_stop": ("Nothing is running.", "Không có gì đang chạy."),
    "rows": ("rows read / kept / rejected", "dòng đọc / giữ / loại"),
    "rejected_by": ("rejected", "bị loại"),
    "truncated": ("rows truncated", "dòng bị cắt"),
    "train_eval_rows": ("train / held-out rows", "dòng huấn luyện / giữ lại"),
    "tokens": ("tokens (trained share)", "token (phần được huấn luyện)"),
    "lengths": ("length p50 / p90 / p99 / max", "độ dài p50 / p90 / p99 / max"),
    "packing_eff": ("packing efficiency", "hiệu suất ghép chuỗi"),
    "detected": ("format", "định dạng"),
    "first_rejected": ("First rejected rows", "Các dòng bị loại đầu tiên"),
    "row_of": ("row {i} of {n}: {tokens} tokens, {trained} trained",
               "dòng {i} / {n}: {tokens} token, {trained} được huấn luyện"),
    "trained_label": ("trained", "được huấn luyện"),
    "not_landed": ("This needs `{cmd}`, which is not available in this install.",
                   "Cần lệnh `{cmd}`, chưa có trong bản cài đặt này."),
    "error": ("error", "lỗi"),
    "done": ("done", "xong"),
    # the phase of a run (progress.json's `phase`, written by train/progress.py)
    "phase loading model": ("loading model", "đang tải mô hình"),
    "phase preparing data": ("preparing data", "đang chuẩn bị dữ liệu"),
    "phase measuring held-out loss": ("measuring held-out loss", "đang đo loss trên dữ liệu giữ lại"),
    "phase training": ("training", "đang huấn luyện"),
    "phase saving": ("saving", "đang lưu"),
    "phase finished": ("finished", "đã xong"),
    "phase stopped": ("stopped", "đã dừng"),
    "phase failed": ("failed", "thất bại"),
    "starting": ("starting", "đang khởi động"),
    # the stages' one-line summaries in the stage picker (config.STAGE_INFO says them in English)
    "stage sft": ("supervised fine-tuning on instructions or conversations",
                  "tinh chỉnh có giám sát trên chỉ dẫn hoặc hội thoại"),
    "stage pt": ("continued pretraining on raw text (text rows, .txt files)",
                 "tiếp tục tiền huấn luyện trên văn bản thô (dòng text, tệp .txt)"),
    "stage rm": ("a reward model trained on preference pairs", "mô hình phần thưởng học từ các cặp ưu tiên"),
    "stage dpo": ("preference optimisation: DPO, IPO, hinge, ORPO, SimPO, KTO (the dpo section picks the loss)",
                  "tối ưu theo ưu tiên: DPO, IPO, hinge, ORPO, SimPO, KTO (mục dpo chọn hàm mất mát)"),
    "stage rl": ("reinforcement learning from rewards: GRPO, RLOO, PPO (the rl section)",
                 "học tăng cường từ phần thưởng: GRPO, RLOO, PPO (mục rl)"),
    # the estimate (vitune estimate)
    "est part": ("part", "thành phần"),
    "est base weights": ("base weights", "trọng số gốc"),
    "est LoRA adapter": ("LoRA adapter", "bộ điều hợp LoRA"),
    "est gradients": ("gradients", "các gradient"),
    "est optimizer states": ("optimizer states", "trạng thái bộ tối ưu"),
    "est activations": ("activations", "giá trị kích hoạt"),
    "est logits + loss": ("logits + loss", "logits và hàm mất mát"),
    "est peak": ("peak on {device}", "đỉnh trên {device}"),
    "est line": ("trainable {trainable} of {total} parameters; predicted {speed} tokens/s",
                 "huấn luyện {trainable} trên {total} tham số; dự đoán {speed} token/giây"),
    # plots
    "axis value": ("value", "giá trị"),
    "axis curve": ("curve", "đường"),
    "no_points": ("{plot}: no points yet.", "{plot}: chưa có điểm nào."),
    # table headers (the keys of the rows the CLI's functions return) and their words
    "col run": ("run", "lần chạy"),
    "col evaluation": ("evaluation", "lần đánh giá"),
    "col stage": ("stage", "giai đoạn"),
    "col method": ("method", "phương pháp"),
    "col model": ("model", "mô hình"),
    "col steps": ("steps", "số bước"),
    "col final loss": ("final loss", "loss cuối"),
    "col held-out loss": ("held-out loss", "loss giữ lại"),
    "col tokens/s": ("tokens/s", "token/giây"),
    "col status": ("status", "trạng thái"),
    "col file": ("file", "tệp"),
    "col metric": ("metric", "chỉ số"),
    "col base": ("base", "mô hình gốc"),
    "col difference": ("difference", "chênh lệch"),
    "col file:line": ("file:line", "tệp:dòng"),
    "col reason": ("reason", "lý do"),
    "col detail": ("detail", "chi tiết"),
    "unfinished": ("unfinished", "chưa xong"),
    # data tab
    "data_template": ("template", "mẫu hội thoại"),
    "tokenizer_template": ("the tokenizer's own chat_template", "chat_template của tokenizer"),
    "notice": ("notice", "lưu ý"),
    "no_rejected": ("No rejected rows.", "Không có dòng nào bị loại."),
    # export
    "export_merge": ("merge (model folder)", "gộp (thư mục mô hình)"),
    "export_gguf": ("GGUF (llama.cpp, Ollama)", "GGUF (llama.cpp, Ollama)"),
    "export_merging": ("merging {source} into {out} ...", "đang gộp {source} vào {out} ..."),
    "export_wrote": ("wrote {out}", "đã ghi {out}"),
    "export_wrote_gguf": ("wrote {out}: {arch}, {quant}, {mib:.1f} MiB, {tensors} tensors",
                          "đã ghi {out}: {arch}, {quant}, {mib:.1f} MiB, {tensors} tensor"),
    # the page's own one-line errors, and the CLI's hints that it says in its own words
    "err_no_data": ("data.train: give at least one data file or folder",
                    "data.train: hãy cho ít nhất một tệp hoặc thư mục dữ liệu"),
    "err_not_found": ("data.train: file not found: {path}", "data.train: không tìm thấy tệp: {path}"),
    "err_no_yaml": ("check the form first: there is no valid config to save",
                    "hãy kiểm tra biểu mẫu trước: chưa có cấu hình hợp lệ để lưu"),
    "err_yaml_name": ("give a file name such as {path}", "hãy cho một tên tệp, ví dụ {path}"),
    "err_cannot_write": ("cannot write {path}: {reason}", "không ghi được {path}: {reason}"),
    "err_eval_target": ("choose a run or model folder to evaluate", "hãy chọn thư mục lần chạy hoặc mô hình cần đánh giá"),
    "err_eval_files": ("give at least one evaluation file", "hãy cho ít nhất một tệp đánh giá"),
    "err_export_target": ("choose the source folder and where to write", "hãy chọn thư mục nguồn và nơi ghi"),
    "err_output_dir": ("train.output_dir {path} already exists and is not empty; choose another folder or tick “{box}”",
                       "train.output_dir {path} đã có và không trống; hãy chọn thư mục khác hoặc đánh dấu “{box}”"),
    "hint_overwrite": ("tick “{box}”", "đánh dấu “{box}”"),
    "hint_resume": ("press “{button}”", "bấm “{button}”"),
}


def t(key: str, lang: str, **values) -> str:
    english, vietnamese = TEXT[key]
    text = vietnamese if lang == "vi" else english
    return text.format(**values) if values else text


def default_language(environ=os.environ) -> str:
    """vi when the system locale is Vietnamese (LANG / LC_ALL / LC_MESSAGES = vi_VN...), else en."""
    for name in ("LC_ALL", "LC_MESSAGES", "LANG", "LANGUAGE"):
        value = environ.get(name)
        if value:
            return "vi" if value.lower().startswith("vi") else "en"
    try:
        current = locale.getlocale()[0] or ""
    except ValueError:
        current = ""
    return "vi" if current.lower().startswith("vi") else "en"


def one_line(exc: BaseException) -> str:
    """A UserError's own line; anything else as its type and first line (the page never shows a traceback)."""
    if isinstance(exc, UserError):
        return str(exc)
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def error_md(message: str, lang: str) -> str:
    return f"**{t('error', lang)}:** {message}" if message else ""


# messages of the CLI (and of forms.check) that the page says in its own words: a whole message
# it knows, or the part of one that names a CLI flag for which the page has a control
_OWN_WORDS = [
    (re.compile(r"^data\.train: give at least one data file( or folder)?$"), "err_no_data"),
    (re.compile(r"^data\.train: file not found: (?P<path>.+)$"), "err_not_found"),
    (re.compile(r"^train\.output_dir (?P<path>.+) already exists and is not empty; choose another folder "
                r"or set train\.overwrite: true \(e\.g\. --set train\.overwrite=true\)$"), "err_output_dir"),
]
_FLAGS = [
    (re.compile(r"set train\.overwrite: true \(e\.g\. --set train\.overwrite=true\)|--set train\.overwrite=true"),
     "hint_overwrite"),
    (re.compile(r"vitune train CONFIG --set train\.resume=auto|--set train\.resume=auto"), "hint_resume"),
]


def page_words(message: str, lang: str) -> str:
    """A one-line message as the page says it: a message it knows in the page's language, and a
    CLI flag (--set train.overwrite=true) as the control of the page that sets it."""
    controls = {"box": t("overwrite", lang), "button": t("resume", lang)}
    for pattern, key in _OWN_WORDS:
        found = pattern.match(message)
        if found:
            return t(key, lang, **found.groupdict(), **controls)
    for pattern, key in _FLAGS:
        message = pattern.sub(lambda _: t(key, lang, **controls), message)
    return message
