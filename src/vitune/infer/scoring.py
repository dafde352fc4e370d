"""Rewards of a trained reward model for the rows of data files (`vitune score`)."""

from __future__ import annotations

from vitune.config import DataConfig, DatasetSpec
from vitune.data.formats import OTHER_PARSERS, PARSERS, RowProblem, detect_format
from vitune.data.pipeline import _normalize
from vitune.data.sources import read_rows
from vitune.errors import DataError
from vitune.models.reward_model import RewardScorer


def score_files(run: str, paths: list[str]) -> list[dict]:
    """One dict per row: {source, chosen, rejected} for preference rows, {source, reward} otherwise.

    Rows are read as training reads them (vitune.data.formats); a row that cannot be read stops
    with its file and row, since a score silently missing would shift every later one."""
    settings = DataConfig(train=[DatasetSpec(path=p) for p in paths])
    scorer = RewardScorer.load(run)  # a folder that is not a reward model fails before the data is read
    convs, layout = [], []
    for path in paths:
        for raw in read_rows(path):
            if raw.row is None:
                raise DataError(f"{raw.source}: {raw.problem[1]}")
            fmt = detect_format(raw.row, {})
            try:
                if fmt in ("preference", "unpaired"):
                    record = OTHER_PARSERS[fmt](raw.row, {})
                    answers = [a for a in (record.chosen, record.rejected) if a is not None]
                    for answer in answers:
                        conv = record.conversation(answer)
                        _normalize(conv, settings.normalize)
                        convs.append(conv)
                    layout.append((raw.source, "pair" if len(answers) == 2 else "one"))
                elif fmt in PARSERS:
                    conv = PARSERS[fmt](raw.row, {})
                    _normalize(conv, settings.normalize)
                    convs.append(conv)
                    layout.append((raw.source, "one"))
                else:
                    raise DataError(f"{raw.source}: cannot tell the format from the fields "
                                    f"({', '.join(sorted(map(str, raw.row)))}); give preference, alpaca, "
                                    "sharegpt or messages rows")
            except RowProblem as problem:
                raise DataError(f"{raw.source}: {problem.detail}") from None
    if not convs:
        raise DataError(f"no rows to score in {', '.join(paths)}")
    rewards = iter(scorer.score(convs))
    out = []
    for source, kind in layout:
        if kind == "pair":
            out.append({"source": source, "chosen": next(rewards), "rejected": next(rewards)})
        else:
            out.append({"source": source, "reward": next(rewards)})
    return out
