"""Schema-driven requests against a running service: schemathesis generates bodies from
its /openapi.json (positive mode: what the schema says is valid), sends them, and checks
every answer against the schema (status codes, content types, bodies, no 5xx)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

# the answer against the schema; not positive_data_acceptance: a schema cannot say that
# item ids are unique within a request (only that candidates are), so some schema-valid
# bodies are rightly 422s (FuzzResult.statuses counts them)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance]  # fmt: skip


@dataclass
class FuzzResult:
    statuses: Counter[int] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)  # one line per failed check
    refusals: Counter[str] = field(default_factory=Counter)  # 4xx: field and reason

    @property
    def sent(self) -> int:
        return sum(self.statuses.values())

    @property
    def server_errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if status >= 500)


def fuzz_rerank(base_url: str, examples: int) -> FuzzResult:
    """`examples` generated POST /v1/rerank bodies (derandomized: the same bodies every
    run against the same schema); their statuses and the CHECKS that failed."""
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    operation = schema["/v1/rerank"]["POST"]
    strategy = operation.as_strategy()
    result = FuzzResult()

    @settings(max_examples=examples, phases=[Phase.generate], deadline=None, database=None,
              derandomize=True, suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(case=strategy)
    def send(case: schemathesis.Case) -> None:
        response = case.call(base_url=base_url, timeout=30)
        result.statuses[response.status_code] += 1
        if 400 <= response.status_code < 500:
            error = response.json().get("error", {})
            result.refusals[f"{error.get('field')}: {error.get('message')}"[:80]] += 1
        try:
            case.validate_response(response, checks=CHECKS)
        except Exception as e:  # failed checks (one, or a group): recorded, the run goes on
            for failure in getattr(e, "exceptions", [e]):
                title = getattr(failure, "title", type(failure).__name__)
                result.violations.append(f"{response.status_code} {title}: {failure}"[:300])

    send()
    return result
