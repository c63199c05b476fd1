"""What happened between two /metrics scrapes: Prometheus exposition text parsed into
samples, their difference, a histogram's cumulative buckets and its quantiles (as
Prometheus' histogram_quantile computes them). Shared by the load test's report and the
HTTP benchmarks (tests/bench)."""

from __future__ import annotations

import math
from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families

DURATION = "rerank_request_duration_seconds"
SERVED = ("ok", "degraded")  # the outcomes of requests the service answered with a list

# sample name and its labels -> value
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


LabelTest = Callable[[dict[str, str]], bool]


def parse_metrics(text: str) -> Samples:
    """Prometheus exposition text -> {(sample name, labels): value}."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name, frozenset(s.labels.items())] = float(s.value)
    return out


def delta(before: Samples, after: Samples) -> Samples:
    """What happened between two scrapes (counters and histogram series)."""
    return {key: value - before.get(key, 0.0) for key, value in after.items()}


def select(samples: Samples, name: str, where: LabelTest | None = None
           ) -> list[tuple[dict[str, str], float]]:  # fmt: skip
    return [(dict(labels), value) for (n, labels), value in samples.items()
            if n == name and (where is None or where(dict(labels)))]  # fmt: skip


def buckets(samples: Samples, name: str, where: LabelTest | None = None) -> dict[float, float]:
    """Cumulative counts by upper bound of histogram `name`, summed over the label sets
    that pass `where` (e.g. outcome ok and degraded)."""
    out: dict[float, float] = {}
    for labels, value in select(samples, f"{name}_bucket", where):
        le = float(labels["le"])  # "+Inf" -> inf
        out[le] = out.get(le, 0.0) + value
    return out


def histogram_quantile(q: float, cumulative: dict[float, float]) -> float:
    """The q-quantile of a histogram's cumulative bucket counts (as Prometheus'
    histogram_quantile: linear inside the bucket; the largest finite bound when the rank
    falls in +Inf); NaN when it counted nothing."""
    bounds = sorted(cumulative)
    if not bounds or cumulative[bounds[-1]] <= 0:
        return math.nan
    rank = q * cumulative[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = cumulative[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower
            if count <= below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


def total(samples: Samples, name: str, where: LabelTest | None = None) -> float:
    """The sum of sample `name` over the label sets that pass `where`."""
    return sum(v for _, v in select(samples, name, where))


def increase(before_text: str, after_text: str, name: str, label: str) -> dict[str, float]:
    """Label value -> how much sample `name` (one label) grew between two scrapes."""
    window = delta(parse_metrics(before_text), parse_metrics(after_text))
    return {labels[label]: value for labels, value in select(window, name) if label in labels}


def window_quantile(
    q: float,
    before_text: str,
    after_text: str,
    name: str = DURATION,
    outcomes: tuple[str, ...] = SERVED,
) -> float:
    """The q-quantile (seconds) of histogram `name` over the requests between two scrapes,
    summed over the `outcome` labels given; NaN when none."""
    window = delta(parse_metrics(before_text), parse_metrics(after_text))
    return histogram_quantile(q, buckets(window, name, lambda lab: lab.get("outcome") in outcomes))
