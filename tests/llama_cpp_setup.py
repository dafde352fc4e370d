"""llama-cpp-python for the tests that run llama.cpp itself.

It compiles llama.cpp from its PyPI source distribution (about 5 minutes on 2 cores), so it is
built once per machine into a wheel cache (`make llama-cpp`, which `make test` runs) and
installed from there. The GGUF checks are the small-device story's proof, so under CI (CI=true)
a missing llama.cpp fails the test; elsewhere (a bare `pytest` run) the test is skipped, saying why.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

WHEELS = Path(os.environ.get("VITUNE_TEST_CACHE") or Path.home() / ".cache" / "vitune-test") / "wheels"


def llama_cpp_or_skip():
    try:
        return importlib.import_module("llama_cpp")
    except ImportError:
        pass
    wheels = sorted(WHEELS.glob("llama_cpp_python-*.whl"))
    if wheels:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", str(wheels[-1])], check=False)
        importlib.invalidate_caches()
        try:
            return importlib.import_module("llama_cpp")
        except ImportError:
            pass
    reason = ("llama-cpp-python is not built on this machine: run `make llama-cpp` once "
              "(it compiles llama.cpp, about 5 minutes on 2 cores)")
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(reason + "; CI must run the llama.cpp checks, not skip them", pytrace=False)
    pytest.skip(reason)
