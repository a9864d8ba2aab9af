"""API fuzzing: schemathesis generates requests from the published OpenAPI document (the request
schemas of `protocol`, valid and invalid ones) and sends them to a real server; none may get a 5xx.

The example count is bounded so the run stays short in CI; generation is derandomized, so a
failure repeats.
"""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings

EXAMPLES_PER_OPERATION = 15


def test_no_generated_request_gets_a_server_error(teacher):
    schema = schemathesis.openapi.from_url(teacher.http_url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/score", "/v1/generate", "/v1/completions", "/v1/chat/completions"}
    for operation in operations:

        @given(operation.as_strategy())
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def send(case):
            response = case.call(base_url=teacher.http_url, timeout=60)
            assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])

        send()
