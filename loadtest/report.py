"""The load test's report: server-side figures from two /metrics scrapes, locust's CSVs, the
latency/throughput plot and summary.md. Pure functions of text and files (no locust here).

Locust keeps response times below 100 ms in whole milliseconds, so the server's own
histogram (rerank_request_duration_seconds, buckets x1.5 apart from 0.1 ms) gives the
finer percentiles: counts between the scrape before and the one after the run, the quantile
interpolated inside its bucket as Prometheus' histogram_quantile does.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtest.scrapes import (
    DURATION,
    LabelTest,
    Samples,
    buckets,
    delta,
    histogram_quantile,
    parse_metrics,
    select,
)
from loadtest.scrapes import total as _total

STAGE = "rerank_stage_duration_seconds"
LOOKUPS = "rerank_embedding_lookups_total"
FALLBACK = "rerank_fallback_total"
WRITEBACKS = "rerank_embedding_writebacks_total"
QUANTILES = (0.50, 0.95, 0.99)


def _latency_ms(window: Samples, name: str, where: LabelTest) -> dict[str, float]:
    cum = buckets(window, name, where)
    count = _total(window, f"{name}_count", where)
    out = {f"p{round(q * 100)}": histogram_quantile(q, cum) * 1e3 for q in QUANTILES}
    out["mean"] = _total(window, f"{name}_sum", where) / count * 1e3 if count else math.nan
    out["count"] = count
    return out


def _label(key: str, *values: str) -> LabelTest:
    return lambda labels: labels.get(key) in values


def server_metrics(before_text: str, after_text: str) -> dict[str, Any]:
    """The service's figures over the run, from the scrapes before and after it."""
    window = delta(parse_metrics(before_text), parse_metrics(after_text))
    by_outcome = {lab["outcome"]: v for lab, v in select(window, f"{DURATION}_count")}
    latency = {"served": _latency_ms(window, DURATION, _label("outcome", "ok", "degraded"))}
    for outcome in ("ok", "degraded", "rejected"):
        latency[outcome] = _latency_ms(window, DURATION, _label("outcome", outcome))
    stages = sorted({lab["stage"] for lab, _ in select(window, f"{STAGE}_count")})
    lookups: dict[str, dict[str, float]] = {}
    for lab, value in select(window, LOOKUPS):
        lookups.setdefault(lab["tier"], {})[lab["result"]] = value
    asked = sum(lookups.get("l1", {}).values())  # every candidate is looked up in L1 first
    hit_ratio, served_from = {}, {}
    for tier, results in sorted(lookups.items()):
        # of the lookups that reached the tier: a Redis read skipped (not worth its round
        # trip) is not a lookup of L2; those rows went on to the item tower
        n = sum(v for r, v in results.items() if r != "skipped")
        hit_ratio[tier] = results.get("hit", 0.0) / n if n else math.nan
        served_from[tier] = results.get("hit", 0.0) / asked if asked else math.nan

    def mean(name: str) -> float:
        count = _total(window, f"{name}_count")
        return _total(window, f"{name}_sum") / count if count else math.nan

    return {
        "requests": by_outcome,
        "latency_ms": latency,
        "stages_ms": {s: _latency_ms(window, STAGE, _label("stage", s)) for s in stages},
        "fallback": {lab["reason"]: v for lab, v in select(window, FALLBACK)},
        "lookups": lookups,
        "hit_ratio": hit_ratio,
        "served_from": served_from,
        "batch_size_mean": mean("rerank_batch_size"),
        "decode_passes_mean": mean("rerank_decode_passes"),
        "candidates_mean": mean("rerank_candidates"),
        "writebacks": {lab["result"]: v for lab, v in select(window, WRITEBACKS)},
    }


# ---------------------------------------------------------------- locust's CSVs


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _num(row: dict[str, str], key: str) -> float:
    try:
        return float(row.get(key) or "nan")
    except ValueError:  # "N/A"
        return math.nan


@dataclass(frozen=True)
class ClientStats:
    """Locust's totals for one name (a row of <prefix>_stats.csv)."""

    type: str
    name: str
    requests: int
    failures: int
    rps: float
    p50: float
    p95: float
    p99: float

    @classmethod
    def from_row(cls, row: dict[str, str]) -> ClientStats:
        return cls(row["Type"], row["Name"], int(row["Request Count"]),
                   int(row["Failure Count"]), _num(row, "Requests/s"), _num(row, "50%"),
                   _num(row, "95%"), _num(row, "99%"))  # fmt: skip


def client_stats(stats_csv: Path) -> dict[str, ClientStats]:
    """By name, without locust's Aggregated row (it counts degraded answers twice)."""
    rows = [ClientStats.from_row(r) for r in read_csv(stats_csv)]
    return {r.name: r for r in rows if r.name != "Aggregated"}


@dataclass(frozen=True)
class History:
    """One name's time series from <prefix>_stats_history.csv (--csv-full-history), a row
    a second: requests/s from the differences of its running total (exact per second),
    percentiles as locust keeps them (over its last ~10 s; 0 = none yet, kept as NaN)."""

    t: list[float]  # seconds since the first row of the file
    users: list[float]
    rps: list[float]
    p50: list[float]
    p95: list[float]
    p99: list[float]


def _per_second(t: list[float], total: list[float]) -> list[float]:
    """Rates from a running total sampled at times t (the first sample: 0)."""
    out = [0.0]
    for i in range(1, len(t)):
        dt = t[i] - t[i - 1]
        out.append((total[i] - total[i - 1]) / dt if dt > 0 else out[-1])
    return out[: len(t)]


def history(history_csv: Path, name: str, type_: str | None = None) -> History:
    rows = read_csv(history_csv)
    t0 = min((float(r["Timestamp"]) for r in rows), default=0.0)
    mine = [r for r in rows if r["Name"] == name and (type_ is None or r["Type"] == type_)]

    def col(key: str) -> list[float]:
        values = [_num(r, key) for r in mine]
        return [math.nan if v == 0 else v for v in values] if key.endswith("%") else values

    t = [float(r["Timestamp"]) - t0 for r in mine]
    rps = _per_second(t, col("Total Request Count"))
    return History(t, col("User Count"), rps, col("50%"), col("95%"), col("99%"))


def degraded_rate(history_csv: Path) -> tuple[list[float], list[float]]:
    """(t, degraded answers/s summed over reasons) from the DEGRADED rows."""
    rows = read_csv(history_csv)
    t0 = min((float(r["Timestamp"]) for r in rows), default=0.0)
    total: dict[float, float] = {}
    for r in rows:
        if r["Type"] == "DEGRADED":
            t = float(r["Timestamp"]) - t0
            total[t] = total.get(t, 0.0) + _num(r, "Total Request Count")
    ts = sorted(total)
    return ts, _per_second(ts, [total[t] for t in ts])


def plateaus(h: History) -> list[dict[str, float]]:
    """Per user count held for >= 3 s (step/spike shapes): the median of its per-second
    req/s (its first 2 s left out: users still starting) and the percentiles locust had at
    its end (over the last ~10 s: the plateau's own when it lasted that long)."""
    out: list[dict[str, float]] = []
    i = 0
    while i < len(h.t):
        j = i
        while j < len(h.t) and h.users[j] == h.users[i]:
            j += 1
        keep = [h.rps[x] for x in range(i, j) if h.t[x] - h.t[i] >= 2.0]
        if h.t[j - 1] - h.t[i] >= 3.0 and keep:
            out.append({"users": h.users[i], "seconds": h.t[j - 1] - h.t[i],
                        "rps": _median(keep), "p50": h.p50[j - 1], "p95": h.p95[j - 1],
                        "p99": h.p99[j - 1]})  # fmt: skip
        i = j
    return out


def _median(values: Iterable[float]) -> float:
    v = sorted(x for x in values if not math.isnan(x))
    if not v:
        return math.nan
    mid = len(v) // 2
    return v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2


# ---------------------------------------------------------------- the plot


def plot(history_csv: Path, name: str, budget_ms: float, title: str, out: Path) -> None:
    """p50/p95/p99 over time with the budget line; throughput, degraded/s and users."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = history(history_csv, name, "POST")
    dt, drate = degraded_rate(history_csv)
    fig, (lat, thr) = plt.subplots(2, 1, figsize=(10, 7), sharex=True,
                                   gridspec_kw={"height_ratios": [3, 2]})  # fmt: skip
    for key, style in (("p50", "-"), ("p95", "--"), ("p99", ":")):
        lat.plot(h.t, getattr(h, key), style, label=f"{key} (locust, last ~10 s)")
    lat.axhline(budget_ms, color="red", lw=1, label=f"default budget {budget_ms:g} ms")
    lat.set_ylabel("response time, ms")
    highest = max([x for x in h.p99 if not math.isnan(x)] + [budget_ms])
    lat.set_ylim(0, 1.3 * highest)
    lat.legend(loc="upper left", fontsize=8)
    lat.set_title(title, fontsize=10)
    lat.grid(alpha=0.3)
    thr.plot(h.t, h.rps, label=f"{name} req/s")
    if drate:
        thr.plot(dt, drate, label="degraded answers/s")
    thr.set_ylabel("requests/s")
    thr.set_xlabel("seconds since start")
    thr.set_ylim(0, 1.4 * max([*h.rps, *drate, 1.0]))  # room for the legend above the lines
    thr.grid(alpha=0.3)
    users = thr.twinx()
    users.plot(h.t, h.users, color="grey", lw=1, ls="--", label="users")
    users.set_ylabel("users")
    users.set_ylim(0, 1.4 * max([*h.users, 1.0]))
    lines = thr.get_legend_handles_labels()
    more = users.get_legend_handles_labels()
    thr.legend(lines[0] + more[0], lines[1] + more[1], loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- summary.md


def _ms(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.2f}"


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.1%}"


def summary(setup: dict[str, Any], stats: dict[str, ClientStats], server: dict[str, Any],
            failures: list[dict[str, str]], steps: list[dict[str, float]]) -> str:  # fmt: skip
    """summary.md: the run's figures, client (locust) and server (/metrics) side."""
    from loadtest.traffic import RERANK

    valid = stats.get(RERANK)
    n_valid = valid.requests if valid else 0
    invalid = {n: s for n, s in stats.items() if n.startswith("invalid:")}
    degraded = {n.split(":", 1)[1]: s.requests for n, s in stats.items()
                if s.type == "DEGRADED"}  # fmt: skip
    n_failures = sum(s.failures for s in stats.values())
    lines = [f"# Load test {setup['started']}", ""]
    lines += [f"- {k}: {v}" for k, v in setup.items() if k != "started"]
    srv = server["latency_ms"]["served"]
    reasons = ", ".join(f"{r} {n / n_valid:.1%} ({n})" for r, n in sorted(degraded.items())
                        ) if n_valid and degraded else "none"  # fmt: skip
    fb = server.get("fallback", {})
    server_reasons = ", ".join(f"{r} {int(n)}" for r, n in sorted(fb.items()) if n) or "none"
    lines += [
        "",
        "| figure | value |",
        "|---|---|",
        f"| valid requests (/v1/rerank) | {n_valid} |",
        f"| throughput | {valid.rps if valid else 0:.1f} req/s |",
        f"| deliberately bad requests (422 expected) | "
        f"{sum(s.requests for s in invalid.values())} |",
        f"| failures (wrong answers, errors) | {n_failures} |",
        f"| degraded answers | {sum(degraded.values()) / n_valid if n_valid else 0:.2%}: "
        f"{reasons} |",
        f"| degraded, server-side (rerank_fallback_total) | {server_reasons} |",
        f"| client p50 / p95 / p99, ms (locust, whole ms) | "
        f"{_ms(valid.p50) if valid else 'n/a'} / {_ms(valid.p95) if valid else 'n/a'} / "
        f"{_ms(valid.p99) if valid else 'n/a'} |",
        f"| server p50 / p95 / p99, ms (/metrics, ok + degraded) | "
        f"{_ms(srv['p50'])} / {_ms(srv['p95'])} / {_ms(srv['p99'])} |",
        f"| server mean, ms; answers counted | {_ms(srv['mean'])}; {int(srv['count'])} |",
        f"| mean batch (requests per engine call) | {server['batch_size_mean']:.2f} |",
        "",
        "Embedding lookups (rerank_embedding_lookups_total over the run): hit ratio of the "
        "lookups that reached each tier, and the share of all candidates each tier served "
        "(none: candidates of requests answered in upstream order before the item tower ran).",
        "",
        "| tier | lookups | hit ratio | served share |",
        "|---|---:|---:|---:|",
    ]
    for tier, results in sorted(server["lookups"].items()):
        lines.append(
            f"| {tier} | {int(sum(v for r, v in results.items() if r != 'skipped'))} | "
            f"{_pct(server['hit_ratio'][tier])} | {_pct(server['served_from'][tier])} |"
        )
    shares = [v for v in server["served_from"].values() if not math.isnan(v)]
    if shares:
        lines.append(f"| none | | | {_pct(max(0.0, 1.0 - sum(shares)))} |")
    skipped = server["lookups"].get("l2", {}).get("skipped", 0.0)
    if skipped:
        lines += ["", f"Redis reads skipped as not worth their round trip "
                  f"(RERANK_REDIS_READ=measured): {int(skipped)} L1 misses went straight to "
                  f"the item tower."]  # fmt: skip
    stages = server.get("stages_ms", {})
    if stages:
        lines += ["", "Server stages, ms (rerank_stage_duration_seconds):", "",
                  "| stage | p50 | p99 | mean |", "|---|---:|---:|---:|"]  # fmt: skip
        for stage, v in stages.items():
            lines.append(f"| {stage} | {_ms(v['p50'])} | {_ms(v['p99'])} | {_ms(v['mean'])} |")
    if len(steps) > 1:
        lines += ["", "By plateau of users (req/s: median per second; percentiles: locust's "
                  "last ~10 s at the plateau's end):",
                  "", "| users | seconds | req/s | p50 | p95 | p99 |",
                  "|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for s in steps:
            lines.append(
                f"| {s['users']:.0f} | {s['seconds']:.0f} | {s['rps']:.1f} | "
                f"{_ms(s['p50'])} | {_ms(s['p95'])} | {_ms(s['p99'])} |"
            )
    if failures:
        lines += ["", "Failures (locust):", "", "| name | count | message |", "|---|---:|---|"]
        for f in failures[:10]:
            message = f.get("Error", "").replace("|", "\\|")[:200]
            lines.append(f"| {f.get('Name', '')} | {f.get('Occurrences', '')} | {message} |")
    lines += ["", "Locust's Aggregated row counts each degraded answer twice (under /v1/rerank "
              "and under degraded:<reason>); the figures above are per name."]  # fmt: skip
    return "\n".join(lines) + "\n"
