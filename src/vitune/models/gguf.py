"""GGUF files as model sources: `model.name_or_path: path/to/model.gguf`.

transformers reads a GGUF through its `gguf_file=` support and de-quantises it, but refuses to
save the result ("quantized with gguf and is not serializable"), and every load de-quantises
again (about 30 s for a 135M model on 2 cores). So the first use converts the file into an
ordinary Hugging Face model folder (safetensors in fp32, tokenizer with the file's chat
template, generation config) in the cache, keyed by the file's SHA-256; later uses load that
folder in about a second. Every loader (training, estimate, data inspect, chat) goes through
`model_source`, so the rest of vitune only ever sees model folders.

A conversion is written into a temporary folder and renamed into place when complete, so an
interrupted one (Ctrl-C, a full disk) leaves nothing a later run would trust.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shutil
import struct
import time
from pathlib import Path

from vitune.config import cache_home, file_sha256
from vitune.errors import UserError
from vitune.models.permissions import umask_modes

MAGIC = b"GGUF"
MARKER = "vitune_gguf.json"  # written last: says which file the folder was converted from
_converted: dict[str, str] = {}  # this process's conversions: one notice per file


def is_gguf(name: str | os.PathLike) -> bool:
    return str(name).lower().endswith(".gguf")


def gguf_cache_dir() -> Path:
    return cache_home() / "models"


def model_source(name: str, say=None) -> str:
    """`name` itself, or for a `.gguf` file the folder of its conversion (made on first use).

    `say(line)` is told which happened; by default the line goes to stderr."""
    if not is_gguf(name):
        return name
    path = Path(os.path.expanduser(name))
    key = str(path.resolve()) if path.exists() else name
    if key in _converted:
        return _converted[key]
    folder, converted, seconds = cached_conversion(path)
    line = (f"model: converted {path.name} to a Hugging Face model folder in {seconds:.0f} s: {folder}" if converted
            else f"model: {path.name} was converted before; loading {folder}")
    (say or _stderr)(line)
    _converted[key] = str(folder)
    return str(folder)


def cached_conversion(path: Path, cache_dir: Path | None = None) -> tuple[Path, bool, float]:
    """(folder, converted now?, seconds): the cache entry for the GGUF file `path`, made if missing."""
    check_gguf_file(path)
    digest = file_sha256(path)
    root = cache_dir or gguf_cache_dir()
    folder = root / f"{_safe_stem(path)}-{digest[:16]}"
    if (folder / MARKER).is_file():
        return folder, False, 0.0
    started = time.perf_counter()
    convert_gguf(path, folder, digest)
    return folder, True, time.perf_counter() - started


def check_gguf_file(path: Path) -> None:
    """One line for a file that is missing, not GGUF, or unreadable without the `gguf` package."""
    if not path.is_file():
        raise UserError(f"model not found: {path} (a .gguf model.name_or_path must be an existing file)")
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head != MAGIC:
        raise UserError(f"{path}: not a GGUF file (it starts with {head!r}, not b'GGUF'); "
                        "point model.name_or_path at a .gguf model file or a model folder")
    if importlib.util.find_spec("gguf") is None:
        raise UserError(f"reading {path} needs the gguf package; install it with: pip install gguf")


def convert_gguf(path: Path, out: Path, digest: str | None = None) -> Path:
    """Write the GGUF file `path` as an ordinary model folder `out` (complete or not at all)."""
    check_gguf_file(path)
    architecture = _architecture(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        _write_folder(path, partial, architecture)
        (partial / MARKER).write_text(json.dumps(
            {"source": str(path.resolve()), "sha256": digest or file_sha256(path), "architecture": architecture}, indent=2),
            encoding="utf-8")
        umask_modes(partial)  # safetensors writes 0600: a shared cache must be readable by the others
        try:
            partial.rename(out)
        except OSError:
            if not (out / MARKER).is_file():  # another process finished the same conversion first: keep theirs
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out


def _write_folder(path: Path, out: Path, architecture: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    where, name = str(path.parent), path.name
    try:
        # transformers draws its own tqdm bar while de-quantising; vitune says one line when done
        with contextlib.redirect_stderr(io.StringIO()):
            tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
            config = AutoConfig.from_pretrained(where, gguf_file=name)
            check_weight_count(path, config)
            quantised, loading = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32,
                                                                      output_loading_info=True)
    except UserError:
        raise
    except Exception as exc:  # the file is the user's: whatever its metadata breaks is a bad file, not a bug
        if isinstance(exc, ValueError) and "is not supported yet" in str(exc):
            raise UserError(f"{path}: transformers cannot convert GGUF architecture {architecture!r} "
                            f"({_first_line(exc)}); use the model's Hugging Face folder or Hub id instead") from None
        raise unreadable(path, exc) from None
    # transformers fills weights the file lacks with random ones and only logs it: refuse instead
    missing = sorted(set(loading["missing_keys"]) - ({"lm_head.weight"} if config.tie_word_embeddings else set()))
    if missing or loading["mismatched_keys"]:
        what = f"no weights for {missing[0]} ({len(missing)} tensors missing)" if missing else \
            f"weights of the wrong shape for {sorted(loading['mismatched_keys'])[0]}"
        raise UserError(f"{path}: the GGUF holds {what}; it may be a vocabulary-only or damaged file: "
                        "use a complete model file")
    # The de-quantised weights go into a model built from the plain config: transformers will
    # not save a model that carries the GGUF quantization_config.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict(), assign=True, strict=False)
    model.tie_weights()
    model.generation_config = quantised.generation_config
    del quantised
    with contextlib.redirect_stderr(io.StringIO()):  # its "Writing model shards" bar, as above
        model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out), save_jinja_files=False)


def check_weight_count(path: Path, config) -> None:
    """Refuse, before anything is allocated, a file whose metadata describes more weights than it
    holds: a damaged dimension would make transformers allocate a model of any size (tens of GB),
    and missing tensors would be filled with random weights."""
    import torch
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # shapes only, no memory
        needed = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    held = sum(int(t.n_elements) for t in GGUFReader(str(path)).tensors)
    if needed > held:
        raise UserError(f"{path}: its metadata describes a model of {needed:,} weights but it holds {held:,}; "
                        "it may be a vocabulary-only or damaged file: use a complete model file")


def _architecture(path: Path) -> str:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        field = reader.fields.get("general.architecture")
        return bytes(field.parts[field.data[0]]).decode("utf-8") if field else "unknown"
    except Exception as exc:  # gguf raises ValueError, IndexError or numpy errors on a cut-short file
        raise unreadable(path, exc) from None


def general_metadata(path: Path) -> dict:
    """The file's `general.*` metadata as Python values: {"general.name": "...", "general.license":
    "apache-2.0", "general.file_type": 3, ...} (what model cards inherit: name, licence, source).

    Read from the header directly, skipping the other keys' values: gguf's GGUFReader parses every
    key and tensor first (6.5 s for SmolLM2's 49,152-token vocabulary on 2 cores; this takes ~50 ms)."""
    try:
        with open(path, "rb") as fh:
            if fh.read(4) != MAGIC:
                raise ValueError("no GGUF magic")
            version, _, count = struct.unpack("<IQQ", fh.read(20))
            if version < 2:
                raise ValueError(f"GGUF version {version} (before 2) is not read")
            found = {}
            for _ in range(count):
                key = _string(fh)
                kind = _unpack(fh, "<I")
                if key.startswith("general."):
                    found[key] = _value(fh, kind)
                else:
                    _skip(fh, kind)
            return found
    except (OSError, ValueError, struct.error, UnicodeDecodeError) as exc:
        raise unreadable(path, exc) from None


# GGUF value types (gguf.GGUFValueType) with a fixed size: their struct formats, little-endian
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def _unpack(fh, fmt: str):
    return struct.unpack(fmt, fh.read(struct.calcsize(fmt)))[0]


def _string(fh) -> str:
    size = _unpack(fh, "<Q")
    if size > 1 << 24:  # a damaged length would read the whole file
        raise ValueError(f"a {size:,}-byte string in the header")
    return fh.read(size).decode("utf-8")


def _value(fh, kind: int):
    if kind in _SCALARS:
        return _unpack(fh, _SCALARS[kind])
    if kind == _STRING:
        return _string(fh)
    if kind == _ARRAY:
        inner, size = struct.unpack("<IQ", fh.read(12))
        return [_value(fh, inner) for _ in range(size)]
    raise ValueError(f"unknown GGUF value type {kind}")


def _skip(fh, kind: int) -> None:
    if kind in _SCALARS:
        fh.seek(struct.calcsize(_SCALARS[kind]), os.SEEK_CUR)
    elif kind == _STRING:
        fh.seek(_unpack(fh, "<Q"), os.SEEK_CUR)
    elif kind == _ARRAY:
        inner, size = struct.unpack("<IQ", fh.read(12))
        if inner in _SCALARS:
            fh.seek(size * struct.calcsize(_SCALARS[inner]), os.SEEK_CUR)
        else:
            for _ in range(size):
                _skip(fh, inner)
    else:
        raise ValueError(f"unknown GGUF value type {kind}")


def unreadable(path: Path, exc: Exception) -> UserError:
    return UserError(f"{path}: cannot read it as GGUF ({_first_line(exc)}); the file may be damaged or cut short: "
                     "get it again")


def _safe_stem(path: Path) -> str:
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in path.stem)
    return stem[:80] or "model"


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _stderr(line: str) -> None:
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True).print(escape(line), highlight=False, soft_wrap=True)
