"""vitune.eval.plot: metrics.jsonl read into curves, and loss curves written as PNG."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from vitune.errors import UserError
from vitune.eval.plot import plot_run, plot_runs, read_curves

PNG_SIZE = (800, 600)  # plot.SIZE (8 x 6 inches) at plot.DPI (100)


def write_metrics(run_dir: Path, lines: list) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "metrics.jsonl"
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return path


def training_run(run_dir: Path, lr: bool = True, scale: float = 1.0) -> Path:
    lines: list = [{"step": 0, "eval_loss": 3.0 * scale}]
    for step in range(1, 41):
        row = {"step": step, "epoch": step / 40, "loss": scale * (3.0 - step * 0.04), "grad_norm": 0.8}
        if lr:
            row["learning_rate"] = 0.001 * (1 - step / 40)
        lines.append(row)
        if step % 10 == 0:
            lines.append({"step": step, "eval_loss": scale * (2.9 - step * 0.03)})
    write_metrics(run_dir, lines)
    return run_dir


def test_read_curves_exact(tmp_path):
    path = write_metrics(tmp_path / "run", [
        {"step": 0, "eval_loss": 2.5, "eval_rewards/accuracy": 0.5},
        "",
        {"step": 5, "epoch": 0.5, "loss": 2.31, "learning_rate": 0.001, "grad_norm": None, "tokens_per_s": 118},
        "   ",
        {"step": 10, "loss": 2.0, "learning_rate": 0.0005, "grad_norm": 0.8, "note": "text", "flag": True},
        {"step": 10, "eval_loss": 2.05, "eval_bits_per_char": 1.2},
    ])
    assert read_curves(path) == {
        "eval_loss": [(0, 2.5), (10, 2.05)],
        "eval_rewards/accuracy": [(0, 0.5)],
        "loss": [(5, 2.31), (10, 2.0)],
        "learning_rate": [(5, 0.001), (10, 0.0005)],
        "tokens_per_s": [(5, 118.0)],
        "grad_norm": [(10, 0.8)],
        "eval_bits_per_char": [(10, 1.2)],
    }


def test_read_curves_bad_line(tmp_path):
    path = write_metrics(tmp_path / "run", [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.9}, '{"step": 3, "lo'])
    with pytest.raises(UserError) as info:
        read_curves(path)
    message = str(info.value)
    assert str(path) in message and "line 3" in message and "not JSON" in message
    assert "\n" not in message and info.value.__cause__ is None and info.value.__suppress_context__


def test_plot_run_writes_png(tmp_path):
    run = training_run(tmp_path / "my-run")
    out = plot_run(run)
    assert out == run / "loss.png"
    assert out.read_bytes().startswith(b"\x89PNG")
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == PNG_SIZE
    assert sorted(p.name for p in run.iterdir()) == ["loss.png", "metrics.jsonl"]  # no temporary left


def test_plot_run_without_learning_rate_and_custom_out(tmp_path):
    run = training_run(tmp_path / "run", lr=False)
    out = plot_run(run, tmp_path / "plots" / "curve.png")
    assert out == tmp_path / "plots" / "curve.png"
    with Image.open(out) as image:
        assert image.size == PNG_SIZE
    assert [p.name for p in out.parent.iterdir()] == ["curve.png"]


def test_plot_run_eval_only(tmp_path):
    run = tmp_path / "eval-only"
    write_metrics(run, [{"step": 0, "eval_loss": 3.1}])
    with Image.open(plot_run(run)) as image:
        assert image.size == PNG_SIZE


def test_plot_run_without_metrics(tmp_path):
    run = tmp_path / "empty-run"
    run.mkdir()
    with pytest.raises(UserError, match="empty-run") as info:
        plot_run(run)
    assert "\n" not in str(info.value)
    assert list(run.iterdir()) == []


def test_plot_run_without_loss(tmp_path):
    run = tmp_path / "lr-only"
    write_metrics(run, [{"step": 1, "learning_rate": 0.001}, {"step": 2, "learning_rate": 0.0009}])
    with pytest.raises(UserError, match="lr-only") as info:
        plot_run(run)
    assert "\n" not in str(info.value)
    assert [p.name for p in run.iterdir()] == ["metrics.jsonl"]


def test_plot_runs_overlays(tmp_path):
    runs = [training_run(tmp_path / "lr-1e-3"), training_run(tmp_path / "lr-3e-4", scale=0.8)]
    out = plot_runs(runs, tmp_path / "compare.png")
    assert out == tmp_path / "compare.png"
    assert out.read_bytes().startswith(b"\x89PNG")
    with Image.open(out) as image:
        assert image.size == PNG_SIZE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compare.png", "lr-1e-3", "lr-3e-4"]


def test_plot_runs_names_run_without_key(tmp_path):
    good = training_run(tmp_path / "good")
    bare = tmp_path / "bare"
    write_metrics(bare, [{"step": 1, "learning_rate": 0.001}])
    with pytest.raises(UserError, match="bare"):
        plot_runs([good, bare], tmp_path / "compare.png")
    assert not (tmp_path / "compare.png").exists()
    with pytest.raises(UserError, match="missing"):
        plot_runs([good, tmp_path / "missing"], tmp_path / "compare.png")
