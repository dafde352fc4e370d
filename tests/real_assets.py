"""Real tokenizers and chat templates for tests, taken from a PyPI source distribution.

The sdist of llama-cpp-python vendors llama.cpp, whose `models/` folder holds vocab-only
GGUF files of real models (with reference token ids produced by the original Hugging Face
tokenizers: `*.gguf.inp` / `*.gguf.out`) and the chat templates of real models. The sdist is
downloaded once with pip, only the files listed here are extracted (member by member) into
a cache folder outside the repository, and the converted tokenizers are saved there too:
converting the 128k-token GGUF vocabularies takes ~17 s each, reloading the saved ones ~1.5 s.

Cache: `$VITUNE_TEST_CACHE` or `~/.cache/vitune-test`. Without network (and without a cache)
the fixtures skip with the reason.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from functools import cache
from pathlib import Path

import pytest

SDIST = "llama-cpp-python==0.3.36"
MODELS = "vendor/llama.cpp/models/"  # inside the sdist, below its top folder

VOCABS = ("llama-spm", "llama-bpe", "qwen2")
CHAT_TEMPLATES = {
    "llama3.1": "meta-llama-Llama-3.1-8B-Instruct.jinja",
    "qwen2.5": "Qwen-Qwen2.5-7B-Instruct.jinja",
    "mistral-nemo": "mistralai-Mistral-Nemo-Instruct-2407.jinja",
}
ALL_TEMPLATES = "templates"  # every *.jinja of models/templates/, for tests/test_all_chat_templates.py
# Tokenizers the tests use: name -> its GGUF vocab (set up by _match_original). Each one
# reproduces the reference ids that llama.cpp recorded with the model's own Hugging Face
# tokenizer, except `llama-spm`: transformers 5's own set-up of a Llama/Mistral SentencePiece
# vocab (legacy=False), which prepends no "▁" after a special token or before a leading space.
TOKENIZERS = {
    "llama-spm": "llama-spm",
    "llama-spm-legacy": "llama-spm",
    "llama-bpe": "llama-bpe",
    "qwen2": "qwen2",
}
SETUP_VERSION = 1  # bump when _match_original changes, so cached tokenizers are converted again


class AssetsUnavailable(RuntimeError):
    pass


def cache_root() -> Path:
    root = os.environ.get("VITUNE_TEST_CACHE") or Path.home() / ".cache" / "vitune-test"
    return Path(root) / SDIST.replace("==", "-")


def _wanted_files() -> dict[str, str]:
    """Member path inside the sdist (below its top folder) -> file name in the cache."""
    wanted = {}
    for vocab in VOCABS:
        for suffix in ("", ".inp", ".out"):
            name = f"ggml-vocab-{vocab}.gguf{suffix}"
            wanted[MODELS + name] = name
    for name in CHAT_TEMPLATES.values():
        wanted[MODELS + "templates/" + name] = name
    return wanted


_failure: list[str] = []  # remembered, so a missing network costs one try per session


def asset_dir() -> Path:
    """The folder holding the extracted files; downloads and extracts them on first use."""
    folder = cache_root() / "files"
    wanted = _wanted_files()
    if all((folder / name).is_file() for name in wanted.values()) and (folder / ALL_TEMPLATES / ".complete").is_file():
        return folder
    if _failure:
        raise AssetsUnavailable(_failure[0])
    try:
        _download_and_extract(folder, wanted)
    except AssetsUnavailable as exc:
        _failure.append(str(exc))
        raise
    return folder


def _download_and_extract(folder: Path, wanted: dict[str, str]) -> None:
    with tempfile.TemporaryDirectory(prefix="vitune-sdist-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST, "-d", tmp]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise AssetsUnavailable(f"`pip download {SDIST}` could not run: {exc}") from None
        archives = list(Path(tmp).glob("*.tar.gz"))
        if done.returncode != 0 or not archives:
            lines = (done.stderr or done.stdout).strip().splitlines()
            reason = [line for line in lines if line.startswith("ERROR")][-1:] or lines[-1:]
            raise AssetsUnavailable(
                f"`pip download {SDIST}` failed (no network?): {' '.join(reason)}; "
                "or point VITUNE_TEST_CACHE at a folder that already holds the files"
            )
        folder.mkdir(parents=True, exist_ok=True)
        found, templates = set(), 0
        with tarfile.open(archives[0], "r:gz") as tar:
            for member in tar:
                inner = member.name.split("/", 1)[-1]  # drop "llama_cpp_python-0.3.36/"
                if not member.isfile():
                    continue
                if inner.startswith(MODELS + "templates/") and inner.endswith(".jinja"):
                    _extract(tar, member, folder / ALL_TEMPLATES / inner.rsplit("/", 1)[1])
                    templates += 1
                if inner in wanted:
                    _extract(tar, member, folder / wanted[inner])
                    found.add(inner)
    missing = sorted(set(wanted) - found)
    if missing:
        raise AssetsUnavailable(f"{SDIST} no longer holds {', '.join(missing)}")
    (folder / ALL_TEMPLATES / ".complete").write_text(str(templates), encoding="utf-8")


def _extract(tar, member, target: Path) -> None:
    # write aside and rename, so a concurrent run never reads half a file
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + f".part{os.getpid()}")
    with open(partial, "wb") as out:
        shutil.copyfileobj(tar.extractfile(member), out)
    os.replace(partial, target)


def all_chat_templates() -> dict[str, str]:
    """Every chat template of llama.cpp's models/templates/ folder: file name (less .jinja) -> source."""
    folder = asset_dir() / ALL_TEMPLATES
    return {p.name[: -len(".jinja")]: p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.jinja"))}


def chat_template_source(name: str) -> str:
    return (asset_dir() / CHAT_TEMPLATES[name]).read_text(encoding="utf-8")


def reference_ids(vocab: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's tokenizer test cases for a vocab: (text, ids from the original HF tokenizer)."""
    folder = asset_dir()
    texts = (folder / f"ggml-vocab-{vocab}.gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    outs = (folder / f"ggml-vocab-{vocab}.gguf.out").read_text(encoding="utf-8").split("\n")
    return [(text, [int(i) for i in out.split()]) for text, out in zip(texts, outs)]


@cache
def load_tokenizer(name: str):
    """A fast tokenizer of a real vocab (one of TOKENIZERS), shared: do not modify it."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_converted(name))


def new_tokenizer(name: str, special_tokens: tuple[str, ...] = ()):
    """A tokenizer of its own (free to modify), with `special_tokens` added where missing, as
    vocabulary extensions do (VinaLlama adds ChatML's markers to Llama-2's vocab)."""
    from transformers import AddedToken, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(_converted(name))
    missing = [t for t in special_tokens if t not in tok.get_added_vocab()]  # Qwen2's BPE has a plain "</s>"
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    return tok


load_tokenizer_with_tokens = cache(new_tokenizer)  # shared: do not modify


def _converted(name: str) -> Path:
    """The folder of the tokenizer converted from GGUF, saved once per transformers version."""
    import transformers
    from transformers import AutoTokenizer

    # the setup below and transformers' conversion both shape the result: both name the folder
    saved = cache_root() / "tokenizers" / f"transformers-{transformers.__version__}-setup{SETUP_VERSION}" / name
    if (saved / "tokenizer.json").is_file():
        return saved
    tok = AutoTokenizer.from_pretrained(asset_dir(), gguf_file=f"ggml-vocab-{TOKENIZERS[name]}.gguf")
    _match_original(name, tok)
    saved.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f"{name}.", dir=saved.parent))
    tok.save_pretrained(partial)
    try:
        os.replace(partial, saved)
    except OSError:  # another run saved it first
        shutil.rmtree(partial, ignore_errors=True)
    return saved


def _match_original(name: str, tok) -> None:
    """Set up the converted tokenizer as the model's own tokenizer.json does."""
    from tokenizers import normalizers

    backend = tok.backend_tokenizer
    if name == "llama-spm-legacy":
        # Llama-2 / Mistral v0.1 tokenizer.json: "▁" prepended to every piece of text between
        # special tokens, spaces replaced by "▁" (SentencePiece's add_dummy_prefix).
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        backend.pre_tokenizer = None
    elif name == "llama-bpe":
        # Llama 3's tokenizer.json sets ignore_merges (a word found whole in the vocab is one
        # token); the GGUF conversion leaves it off, which splits e.g. " Việt" in three.
        backend.model.ignore_merges = True


def with_chat_template(tokenizer, source: str):
    """A copy of a shared tokenizer carrying another chat template (the original is untouched)."""
    tok = copy.copy(tokenizer)
    tok.chat_template = source
    return tok


# ---------------------------------------------------------------- fixtures


def _or_skip(fn, *args):
    try:
        return fn(*args)
    except AssetsUnavailable as exc:
        pytest.skip(f"real tokenizers unavailable: {exc}")


@pytest.fixture(scope="session")
def real_tokenizer():
    """`real_tokenizer(name)` -> a shared tokenizer (one of TOKENIZERS); do not modify it.
    `real_tokenizer(name, special_tokens=(...))` -> a shared copy with those tokens added as special.
    `real_tokenizer(name, ..., new=True)` -> a tokenizer of the test's own."""

    def get(name: str, special_tokens: tuple[str, ...] = (), new: bool = False):
        if new:
            return _or_skip(new_tokenizer, name, tuple(special_tokens))
        if special_tokens:
            return _or_skip(load_tokenizer_with_tokens, name, tuple(special_tokens))
        return _or_skip(load_tokenizer, name)

    return get


@pytest.fixture(scope="session")
def real_chat_template():
    """`real_chat_template(name)` -> the Jinja source of a real model's template (CHAT_TEMPLATES)."""
    return lambda name: _or_skip(chat_template_source, name)


@pytest.fixture(scope="session")
def sdist_chat_templates():
    """{name: Jinja source} of every chat template in llama.cpp's models/templates/."""
    return _or_skip(all_chat_templates)


@pytest.fixture(scope="session")
def llama_spm(real_tokenizer):
    return real_tokenizer("llama-spm")


@pytest.fixture(scope="session")
def llama_bpe(real_tokenizer):
    return real_tokenizer("llama-bpe")


@pytest.fixture(scope="session")
def qwen2(real_tokenizer):
    return real_tokenizer("qwen2")
