"""The rewards of stage rl, as TRL reward functions.

`rl.rewards` lists them, each with a weight (TRL sums them: `reward_weights`):

- `function: module:function` -- plain Python, imported as `import module` would from the working
  directory (so `examples.rewards:vietnamese` works from the repository root) or the installed
  packages, and called once per completion as `function(prompt, completion) -> float`: `prompt` is
  the text of the last user message (what was asked), `completion` the answer generated, without
  its end-of-turn marker.
- `model: RUN_DIR` -- a vitune reward model (a finished train.stage: rm run), which scores the
  whole conversation: the prompt's turns followed by the completion as the assistant's answer.

Every mistake in a reward is one line that names it (`module:function` or the folder) and says
what to do: it cannot be imported, is not a function, raises, or returns something that is not a
finite number (with the data row whose prompt it failed on).
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import numbers
import os
import sys
from pathlib import Path

from vitune.config import RewardSource, makes_reward_model
from vitune.data.records import Conversation, Message
from vitune.errors import ConfigError, UserError
from vitune.models.reward_model import RewardScorer


def check_rewards(rewards: list[RewardSource]) -> None:
    """Everything about `rl.rewards` that can be checked before training (imports the functions,
    reads the reward-model folders' summary.json); raises ConfigError."""
    for i, source in enumerate(rewards):
        if source.function:
            import_reward_function(source.function, f"rl.rewards.{i}.function")
        else:
            check_reward_model_folder(source.model, f"rl.rewards.{i}.model")
        if not math.isfinite(source.weight):
            raise ConfigError(f"rl.rewards.{i}.weight = {source.weight}: give a finite number")


def import_reward_function(spec: str, key: str):
    """`module:function` -> the function. The working directory comes first on the import path."""
    module_name, sep, name = spec.partition(":")
    if not sep or not module_name.strip() or not name.strip():
        raise ConfigError(f"{key} = {spec!r}: give it as module:function, e.g. examples.rewards:vietnamese")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise ConfigError(f"{key} = {spec}: no module {module_name} in the working directory ({cwd}) or the "
                              f"installed packages; check the name, or run vitune from the folder that holds it") from None
        raise ConfigError(f"{key} = {spec}: importing {module_name} failed: {_first_line(exc)}") from None
    except Exception as exc:  # the module's own code failed
        raise ConfigError(f"{key} = {spec}: importing {module_name} failed: {_first_line(exc)}") from None
    where = getattr(module, "__file__", None) or module_name
    if not hasattr(module, name):
        raise ConfigError(f"{key} = {spec}: {where} has no {name}; check the function's name")
    func = getattr(module, name)
    if not callable(func):
        raise ConfigError(f"{key} = {spec}: {name} in {where} is a {type(func).__name__}, not a function")
    try:
        inspect.signature(func).bind("prompt", "completion")
    except TypeError:
        raise ConfigError(f"{key} = {spec}: {name}{inspect.signature(func)} cannot be called as "
                          f"{name}(prompt, completion); give it these two parameters") from None
    except ValueError:  # a builtin without a signature: try it when training
        pass
    return func


def check_reward_model_folder(path: str, key: str) -> None:
    """A vitune reward model is a finished run folder whose summary.json says stage rm."""
    run = Path(path)
    summary = run / "summary.json"
    if not run.is_dir():
        raise ConfigError(f"{key} = {path}: folder not found; give the run folder of a finished train.stage: rm run")
    stage = None
    if summary.is_file():
        try:
            stage = json.loads(summary.read_text(encoding="utf-8")).get("stage")
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            stage = None
    if not makes_reward_model(stage):
        what = "no summary.json (not a finished run)" if not summary.is_file() else f"stage {stage or 'unknown'}"
        raise ConfigError(f"{key} = {path} is not a reward model ({what}); give the run folder of a finished "
                          "train.stage: rm run")


# ---------------------------------------------------------------- as TRL calls them


class FunctionReward:
    """A Python reward as a TRL reward function: called on the whole generation batch, it calls
    the user's function once per completion. The dataset's `question` and `source` columns come
    in as keyword arguments (TRL passes every column)."""

    def __init__(self, spec: str, func, stop_strings: list[str]):
        self.spec, self.func, self.stop_strings = spec, func, stop_strings
        self.__name__ = spec.partition(":")[2]  # TRL logs rewards/<name>/mean

    def __call__(self, prompts, completions, question, source, **kwargs) -> list[float]:
        out = []
        for asked, completion, where in zip(question, completions, source):
            try:
                value = self.func(asked, strip_end_of_turn(completion, self.stop_strings))
            except Exception as exc:
                raise UserError(f"reward {self.spec} raised {_first_line(exc)} on the prompt of {where}; "
                                "fix the function (it gets the prompt and the completion as strings)") from None
            out.append(finite(value, f"reward {self.spec}", where))
        return out


class ModelReward:
    """A vitune reward model as a TRL reward function: it scores each completion as the answer
    to its prompt's conversation (the `conversation` column, JSON)."""

    def __init__(self, path: str, stop_strings: list[str]):
        self.path, self.stop_strings = path, stop_strings
        self.scorer = RewardScorer.load(path)
        self.__name__ = Path(path).name or "reward_model"

    def __call__(self, prompts, completions, conversation, source, **kwargs) -> list[float]:
        convs = []
        for turns, completion, where in zip(conversation, completions, source):
            prompt = conversation_from_json(turns, where)
            answer = Message("assistant", strip_end_of_turn(completion, self.stop_strings))
            convs.append(Conversation(prompt.messages + [answer], system=prompt.system, source=where))
        scores = self.scorer.score(convs)
        return [finite(s, f"reward model {self.path}", c.source) for s, c in zip(scores, convs)]


def load_rewards(rewards: list[RewardSource], stop_strings: list[str]) -> list:
    """`rl.rewards` -> TRL reward functions, in order (their weights go to `reward_weights`)."""
    out = []
    for i, source in enumerate(rewards):
        if source.function:
            func = import_reward_function(source.function, f"rl.rewards.{i}.function")
            out.append(FunctionReward(source.function, func, stop_strings))
        else:
            out.append(ModelReward(source.model, stop_strings))
    return out


def strip_end_of_turn(text: str, stop_strings: list[str]) -> str:
    """The completion without the end-of-turn marker it ended on (TRL drops special tokens when
    decoding; a marker that is plain text is cut here)."""
    for stop in stop_strings:
        at = text.find(stop)
        if at >= 0:
            text = text[:at]
    return text


def finite(value, what: str, where: str) -> float:
    if isinstance(value, numbers.Real) or (hasattr(value, "item") and getattr(value, "ndim", 1) == 0):
        number = float(value)
        if math.isfinite(number):
            return number
    raise UserError(f"{what} returned {_short(value)} for the prompt of {where}; a reward must be a finite "
                    "number (int or float)")


def conversation_json(conv: Conversation) -> str:
    """A prompt's conversation as a dataset column (Arrow keeps strings as they are)."""
    return json.dumps({"system": conv.system, "messages": [[m.role, m.content, m.input] for m in conv.messages]},
                      ensure_ascii=False)


def conversation_from_json(text: str, source: str) -> Conversation:
    data = json.loads(text)
    return Conversation([Message(role, content, given) for role, content, given in data["messages"]],
                        system=data["system"], source=source)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _short(value) -> str:
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{text} ({type(value).__name__})"
