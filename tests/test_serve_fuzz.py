"""The server fuzzing of tests/fuzz/serve_requests.py, bounded (FUZZ_CASES cases, well under 20 s on 2
cores) and derandomized (the same cases every run) for the ordinary suite; `make fuzz` runs it long."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from fuzz.serve_requests import check_reply, check_still_serving, request_case, send, serving

FUZZ_CASES = 160


@pytest.fixture(scope="module")
def served(tiny_llama):
    with serving(tiny_llama) as app:
        yield app


@settings(max_examples=FUZZ_CASES, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example,
                                 HealthCheck.function_scoped_fixture])
@given(case=request_case())
def test_no_request_gets_a_5xx(served, case):
    check_reply(send(served.client, case))


def test_after_the_fuzzing_a_good_request_gets_generates_answer(served):
    check_still_serving(served)
