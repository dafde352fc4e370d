"""Experiment trackers (train.report_to): TensorBoard, Weights & Biases, MLflow.

transformers' own callbacks (TensorBoardCallback, WandbCallback, MLflowCallback) send each log of
the Trainer to their tracker: the loss, learning rate and epoch, vitune's figures that
VituneTrainerMixin.log adds (tokens/s, padding fraction, TFLOP/s, a stage's metrics such as rewards),
the held-out figures (eval_loss, ...) and the eval section's (eval/<file>/<figure>, logged through
the trainer by train/evaluation.py). What vitune adds here:

    check_trackers(config)          at start-up: a tracker whose library is missing is one line
    run_name(config)                train.run_name, or the run folder's name (TrainingArguments.run_name)
    tracker_runs(config, main)      the W&B and MLflow runs, open around training and the summary
    log_summary(trainer, summary)   summary.json's figures, as summary/<key> at the last step

vitune opens the W&B and MLflow runs itself, before training, named and with its config (flattened:
method.type, train.learning_rate, ...), logged once; the callbacks log into a run that is already
open (both look for one first) and add TrainingArguments and the model's config under their own
keys. Two things need it: MLflowCallback ends its run when training ends, before the runner's
last held-out loss and the summary; and WandbCallback never finishes its run, so a second run in
the same process (a script that trains several, the tests) would log into the first. Only the main process opens runs;
the callbacks log on it alone. Where the runs go is the trackers' own environment variables
(WANDB_PROJECT, WANDB_MODE, WANDB_DIR, MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME, ...).
"""

from __future__ import annotations

import importlib.util
import os
import re
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from vitune.config import RunConfig
from vitune.errors import ConfigError, UserError

SUMMARY_PREFIX = "summary/"


@dataclass(frozen=True)
class Tracker:
    name: str  # as train.report_to names it
    module: str  # the library transformers' callback imports
    install: str  # the command that installs it


TRACKERS: dict[str, Tracker] = {t.name: t for t in (
    Tracker("tensorboard", "tensorboard", "pip install tensorboard"),
    Tracker("wandb", "wandb", "pip install 'vitune[wandb]'"),
    Tracker("mlflow", "mlflow", "pip install 'vitune[mlflow]'"),
)}


def check_trackers(config: RunConfig) -> None:
    """Raise ConfigError (one line, with the install command) for a tracker in train.report_to whose
    library is not installed."""
    for name in config.train.report_to:
        tracker = TRACKERS.get(name)  # none: no tracker
        if tracker is not None and importlib.util.find_spec(tracker.module) is None:
            raise ConfigError(f"train.report_to: {name} is not installed: {tracker.install}")


def run_name(config: RunConfig) -> str:
    """The run's name in the trackers: train.run_name, or the run folder's name (runs/my-sft -> my-sft)."""
    return config.train.run_name or Path(os.path.abspath(config.train.output_dir)).name


def flat_config(config: RunConfig) -> dict:
    """The resolved config, as config.yaml holds it, one key per value: {"method.type": "lora",
    "train.learning_rate": 0.0002, "data.train.0.path": "data/alpaca_vi.jsonl", ...}. Lists of
    values (method.lora.target_modules, train.report_to) stay lists; lists of entries are numbered."""
    out: dict = {}

    def walk(key: str, value) -> None:
        if isinstance(value, dict) and value:
            for name, inner in value.items():
                walk(f"{key}.{name}" if key else name, inner)
        elif isinstance(value, list) and any(isinstance(item, dict) for item in value):
            for i, item in enumerate(value):
                walk(f"{key}.{i}", item)
        else:
            out[key] = value

    walk("", config.model_dump(mode="json"))
    return out


# ---------------------------------------------------------------- the runs


@contextmanager
def tracker_runs(config: RunConfig, main_process: bool):
    """The W&B and MLflow runs of train.report_to, opened (on the main process) with the run's name
    and flattened config, and closed on leaving: finished, or failed if an exception leaves."""
    name, trackers = run_name(config), config.train.report_to if main_process else []
    with ExitStack() as runs:
        if "wandb" in trackers:
            runs.enter_context(_wandb_run(name, flat_config(config)))
        if "mlflow" in trackers:
            runs.enter_context(_mlflow_run(name, flat_config(config)))
        yield


@contextmanager
def _wandb_run(name: str, config: dict):
    import wandb  # lazy: optional dependency

    if wandb.run is not None:  # the caller's own run: WandbCallback logs into it, and it is the caller's to finish
        wandb.run.config.update(config, allow_val_change=True)
        yield
        return
    try:
        run = wandb.init(project=os.environ.get("WANDB_PROJECT", "vitune"), name=name)
    except wandb.errors.Error as exc:  # no API key, no network, ...
        wandb.teardown()
        raise UserError(f"train.report_to: wandb could not start a run ({_first_line(exc)}); to log without an "
                        "account or network, set WANDB_MODE=offline") from None
    run.config.update(config, allow_val_change=True)  # a resumed run (WANDB_RESUME) may hold other values
    try:
        yield
    except BaseException as exc:
        run.finish(exit_code=getattr(exc, "exit_code", 1))  # RunInterrupted: 130 or 143
        raise
    else:
        run.finish()
    finally:
        # W&B reads its environment (WANDB_DIR, WANDB_MODE, ...) once per process, at its first run:
        # the next run in this process (a script's loop, the tests) reads it again
        wandb.teardown()


@contextmanager
def _mlflow_run(name: str, config: dict):
    import mlflow  # lazy: optional dependency
    from mlflow.exceptions import MlflowException  # lazy: optional dependency

    own = mlflow.active_run() is None  # else the caller's run: MLflowCallback logs into it
    try:
        # MLFLOW_RUN_ID continues that run; MLFLOW_EXPERIMENT_NAME picks (or creates) the experiment
        run = mlflow.start_run(run_name=name) if own else mlflow.active_run()
        _log_params(mlflow.MlflowClient(), run.info.run_id, config)
    except MlflowException as exc:
        if own and mlflow.active_run() is not None:
            mlflow.end_run("FAILED")
        raise UserError(f"train.report_to: mlflow could not start a run at {mlflow.get_tracking_uri()} "
                        f"({_first_line(exc)}); check MLFLOW_TRACKING_URI") from None
    try:
        yield
    except BaseException:
        if own:
            mlflow.end_run("FAILED")
        raise
    if own:
        mlflow.end_run()


def _log_params(client, run_id: str, config: dict) -> None:
    """vitune's config as the run's params, beside those of MLflowCallback (TrainingArguments and the
    model's config: unprefixed keys, where vitune's start with their section). MLflow keeps a param's first value and refuses another: a continued run (MLFLOW_RUN_ID) keeps
    those it has. Values longer than MLflow's limit are cut to it."""
    from mlflow.entities import Param  # lazy: optional dependency
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH  # lazy: optional dependency

    logged = client.get_run(run_id).data.params
    params = {}
    for key, value in config.items():
        key = re.sub(r"[^0-9A-Za-z_\-. :/]", "_", key)  # the characters MLflow takes in a key
        if key not in logged:
            params[key] = Param(key, str(value)[:MAX_PARAM_VAL_LENGTH])
    batch = list(params.values())
    for i in range(0, len(batch), MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, params=batch[i:i + MAX_PARAMS_TAGS_PER_BATCH])


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def log_summary(trainer, summary: dict) -> None:
    """summary.json's numbers (tokens/s over the run, packing efficiency, held-out loss at the start
    and end, ...) to every tracker, as summary/<key> at the run's last step: through the trainer's
    callbacks, as Trainer.log sends a log (metrics.jsonl and the progress bar keep no such key)."""
    figures = {f"{SUMMARY_PREFIX}{key}": value for key, value in summary.items()
               if isinstance(value, (int, float)) and not isinstance(value, bool)}
    if trainer.args.report_to and figures:
        trainer.control = trainer.callback_handler.on_log(trainer.args, trainer.state, trainer.control, figures)
