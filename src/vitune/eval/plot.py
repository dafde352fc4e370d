"""Loss curves of training runs as PNG images.

In: a run folder's metrics.jsonl (one JSON object a line: training lines with loss, learning_rate,
...; evaluation lines with eval_loss and other eval_* keys, and the figures of evaluations while
training, eval/<file>/<figure>). Out: {key: [(step, value), ...]} (read_curves), or a PNG of one run
(plot_run: losses; plot_evaluations: the eval/ figures) or of several runs overlaid (plot_runs).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from vitune.errors import DISK_ERRNOS, DiskError, UserError

METRICS = "metrics.jsonl"
# how the figures of evaluations while training are named in metrics.jsonl: eval/<file stem>/<figure>
TASK_PREFIX = "eval/"
SIZE, DPI = (8.0, 6.0), 100  # 800 x 600 pixels: readable on a screen and in a README
_NOT_CURVES = ("step", "epoch")


def read_curves(metrics_file: Path) -> dict[str, list[tuple[int, float]]]:
    """{key: [(step, value), ...]} for every numeric key except "step" and "epoch", in file order.

    Blank lines are skipped, and so are values that are not numbers (None, text, booleans) and
    lines without an integer step. A line that is not JSON raises UserError naming file and line.
    """
    metrics_file = Path(metrics_file)
    curves: dict[str, list[tuple[int, float]]] = {}
    with open(metrics_file, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                # the trainer appends a line at a time, so a bad line is most often the last one
                # being written while a run is still going
                raise UserError(
                    f"{metrics_file} line {number}: not JSON ({exc.msg}); "
                    "the run may still be writing it — retry when it ends"
                ) from None
            if not isinstance(row, dict):
                raise UserError(f"{metrics_file} line {number}: not a JSON object; expected one metrics row a line")
            step = row.get("step")
            if not _is_number(step) or not float(step).is_integer():
                continue  # a point needs a step to sit on
            for key, value in row.items():
                if key not in _NOT_CURVES and _is_number(value):
                    curves.setdefault(key, []).append((int(step), float(value)))
    return curves


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    """Write a PNG (default run_dir / "loss.png") of training and held-out loss against the step.

    Learning rate, when logged, goes on a small second axes below, sharing the step axis.
    Raises UserError if there is no metrics.jsonl or it has no loss and no eval_loss point.
    """
    run_dir = Path(run_dir)
    curves = _curves_of(run_dir)
    if not curves.get("loss") and not curves.get("eval_loss"):
        raise UserError(f"{run_dir}: {METRICS} has no loss or eval_loss yet; plot once the run has logged a step")
    plt = _pyplot()
    lr = curves.get("learning_rate")
    if lr:
        fig, (ax, ax_lr) = plt.subplots(2, 1, sharex=True, figsize=SIZE, dpi=DPI, gridspec_kw={"height_ratios": [3, 1]})
    else:
        fig, ax = plt.subplots(figsize=SIZE, dpi=DPI)
    if curves.get("loss"):
        ax.plot(*zip(*curves["loss"]), label="training loss", color="tab:blue", linewidth=1.2)
    if curves.get("eval_loss"):
        # few points: markers show where evaluation happened
        ax.plot(*zip(*curves["eval_loss"]), label="held-out loss", color="tab:orange", marker="o", markersize=4)
    ax.set_ylabel("loss")
    ax.set_title(run_dir.resolve().name)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    if lr:
        ax_lr.plot(*zip(*lr), color="tab:green", linewidth=1.0)
        ax_lr.set_ylabel("learning rate")
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax_lr.grid(alpha=0.3)
        ax_lr.set_xlabel("step")
    else:
        ax.set_xlabel("step")
    return _save(fig, Path(out) if out is not None else run_dir / "loss.png")


def plot_evaluations(run_dir: Path, out: Path | None = None) -> Path:
    """Write a PNG (default run_dir / "eval_curves.png") of the evaluations while training: one small
    axes per figure (eval/vmlu_vi/acc, eval/qa_vi_eval/chrf, ...), as each has its own scale.
    Raises UserError if metrics.jsonl has no such figure."""
    run_dir = Path(run_dir)
    curves = {k: v for k, v in _curves_of(run_dir).items() if k.startswith(TASK_PREFIX)}
    if not curves:
        raise UserError(f"{run_dir}: {METRICS} has no evaluation while training (eval/<file>/<figure>); "
                        "add an eval: section to the run config")
    plt = _pyplot()
    columns = min(3, len(curves))
    rows = -(-len(curves) // columns)
    fig, axes = plt.subplots(rows, columns, sharex=True, squeeze=False, figsize=(SIZE[0], max(SIZE[1], 2.2 * rows)),
                             dpi=DPI)
    for i, (key, points) in enumerate(curves.items()):
        ax = axes[i // columns][i % columns]
        name, _, figure = key[len(TASK_PREFIX):].rpartition("/")
        ax.plot(*zip(*points), color=f"C{i % 10}", marker="o", markersize=3, linewidth=1.2)
        ax.set_title(f"{name}: {figure}", fontsize=9)
        ax.grid(alpha=0.3)
    for i in range(len(curves), rows * columns):
        axes[i // columns][i % columns].set_visible(False)
    for i in range(max(0, len(curves) - columns), len(curves)):  # the lowest axes of each column
        axes[i // columns][i % columns].set_xlabel("step")
        axes[i // columns][i % columns].xaxis.set_tick_params(labelbottom=True)
    fig.suptitle(f"{run_dir.resolve().name}: evaluations while training")
    return _save(fig, Path(out) if out is not None else run_dir / "eval_curves.png")


def plot_runs(run_dirs: list[Path], out: Path, key: str = "loss") -> Path:
    """Overlay one curve per run (label = folder name) for `key`, plus a dashed eval_<key> curve
    in the same colour when the run has one. Raises UserError naming a run without either."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=SIZE, dpi=DPI)
    try:
        for i, run_dir in enumerate(Path(d) for d in run_dirs):
            curves = _curves_of(run_dir)
            train, held_out = curves.get(key), curves.get(f"eval_{key}")
            if not train and not held_out:
                raise UserError(f"{run_dir}: {METRICS} has no {key} or eval_{key} point; check the key and the run")
            colour, name = f"C{i % 10}", run_dir.resolve().name
            if train:
                ax.plot(*zip(*train), color=colour, linewidth=1.2, label=name)
            if held_out:
                ax.plot(*zip(*held_out), color=colour, linestyle="--", marker="o", markersize=3,
                        label=f"{name} (held-out)")
    except UserError:
        plt.close(fig)
        raise
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_title(f"{key} by step")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    return _save(fig, Path(out))


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)  # True is an int in Python


def _curves_of(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    metrics = run_dir / METRICS
    if not metrics.is_file():
        raise UserError(f"{run_dir}: no {METRICS}; is this a run folder (the output_dir of vitune train)?")
    return read_curves(metrics)


def _pyplot():
    # imported here so `import vitune.eval.plot` stays cheap; Agg before pyplot so no window opens
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path) -> Path:
    """Save `fig` as PNG at `out` via a temporary file and a rename, so a half-written PNG never exists."""
    plt = _pyplot()
    out.parent.mkdir(parents=True, exist_ok=True)
    # same folder, so the rename is atomic; pid in the name, so two plotters never share it
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fig.tight_layout()
            fig.savefig(fh, format="png", dpi=DPI)
        os.replace(tmp, out)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exc.errno in DISK_ERRNOS:
            raise DiskError(f"{out}: could not write the plot ({os.strerror(exc.errno)}); free space or check the disk") from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return out
