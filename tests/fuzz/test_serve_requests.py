"""`make fuzz`'s run of the server fuzzing (serve_requests.py): VITUNE_FUZZ_EXAMPLES cases (2000 there,
300 when run by hand), random unless CI=true. The ordinary suite runs a bounded, derandomized version in
tests/test_serve_fuzz.py instead, hence the slow mark."""

from __future__ import annotations

import pytest
from hypothesis import given

from fuzz.serve_requests import check_reply, check_still_serving, request_case, send, serving
from fuzz.test_fuzz import fuzz_settings


@pytest.fixture(scope="module")
def served(fuzz_world):
    with serving(fuzz_world.model) as app:
        yield app


@pytest.mark.slow
def test_no_request_gets_a_5xx_and_the_server_still_answers(served):
    @fuzz_settings(300)
    @given(case=request_case())
    def one_case(case):
        check_reply(send(served.client, case))

    one_case.hypothesis.inner_test._hypothesis_internal_add_digest = b"serve-requests"
    one_case()
    check_still_serving(served)
