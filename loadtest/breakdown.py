"""Why answers were degraded, and where each list size spends its time: from the `timings`
of every valid answer (the service's own per-request stage times, in the response body),
its list size and the budget it asked for.

The service's /metrics histograms give each stage over all requests; they cannot say which
stage used up the budget of the requests that ran out of it, nor split the stages by list
size. The load generator sees each answer's timings, so it keeps them here (no locust in
this module: the tests import it) and the report reads the JSON it writes at the end.

A `budget` answer is put down to the stage that took the largest part of its time:
    queue   waiting for the engine (batching, a busy engine)
    cache   the embedding lookup: L1, the Redis MGET, and the item tower for the misses
    model   encode + decode
    other   the rest of the time from the body's arrival to the answer (parsing, the
            event loop's other work, writing the answer)
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np

STAGES = ("queue", "cache", "encode", "decode", "total")  # the timings kept per answer
CULPRITS = ("queue", "cache", "model", "other")  # what a budget miss is put down to
QUANTILES = (0.50, 0.99)


def culprit(timings: dict[str, float]) -> str:
    """The stage that took the largest part of this answer's time."""
    queue, cache = timings.get("queue_ms", 0.0), timings.get("cache_ms", 0.0)
    model = timings.get("encode_ms", 0.0) + timings.get("decode_ms", 0.0)
    other = max(0.0, timings.get("total_ms", 0.0) - queue - cache - model)
    parts = {"queue": queue, "cache": cache, "model": model, "other": other}
    return max(CULPRITS, key=lambda k: parts[k])


class Breakdown:
    """Every valid answer's list size, degraded reason and stage times."""

    def __init__(self) -> None:
        self._times: dict[int, list[tuple[float, ...]]] = {}
        self._answers: Counter[int] = Counter()
        self._degraded: Counter[tuple[int, str, str]] = Counter()  # (m, reason, culprit)
        # by the budget asked for ("default": none in the body): answers, degraded, totals
        self._budget: dict[str, list[int]] = {}
        self._budget_total: dict[str, list[float]] = {}

    def add(self, m: int, reason: str | None, timings: dict[str, Any] | None,
            budget_ms: float | None = None) -> None:  # fmt: skip
        """One answer: its list size, its degraded reason (None: the model's list), the
        body's `timings` (None or malformed: counted, no stage times) and the budget_ms
        the request asked for (None: the server's default)."""
        self._answers[m] += 1
        key = "default" if budget_ms is None else f"{budget_ms:g}"
        counts = self._budget.setdefault(key, [0, 0])
        counts[0] += 1
        counts[1] += reason is not None
        if isinstance(timings, dict) and isinstance(timings.get("total_ms"), int | float):
            self._budget_total.setdefault(key, []).append(float(timings["total_ms"]))
        t: dict[str, float] = {}
        if isinstance(timings, dict):
            try:
                t = {f"{s}_ms": float(timings[f"{s}_ms"]) for s in STAGES}
                self._times.setdefault(m, []).append(tuple(t[f"{s}_ms"] for s in STAGES))
            except (KeyError, TypeError, ValueError):
                t = {}
        if reason is not None:
            self._degraded[m, reason, culprit(t) if reason == "budget" and t else ""] += 1

    def to_json(self) -> dict[str, Any]:
        """{"answers", "degraded": {reason: {"count", "by_culprit"}}, "by_m": {m: {"answers",
        "degraded": {reason: n}, "budget_by_culprit", "stages_ms": {stage: p50, p99,
        mean}}}}: plain JSON (m as a string key)."""
        degraded: dict[str, dict[str, Any]] = {}
        for (_, reason, who), n in sorted(self._degraded.items()):
            d = degraded.setdefault(reason, {"count": 0, "by_culprit": {}})
            d["count"] += n
            if who:
                d["by_culprit"][who] = d["by_culprit"].get(who, 0) + n
        by_m: dict[str, Any] = {}
        for m in sorted(self._answers):
            rows = np.array(self._times.get(m, []), float).reshape(-1, len(STAGES))
            stages: dict[str, dict[str, float | None]] = {}
            for j, s in enumerate(STAGES):
                col = rows[:, j]
                stages[s] = {f"p{round(q * 100)}": _quantile(col, q) for q in QUANTILES}
                stages[s]["mean"] = float(col.mean()) if len(col) else None
            reasons: Counter[str] = Counter()
            culprits: Counter[str] = Counter()
            for (mm, reason, who), n in self._degraded.items():
                if mm == m:
                    reasons[reason] += n
                    if who:
                        culprits[who] += n
            by_m[str(m)] = {"answers": self._answers[m], "degraded": dict(sorted(reasons.items())),
                            "budget_by_culprit": dict(sorted(culprits.items())),
                            "stages_ms": stages}  # fmt: skip
        by_budget = {}
        for key, (n, n_deg) in sorted(self._budget.items(), key=lambda kv: _budget_order(kv[0])):
            totals = np.array(self._budget_total.get(key, []), float)
            by_budget[key] = {"answers": n, "degraded": n_deg,
                              "total_ms": {f"p{round(q * 100)}": _quantile(totals, q)
                                           for q in QUANTILES}}  # fmt: skip
        return {"answers": sum(self._answers.values()), "degraded": degraded, "by_m": by_m,
                "by_budget": by_budget}  # fmt: skip


def _budget_order(key: str) -> float:
    return -1.0 if key == "default" else float(key)


def _quantile(values: np.ndarray, q: float) -> float | None:
    return float(np.quantile(values, q)) if len(values) else None  # None: JSON null


def _ms(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def markdown(data: dict[str, Any]) -> list[str]:
    """summary.md's sections: why answers were degraded, and the stages by list size."""
    total = data.get("answers", 0)
    if not total:
        return []
    lines = ["", "Why degraded (each answer's `reason`; a `budget` answer put down to the stage "
             "that took most of its time: queue, cache (L1 + Redis + item tower), model "
             "(encode + decode), other (parsing, the event loop, the answer)):", "",
             "| reason | answers | share of valid | budget spent in: queue / cache / model / "
             "other |", "|---|---:|---:|---|"]  # fmt: skip
    degraded = data.get("degraded", {})
    if not degraded:
        lines.append("| none | 0 | 0.00% | |")
    for reason, d in sorted(degraded.items()):
        spent = ""
        if reason == "budget":
            spent = " / ".join(str(d["by_culprit"].get(c, 0)) for c in CULPRITS)
        lines.append(f"| {reason} | {d['count']} | {d['count'] / total:.2%} | {spent} |")
    lines += ["", "By list size m (stage times from each answer's `timings`, ms, p50 / p99; "
              "cache includes the item tower for the misses):", "",
              "| m | answers | degraded | budget: queue / cache / model / other | queue | cache "
              "| encode | decode | total |",
              "|---:|---:|---:|---|---|---|---|---|---|"]  # fmt: skip
    for m, d in data.get("by_m", {}).items():
        n_deg = sum(d["degraded"].values())
        spent = " / ".join(str(d["budget_by_culprit"].get(c, 0)) for c in CULPRITS)
        cells = [f"{_ms(d['stages_ms'][s]['p50'])} / {_ms(d['stages_ms'][s]['p99'])}"
                 for s in STAGES]  # fmt: skip
        share = n_deg / d["answers"] if d["answers"] else 0.0
        row = [m, d["answers"], f"{n_deg} ({share:.1%})", spent, *cells]
        lines.append("| " + " | ".join(map(str, row)) + " |")
    by_budget = data.get("by_budget", {})
    if by_budget:
        lines += ["", "By the budget the request asked for (default: none in the body, the "
                  "service's default):", "", "| budget_ms | answers | degraded | total p50 / "
                  "p99, ms |", "|---|---:|---:|---|"]  # fmt: skip
        for key, d in by_budget.items():
            share = d["degraded"] / d["answers"] if d["answers"] else 0.0
            lines.append(
                f"| {key} | {d['answers']} | {d['degraded']} ({share:.1%}) | "
                f"{_ms(d['total_ms']['p50'])} / {_ms(d['total_ms']['p99'])} |"
            )
    return lines
