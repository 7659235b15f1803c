"""Property-based API testing: schemathesis reads our OpenAPI document and throws valid and
invalid requests at every operation of a real server; none may get a 5xx, and every 2xx must
match the documented response schema."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error, response_schema_conformance
from server_utils import api, make_engine, running

# The document does not depend on the engine, so it is read at collection time from an app that
# would load one lazily (and never does); the requests go to a live server below.
schema = schemathesis.openapi.from_dict(api(lambda: None).openapi())


@pytest.fixture(scope="module")
def url(checkpoint):
    # A 64-token context keeps every generated request short on this CPU.
    engine = make_engine(checkpoint("llama"), num_blocks=600, max_model_len=64)
    with running(api(engine)) as url:
        yield url
    engine.shutdown()


@schema.parametrize()
@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_server_errors(case, url):
    case.call_and_validate(base_url=url, checks=[not_a_server_error, response_schema_conformance], timeout=60)
