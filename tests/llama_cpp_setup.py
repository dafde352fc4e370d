"""llama-cpp-python for the tests that run llama.cpp itself.

It compiles llama.cpp from its PyPI source distribution (about 5 minutes on 2 cores), so it is
built once per machine into a wheel cache (`make llama-cpp`) and installed from there by
`make test`; a test that needs it and finds neither the package nor the wheel is skipped, saying why.
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
    pytest.skip("llama-cpp-python is not built on this machine: run `make llama-cpp` once "
                "(it compiles llama.cpp, about 5 minutes on 2 cores)")
