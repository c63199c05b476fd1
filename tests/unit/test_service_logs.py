"""Log lines: JSON, and the rate limit on per-request warnings."""

from __future__ import annotations

import json
import logging

import pytest

from service import logs
from service.logs import JsonFormatter, RateLimit


def _record(msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord("service.degraded", logging.WARNING, __file__, 1, msg, args, None)


def test_rate_limit_lets_a_burst_through_then_counts_the_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [100.0]
    monkeypatch.setattr(logs.time, "monotonic", lambda: clock[0])
    limit = RateLimit(per_second=10, burst=5)
    passed = [limit.filter(_record("request %s degraded: %s", i, "budget")) for i in range(50)]
    assert sum(passed) == 5 and passed[:5] == [True] * 5
    clock[0] += 0.11  # one token back
    rec = _record("request %s degraded: %s", "r51", "overload")
    assert limit.filter(rec)
    assert rec.getMessage() == "request r51 degraded: overload (45 similar lines suppressed)"
    assert not limit.filter(_record("again"))


def test_json_formatter_writes_one_object_per_line() -> None:
    line = JsonFormatter().format(_record("request %s degraded: %s", "abc", "cache"))
    entry = json.loads(line)
    assert entry["level"] == "warning" and entry["logger"] == "service.degraded"
    assert entry["message"] == "request abc degraded: cache"
