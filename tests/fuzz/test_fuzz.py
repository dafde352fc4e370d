"""One property over every fuzz target (targets.py): whatever the user gives vitune, `main`
returns 0, 2 or 130, a 2 says one line "error: ...", and data counts add up.

Examples per target: the target's default, or VITUNE_FUZZ_EXAMPLES (`make fuzz`: 2000).
With CI=true the run is derandomized (the same cases every time) and keeps no example
database; elsewhere cases are random and failures are replayed from .cache/hypothesis.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis.database import DirectoryBasedExampleDatabase

from fuzz.checker import CASES, check_user_facing
from fuzz.targets import TARGETS, Workspace

ROOT = Path(__file__).resolve().parents[2]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def fuzz_settings(default_examples: int) -> settings:
    return settings(
        max_examples=int(os.environ.get("VITUNE_FUZZ_EXAMPLES") or default_examples),
        deadline=None,  # a case loads a tokenizer or a model: its time varies with the machine
        derandomize=IN_CI,
        database=None if IN_CI else DirectoryBasedExampleDatabase(ROOT / ".cache" / "hypothesis"),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                               HealthCheck.large_base_example],
    )


@pytest.mark.parametrize("target", TARGETS, ids=[t.name for t in TARGETS])
def test_no_traceback_reaches_the_user(target, fuzz_world):
    @fuzz_settings(target.examples)
    @given(case=target.strategy)
    def one_case(case):
        with tempfile.TemporaryDirectory(prefix=f"vitune-fuzz-{target.name}-") as tmp:
            # every path the case writes holds "[/ws]": text a user may have, and rich's closing-tag syntax
            root = Path(tmp) / "[" / "ws]"
            root.mkdir(parents=True)
            outcome = target.run(case, Workspace(root, fuzz_world))
            CASES[target.name, outcome.code] += 1
            check_user_facing(outcome)
            if target.check is not None:
                target.check(outcome, case)

    # one example database entry per target, not one shared by every parametrized case
    one_case.hypothesis.inner_test._hypothesis_internal_add_digest = target.name.encode()
    one_case()
