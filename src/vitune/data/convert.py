"""`vitune data convert`: rewrite a dataset in another row format, refusing to lose information."""

from __future__ import annotations

import json
from pathlib import Path
from typing import get_args

from vitune.config import DataConfig, DataFormat, DatasetSpec
from vitune.data.pipeline import DataReport, raise_for_bad_rows, read_conversations
from vitune.data.records import Conversation
from vitune.errors import DataError, UserError

TARGETS = ("alpaca", "sharegpt", "messages")
SHAREGPT_ROLES = {"user": "human", "assistant": "gpt"}


def _losses(conv: Conversation, target: str) -> list[str]:
    """What `target` cannot hold of this conversation."""
    lost = []
    if any(m.train is not None for m in conv.messages):
        lost.append("per-message 'train' flags")
    if target != "alpaca" and any(m.input for m in conv.messages):
        lost.append("the separate 'input' field (it is joined to the instruction)")
    return lost


def to_row(conv: Conversation, target: str) -> dict:
    if target == "alpaca":
        *history, last_user, last_answer = conv.messages
        row = {"instruction": last_user.content, "input": last_user.input or "", "output": last_answer.content}
        if conv.system is not None:
            row["system"] = conv.system
        if history:
            row["history"] = [[history[i].text, history[i + 1].content] for i in range(0, len(history), 2)]
        return row
    if target == "sharegpt":
        turns = [{"from": "system", "value": conv.system}] if conv.system is not None else []
        turns += [{"from": SHAREGPT_ROLES[m.role], "value": m.text} for m in conv.messages]
        return {"conversations": turns}
    messages = [{"role": "system", "content": conv.system}] if conv.system is not None else []
    messages += [{"role": m.role, "content": m.text} for m in conv.messages]
    return {"messages": messages}


def convert_file(src: str, dst: str, target: str, source_format: str = "auto", force: bool = False) -> int:
    """Convert every row of `src` into `target` format in `dst` (.jsonl or .json); returns the row count."""
    if target not in TARGETS:
        raise UserError(f"--to {target!r}: choose one of {', '.join(TARGETS)}")
    out = Path(dst)
    if out.suffix not in (".jsonl", ".json"):
        raise UserError(f"{dst}: the output file must end in .jsonl or .json")
    if out.is_dir():
        raise UserError(f"{dst} is a folder; give the path of the output file, e.g. {out / 'converted.jsonl'}")
    blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise UserError(f"{dst}: {blocker} is a file, not a folder; choose another output path")
    if source_format not in get_args(DataFormat):
        raise UserError(f"--from {source_format!r}: choose one of {', '.join(get_args(DataFormat))}")
    spec = DatasetSpec(path=src, format=source_format)
    settings = DataConfig(train=[spec], normalize={"unicode": "none"})  # convert exactly what is there
    report = DataReport()
    convs = read_conversations(spec, settings, report)
    raise_for_bad_rows(report, "raise")
    if not convs:
        raise DataError(f"{src}: no rows to convert")
    if not force:
        for conv in convs:
            lost = _losses(conv, target)
            if lost:
                raise UserError(
                    f"{conv.source}: converting to {target} would lose {' and '.join(lost)}; "
                    "pass --force to convert anyway"
                )
    rows = [to_row(conv, target) for conv in convs]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", encoding="utf-8") as fh:
            if out.suffix == ".json":
                json.dump(rows, fh, ensure_ascii=False, indent=1)
            else:
                for row in rows:
                    fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    except OSError as exc:
        raise UserError(f"cannot write {dst}: {exc.strerror or exc}; choose another output file") from None
    return len(rows)
