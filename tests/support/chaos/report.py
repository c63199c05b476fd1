"""The fault suite's report: report.md (per scenario: answers by kind, latency, every
acceptance check with what was measured) and one PNG per scenario (answers per second by
kind, and p99 latency per second, with the scenario's events marked)."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np

from tests.support.chaos.harness import Record, p99_ms

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def plot(rec: Record, path: Path) -> None:
    if not rec.shots:
        return
    end = int(max(s.t for s in rec.shots)) + 1
    seconds = np.arange(end)
    kinds = sorted({s.kind for s in rec.shots})
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    for kind in kinds:
        per_s = np.bincount([int(s.t) for s in rec.shots if s.kind == kind], minlength=end)
        top.plot(seconds, per_s[:end], label=kind, drawstyle="steps-post")
    top.set_ylabel("answers / s")
    top.legend(loc="upper right", fontsize=8)
    p99 = [p99_ms(np.array([s.latency for s in rec.shots if int(s.t) == t])) for t in seconds]
    bottom.plot(seconds, p99, color="black", drawstyle="steps-post")
    bottom.set_yscale("log")
    bottom.set_ylabel("p99 latency (ms)")
    bottom.set_xlabel("s since the scenario's start")
    for ax in (top, bottom):
        for t, _ in rec.events:
            ax.axvline(t, color="grey", linestyle=":", linewidth=1)
    for t, what in rec.events:
        top.annotate(what[:32], (t, top.get_ylim()[1]), rotation=90, fontsize=7,
                     va="top", ha="right", color="grey")  # fmt: skip
    top.set_title(f"{rec.title} ({'pass' if rec.passed else 'FAIL'})")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write(records: list[Record], out: Path, header: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# Fault suite report", "", header, "",
             "| scenario | result | sent | answers by kind | p50 ms | p99 ms |",
             "| --- | --- | ---: | --- | ---: | ---: |"]  # fmt: skip
    for rec in records:
        lat = rec.latencies()
        p50 = float(np.percentile(lat, 50) * 1000) if lat.size else float("nan")
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(rec.kinds().items()))
        lines.append(f"| {rec.title} | {'pass' if rec.passed else '**FAIL**'} | "
                     f"{len(rec.shots)} | {kinds} | {p50:.1f} | {p99_ms(lat):.1f} |")  # fmt: skip
    for rec in records:
        png = f"{rec.name}.png"
        plot(rec, out / png)
        lines += ["", f"## {rec.title}", ""]
        lines += [f"- {note}" for note in rec.notes]
        lines += ["", "| acceptance | result | measured |", "| --- | --- | --- |"]
        lines += [f"| {what} | {'pass' if ok else '**FAIL**'} | {measured} |"
                  for what, ok, measured in rec.checks]  # fmt: skip
        if rec.events:
            lines += ["", "Events: " + "; ".join(f"{t:.1f} s {w}" for t, w in rec.events)]
        if rec.shots:
            lines += ["", f"![{rec.title}]({png})"]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
