"""
Property-based check of the admin API against its own OpenAPI document:
schemathesis generates requests from the served document, and every answer
must be a documented status with a body matching the documented schema, and
never a 5xx.
"""

from __future__ import annotations

import json
import urllib.request
from typing import Any

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from tests.test_admin_api import TOKEN, AdminServer

try:
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode
    from schemathesis.checks import (
        content_type_conformance,
        not_a_server_error,
        response_schema_conformance,
        status_code_conformance,
    )
except ImportError:  # pragma: no cover - schemathesis is a test extra
    schemathesis = None

EXAMPLES_PER_OPERATION = 8


def fuzz(base: str, mode: Any) -> int:
    """Run in a thread: fetch the document, then exercise every operation; returns the request count."""
    request = urllib.request.Request(base + "/api/v1/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        document = json.load(response)
    schema = schemathesis.openapi.from_dict(document)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    positive = mode == GenerationMode.POSITIVE
    checks = (
        [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
        if positive
        else [not_a_server_error, content_type_conformance]
    )
    calls = [0]
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def exercise(case: Any) -> None:
            response = case.call(base_url=base, headers=headers, timeout=10)
            calls[0] += 1
            case.validate_response(response, checks=checks, headers=headers)
            # Whatever was asked, the answer is JSON.
            if response.status_code != 204:
                json.loads(response.content)

        exercise()
    return calls[0]


class SchemaFuzzTests(AdminServer, TestCase):
    timeout = 120

    def setUp(self) -> None:
        if schemathesis is None:
            raise SkipTest("schemathesis is not installed")
        self.start_server(self)

    def test_positive(self) -> Any:
        """Requests valid per the document get documented statuses and schema-conforming bodies, no 5xx."""
        d = deferToThread(fuzz, self.base, GenerationMode.POSITIVE)
        return d.addCallback(lambda calls: self.assertGreater(calls, 20))

    def test_negative(self) -> Any:
        """Requests that break the document are refused with JSON errors, never a 5xx."""
        d = deferToThread(fuzz, self.base, GenerationMode.NEGATIVE)
        return d.addCallback(lambda calls: self.assertGreater(calls, 10))
