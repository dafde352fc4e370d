"""What the package carries besides its code: the bundled Vietnamese datasets (`data/`, with
their data card) and the examples (`examples/`: run configs, DeepSpeed/FSDP/accelerate files,
reward functions, the demo scripts).

They are package data, found through importlib.resources, so a pip-installed vitune has them
as a checkout does (a checkout's top-level data/ and examples/ are links to these folders).
`vitune examples copy NAME DIR` puts an example and every bundled file it names into DIR,
keeping their relative paths, so that the README's commands run there unchanged.
"""

from __future__ import annotations

import json
import re
import shutil
from importlib.resources import files
from pathlib import Path

from vitune.errors import UserError

# A bundled file named in an example's text ("data/alpaca_vi.jsonl", "examples/deepspeed/zero2.json"),
# or a reward function's module ("examples.rewards:vietnamese" is examples/rewards.py).
_NAMED_PATH = re.compile(r"\b(?:data|examples)/[\w./-]+\.(?:jsonl|json|yaml|py|md)\b")
_NAMED_MODULE = re.compile(r"\bexamples\.(\w+):")
_SUFFIXES = (".yaml", ".json", ".py")
DATA = "data"  # the name that copies every bundled dataset


def root() -> Path:
    """The folder holding data/ and examples/ inside the installed package."""
    here = files(__name__)
    if not isinstance(here, Path):  # a zipped install: importlib.resources gives no folder to copy from
        raise UserError(f"vitune's bundled files are not in a folder ({here}); install vitune unzipped (pip install vitune)")
    return here


def data_dir() -> Path:
    """The bundled datasets' folder (alpaca_vi.jsonl, sharegpt_vi.jsonl, ...)."""
    return root() / "data"


def examples() -> dict[str, str]:
    """{name: what it is} for every example: its path under examples/ without the suffix
    ("quickstart", "deepspeed/zero2"), and its first comment line; "data" is the datasets."""
    folder = root() / "examples"
    found = {DATA: "the bundled Vietnamese datasets (data/*.jsonl) and their data card"}
    for path in sorted(p for p in folder.rglob("*") if p.suffix in _SUFFIXES and "__pycache__" not in p.parts):
        name = path.relative_to(folder).with_suffix("").as_posix()
        found[name] = _first_comment(path)
    return found


def example_files(name: str) -> list[str]:
    """The example's file and every bundled file it names, and those they name in turn, as paths
    relative to the bundle ("examples/ppo.yaml", "examples/rewards.py", "data/alpaca_vi.jsonl")."""
    known = examples()
    if name not in known:
        raise UserError(f"no example named {name!r}; `vitune examples list` shows the {len(known)} examples")
    if name == DATA:
        return sorted(p.relative_to(root()).as_posix() for p in data_dir().iterdir() if p.is_file())
    start = next(p for p in (root() / "examples").glob(f"{name}.*") if p.suffix in _SUFFIXES)
    todo, seen = [start.relative_to(root()).as_posix()], []
    while todo:
        relative = todo.pop(0)
        if relative in seen or not (root() / relative).is_file():
            continue  # a path in a comment that the bundle does not hold (runs/..., a user's file)
        seen.append(relative)
        text = (root() / relative).read_text(encoding="utf-8")
        todo += _NAMED_PATH.findall(text) + [f"examples/{m}.py" for m in _NAMED_MODULE.findall(text)]
    if any(r.startswith("data/") for r in seen):
        seen.append("data/README.md")  # the data card (sources, licence) travels with the data
    return list(dict.fromkeys(seen))


def example_hint(name: str) -> str:
    """How an error message names an example: its path in a checkout and the command that puts it
    in the user's folder when vitune was installed with pip ("examples/deepspeed/zero2.json, from
    `vitune examples copy deepspeed/zero2`"). A name the bundle lacks fails here, in the tests."""
    relative = example_files(name)[0]
    return f"{relative}, from `vitune examples copy {name}`"


def copy_example(name: str, dest: Path, force: bool = False) -> list[Path]:
    """Copy the example and the bundled files it needs into `dest` (their relative paths kept);
    returns the files written. A different file already there is kept unless `force`."""
    relatives = example_files(name)
    clashes = [r for r in relatives if (dest / r).exists() and (dest / r).read_bytes() != (root() / r).read_bytes()]
    if clashes and not force:
        raise UserError(f"{dest / clashes[0]} exists and differs from the example's; "
                        "move it away or pass --force to overwrite it")
    written = []
    for relative in relatives:
        target = dest / relative
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root() / relative, target)
        except OSError as exc:
            raise UserError(f"cannot write {target}: {exc.strerror or exc}") from None
        written.append(target)
    return written


def _first_comment(path: Path) -> str:
    """What an example is: the first sentence of its leading comment or docstring; for a
    DeepSpeed JSON file (no comments in JSON), its ZeRO stage and offloading."""
    if path.suffix == ".json":
        zero = json.loads(path.read_text(encoding="utf-8")).get("zero_optimization", {})
        offload = [k.removeprefix("offload_") for k in zero if k.startswith("offload_")]
        return f"DeepSpeed ZeRO-{zero.get('stage')} for train.deepspeed" + (f", {' and '.join(offload)} offloaded to the CPU" if offload else "")
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line.startswith("#!") or (not lines and line.startswith("from __future__")):
            continue
        if lines and line.startswith("#  "):  # an indented command under the first words
            break
        if line.startswith(("#", '"""')) or (lines and path.suffix == ".py" and line):
            lines.append(line.lstrip("#").strip().strip('"').strip())
        elif lines or line:
            break
    sentence = re.split(r"(?<=\.)\s", " ".join(t for t in lines if t), maxsplit=1)[0]
    sentence = sentence.rstrip(":")
    return sentence if len(sentence) <= 100 else sentence[:100].rsplit(" ", 1)[0] + " ..."
