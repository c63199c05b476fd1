"""Admission at the door under overload: open-loop steps to several times saturation.

    python tests/bench/bench_admission.py [--bundle DIR] [--step-s S] [--step X]
                                          [--off] [--tight-s S] [--out PNG] [--json PATH]
                                          [--env RERANK_X=V ...] [--raw NPZ]
    pytest -m bench -s tests/bench/test_bench_admission.py      (a short run)

The machinery is bench_load.py's (loadtest/ and tests/support/load.py): `python -m
service` in its own uvicorn process (one worker, shipped settings, no Redis: L1 + item
tower) pinned to one core, the load from a spawned process pinned to another (raw asyncio
streams, keep-alive), the simulated world's requests (m = 30, k = 10), every body
answered once with the model's list before anything is measured (its items in L1).

1. saturation: closed loop at 32 connections; model (non-degraded) answers per second
   is the reference of every rate below, measured in this run.
2. step: one open-loop schedule, 30% of the reference for 10 s, `--step` x it for
   `--step-s` s (default 3x for 60 s), 30% again for 20 s. Every request is accounted for:
   a model answer, a degraded answer (upstream order, reason), a 503 shed at the door, or
   an error / no answer. Figures, each against the acceptance it is meant for:
   - model answers per second during the step (completed in the step's window, the
     first 2 s left out) >= 80% of the saturation reference;
   - every request answered (model, degraded or 503), none later than the default budget
     + 50 ms from its scheduled send;
   - p99 of the shed (503) answers <= 5 ms from the scheduled send;
   - server RSS 5 s after the step within 10% of before it;
   - p99 back within the bound (max(2x, +5 ms) of the phase before the step) in every 1 s
     bin from at most 2 s after the load drops.
   The service's own counts (/metrics: rerank_shed_requests_total, outcome="rejected",
   rerank_admission_limit, rerank_event_loop_lag_seconds) are read before and after.
   `--off`: the same schedule against the same settings with RERANK_ADMISSION=false, in
   the same run (what happens without the door).
3. tight budgets (`--tight-s`, default 20 s): open loop at 200 req/s with budget_ms 20 in
   every body: the share of answers sent (server's timings.total_ms) and received
   (client) after their 20 ms budget.

A PNG (`--out`) shows answers per second by kind and p99 over time for each step run.
Figures are printed against their goals as met / MISSED, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from loadtest.driver import LoadProcess, client_loop_name  # noqa: E402
from loadtest.schedules import (  # noqa: E402
    ScheduleResult,
    Segment,
    pct_ms,
    run_job_async,
    run_schedule,
)
from loadtest.scrapes import DURATION, LabelTest, parse_metrics, select  # noqa: E402
from loadtest.servers import process_cpu_s, rss_mib  # noqa: E402
from tests.support.load import (  # noqa: E402
    Bench,
    LoadSettings,
    bench_placement,
    jsonable,
    model_max,
    resolve_bundle,
    shipped,
    verdict,
    world_requests,
)
from tests.support.redis_server import free_port  # noqa: E402

DEFAULT_PNG = ROOT / "tests" / "bench" / "results" / "admission.png"
SHED = 503


@dataclass(frozen=True)
class AdmissionBench:
    bundle: Path | None = None
    step: float = 3.0  # the step's rate, x the saturation reference
    base: float = 0.3  # before and after it
    base_s: float = 10.0
    step_s: float = 60.0
    after_s: float = 20.0
    saturation_s: float = 8.0  # the closed-loop reference's window
    off: bool = False  # also the same schedule with admission off
    tight_s: float = 20.0  # the tight-budget run (0: none)
    tight_rate: float = 200.0
    tight_budget_ms: float = 20.0
    n_requests: int = 2000
    connections: int = 1024
    out: Path | None = DEFAULT_PNG
    pin: bool = True
    env: tuple[tuple[str, str], ...] = ()  # RERANK_* settings of the measured service
    raw: Path | None = None  # every request's figures of the step runs (npz), for study


def _metric(text: str, name: str, where: LabelTest | None = None) -> float:
    """The sum of sample `name` over its label sets (those passing `where`); NaN: none."""
    found = select(parse_metrics(text), name, where)
    return float(sum(v for _, v in found)) if found else float("nan")


def _rejected_count(text: str) -> float:
    return _metric(text, f"{DURATION}_count", lambda lab: lab.get("outcome") == "rejected")


def step_figures(res: ScheduleResult, reference: float, budget_ms: float,
                 rss: list[tuple[float, float]], rss_before: float, rss_after: float,
                 ) -> dict[str, Any]:  # fmt: skip
    """The acceptance figures of one step schedule (segments: base, step, base again)."""
    b = res.schedule.boundaries()
    step_start, step_end = float(b[1]), float(b[2])
    model = res.answered & (res.reason == 0)
    degraded = res.answered & (res.reason > 0)
    shed = res.status == SHED
    answered_any = res.answered | shed
    with np.errstate(invalid="ignore"):
        done = res.done
        in_step = (done >= step_start + 2.0) & (done < step_end)
    seconds = max(1e-9, step_end - step_start - 2.0)
    model_rps = float((model & in_step).sum()) / seconds
    lat_ms = res.latency * 1e3
    limit_ms = budget_ms + 50.0
    with np.errstate(invalid="ignore"):
        late = answered_any & (lat_ms > limit_ms)
    unanswered = ~answered_any
    shed_p99 = pct_ms(res.latency[shed], 99) if shed.any() else float("nan")
    before = (res.segment == 0) & answered_any & ~shed
    base_p99 = pct_ms(res.latency[before & res.answered], 99)
    bound = max(2 * base_p99, base_p99 + 5.0)
    # p99 of the 200 answers per 1 s bin of scheduled send after the drop
    after = res.offset >= step_end
    bins = np.floor(res.offset - step_end).astype(int)
    recovered_at = None
    p99_after = {}
    last = int(np.ceil(res.schedule.seconds - step_end))
    for sec in range(last):
        ok = after & (bins == sec) & answered_any
        p99_after[sec] = pct_ms(res.latency[ok], 99) if ok.any() else float("nan")
    good = [sec for sec in range(last) if p99_after[sec] <= bound]
    for sec in range(last):
        if all(s in good for s in range(sec, last)):
            recovered_at = sec
            break
    timeline = []
    total_s = int(np.ceil(res.schedule.seconds))
    for sec in range(total_s):
        with np.errstate(invalid="ignore"):
            win = (done >= sec) & (done < sec + 1)
            sched = np.floor(res.offset).astype(int) == sec
        timeline.append({
            "t": sec,
            "model": int((model & win).sum()), "degraded": int((degraded & win).sum()),
            "shed": int((shed & win).sum()), "errors": int((~answered_any & sched).sum()),
            "p99_ms": pct_ms(res.latency[sched & res.answered], 99)
            if (sched & res.answered).any() else float("nan"),
            "shed_p99_ms": pct_ms(res.latency[sched & shed], 99)
            if (sched & shed).any() else float("nan"),
        })  # fmt: skip
    step_sched = res.segment == 1
    per_reason = {}
    for code, name in enumerate(("budget", "overload", "cache", "model"), start=1):
        per_reason[name] = int((step_sched & res.answered & (res.reason == code)).sum())
    return {
        "sent": len(res.status), "model": int(model.sum()), "degraded": int(degraded.sum()),
        "shed": int(shed.sum()), "unanswered": int(unanswered.sum()),
        "other_status": int((~answered_any & (res.status > 0)).sum()),
        "step_sent": int(step_sched.sum()),
        "step_model": int((step_sched & model).sum()),
        "step_shed": int((step_sched & shed).sum()),
        "step_degraded_by_reason": per_reason,
        "model_rps_in_step": model_rps, "reference_rps": reference,
        "model_share_of_reference": model_rps / reference if reference else float("nan"),
        "late_beyond_budget_plus_50ms": int(late.sum()), "limit_ms": limit_ms,
        "max_latency_ms": float(np.nanmax(lat_ms)) if np.isfinite(lat_ms).any() else np.nan,
        "answer_p99_ms_in_step": pct_ms(res.latency[step_sched & res.answered], 99),
        "shed_p99_ms": shed_p99, "shed_p50_ms": pct_ms(res.latency[shed], 50)
        if shed.any() else float("nan"),
        "base_p99_ms": base_p99, "recovery_bound_ms": bound,
        "p99_after_drop_ms": p99_after, "recovered_after_drop_s": recovered_at,
        "rss_mib": {"before": rss_before, "after": rss_after,
                    "max": max([m for _, m in rss], default=rss_before), "samples": rss},
        "rss_ratio": rss_after / rss_before if rss_before else float("nan"),
        "peak_connections": res.peak_connections, "sender_late": int(res.late.sum()),
        "sender_waited": int(res.waited.sum()), "error_sample": res.error_sample,
        "timeline": timeline,
    }  # fmt: skip


def run_step(b: Bench[LoadSettings], name: str, env: dict[str, str], cfg: AdmissionBench,
             ) -> tuple[dict[str, Any], float]:  # fmt: skip
    """Start a service, measure its saturation reference, run the step; stop it."""
    admin = free_port()
    b.start({name: {"RERANK_ADMIN_PORT": str(admin), **env}})
    server = b.servers[name]
    top = b.load.run(b.phase(name, "closed", cfg.saturation_s, 2.0))
    reference, reference_text = model_max(top)
    segments = (
        Segment(f"{cfg.base:.0%}", max(1.0, cfg.base * reference), cfg.base_s),
        Segment(f"{cfg.step:g}x", max(1.0, cfg.step * reference), cfg.step_s),
        Segment(f"{cfg.base:.0%} again", max(1.0, cfg.base * reference), cfg.after_s),
    )
    job = b.schedule(name, segments, grace_s=15.0, scrape=True)
    rss_before = rss_mib(server.proc.pid)
    rss: list[tuple[float, float]] = []
    t0 = time.monotonic()

    def sample() -> None:
        if server.proc.poll() is None:
            rss.append((time.monotonic() - t0, rss_mib(server.proc.pid)))

    since = b.mark()
    cpu0 = process_cpu_s(server.proc.pid)
    res = run_schedule(b.load, job, sample)
    if cfg.raw is not None:
        np.savez(cfg.raw.with_name(f"{cfg.raw.stem}-{name}.npz"), offset=res.offset,
                 latency=res.latency, status=res.status, reason=res.reason, done=res.done,
                 segment=res.segment, waited=res.waited, late=res.late)  # fmt: skip
    server_cpu = process_cpu_s(server.proc.pid) - cpu0
    others = b.others_text(since)
    # "after": 5 s into the last phase (the step's own allocations are done by then)
    after_t = cfg.base_s + cfg.step_s + 5.0
    after = [m for t, m in rss if t >= after_t]
    rss_after = after[0] if after else rss_mib(server.proc.pid)
    before_text, after_text = res.scraped(0.0), res.scraped(job.seconds)
    b.stop(name)
    figs = step_figures(res, reference, shipped("default_budget_ms"), rss, rss_before, rss_after)
    figs.update({
        "reference_text": reference_text, "others": others,
        "server_cpu_share": server_cpu / max(1e-9, time.monotonic() - t0),
        "server_shed_total": _metric(after_text, "rerank_shed_requests_total")
        - _metric(before_text, "rerank_shed_requests_total"),
        "server_rejected": _rejected_count(after_text) - _rejected_count(before_text),
        "segments": [(s.name, s.rate, s.seconds) for s in segments],
    })  # fmt: skip
    return figs, reference


def tight_run(b: Bench[LoadSettings], cfg: AdmissionBench) -> dict[str, Any]:
    """Open loop at cfg.tight_rate with budget_ms = cfg.tight_budget_ms in every body."""
    name = "tight"
    b.start({name: {}})
    bodies = [orjson.dumps({**orjson.loads(body), "budget_ms": cfg.tight_budget_ms})
              for body in b.requests.bodies]  # fmt: skip
    client_cpus = bench_placement(cfg.pin).load
    load = LoadProcess(bodies, client_cpus, runner=run_job_async)
    try:
        seg = (Segment("tight", cfg.tight_rate, cfg.tight_s),)
        job = b.schedule(name, seg, grace_s=10.0, scrape=False)
        res = run_schedule(load, job)
    finally:
        load.stop()
        b.stop(name)
    ok = res.answered
    budget = cfg.tight_budget_ms
    with np.errstate(invalid="ignore"):
        server_late = ok & (res.handler_ms > budget)
        client_late = ok & (res.latency * 1e3 > budget)
    n = max(1, int(ok.sum()))
    return {
        "rate": cfg.tight_rate, "seconds": cfg.tight_s, "budget_ms": budget,
        "sent": len(res.status), "answered": int(ok.sum()),
        "shed": int((res.status == SHED).sum()),
        "degraded": int((ok & (res.reason > 0)).sum()),
        "server_late_share": float(server_late.sum()) / n,
        "client_late_share": float(client_late.sum()) / n,
        "server_p99_ms": float(np.nanpercentile(res.handler_ms[ok], 99)) if ok.any() else np.nan,
        "client_p99_ms": pct_ms(res.latency[ok], 99),
    }  # fmt: skip


def plot(runs: dict[str, dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(runs), figsize=(6.5 * len(runs), 6.5), squeeze=False,
                             sharex="col")  # fmt: skip
    for col, (name, figs) in enumerate(runs.items()):
        tl = figs["timeline"]
        t = [r["t"] for r in tl]
        ax = axes[0][col]
        for key, color in (("model", "tab:green"), ("degraded", "tab:orange"),
                           ("shed", "tab:gray"), ("errors", "tab:red")):  # fmt: skip
            ax.plot(t, [r[key] for r in tl], label=key, color=color)
        ax.axhline(figs["reference_rps"], ls=":", color="k", label="saturation (model)")
        ax.set_title(f"{name}: answers per second by kind")
        ax.set_ylabel("answers/s")
        ax.legend(fontsize=8)
        ax = axes[1][col]
        ax.semilogy(t, [r["p99_ms"] for r in tl], label="p99, 200 answers", color="tab:blue")
        ax.semilogy(t, [r["shed_p99_ms"] for r in tl], label="p99, 503 sheds", color="tab:gray")
        ax.axhline(figs["limit_ms"], ls=":", color="k", label="budget + 50 ms")
        ax.set_xlabel("s (by scheduled send; answers by answer time)")
        ax.set_ylabel("ms from the scheduled send")
        ax.legend(fontsize=8)
        segs = figs["segments"]
        edges = np.cumsum([0] + [s[2] for s in segs])
        for axis in axes[:, col]:
            for e in edges[1:-1]:
                axis.axvline(e, color="k", lw=0.5)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def step_text(name: str, f: dict[str, Any]) -> list[str]:
    segs = ", ".join(f"{n} {r:.0f} req/s for {s:.0f} s" for n, r, s in f["segments"])
    rec = f["recovered_after_drop_s"]
    answered_all = f["unanswered"] == 0
    reasons = ", ".join(f"{k} {v}" for k, v in f["step_degraded_by_reason"].items() if v)
    return [
        f"== {name}: {segs}",
        f"  saturation reference (closed loop, 32 connections): {f['reference_text']}",
        f"  ({f['others']}; the server used {f['server_cpu_share']:.0%} of its core)",
        f"  sent {f['sent']}: model {f['model']}, degraded {f['degraded']}, shed (503) "
        f"{f['shed']}, no answer or error {f['unanswered']} (of which other HTTP statuses "
        f"{f['other_status']}); the server counted {f['server_shed_total']:.0f} sheds",
        f"  in the step: {f['step_sent']} sent, {f['step_model']} model, {f['step_shed']} shed, "
        f"degraded by reason: {reasons or '-'}",
        f"  model answers/s in the step: {f['model_rps_in_step']:.0f} = "
        f"{f['model_share_of_reference']:.2f} x the reference (goal >= 0.80): "
        f"{verdict(f['model_share_of_reference'] >= 0.8)}",
        f"  every request answered: {verdict(answered_all)}; none after budget + 50 ms "
        f"({f['limit_ms']:.0f} ms): {f['late_beyond_budget_plus_50ms']} later, max "
        f"{f['max_latency_ms']:.0f} ms: {verdict(f['late_beyond_budget_plus_50ms'] == 0)}",
        f"  p99 of the sheds: {f['shed_p99_ms']:.2f} ms (p50 {f['shed_p50_ms']:.2f}; goal "
        f"<= 5 ms): {verdict(bool(f['shed_p99_ms'] <= 5.0))}",
        f"  RSS {f['rss_mib']['before']:.0f} MiB before, {f['rss_mib']['after']:.0f} 5 s after "
        f"the step ({f['rss_ratio']:.3f}x; max {f['rss_mib']['max']:.0f}; goal within 10%): "
        f"{verdict(abs(f['rss_ratio'] - 1) <= 0.10)}",
        f"  p99 before the step {f['base_p99_ms']:.1f} ms, bound {f['recovery_bound_ms']:.1f} "
        f"ms; every 1 s bin within it from {rec if rec is not None else 'never'} s after the "
        f"drop (goal <= 2 s): {verdict(rec is not None and rec <= 2)}",
        f"  sender: at most {f['peak_connections']} connections open, {f['sender_late']} sends "
        f"more than 1 ms late, {f['sender_waited']} waited for a connection"
        + (f"; first error: {f['error_sample']}" if f["error_sample"] else ""),
    ]


def run(cfg: AdmissionBench) -> tuple[str, dict[str, Any]]:
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gref-adm-")))
        path, how = resolve_bundle(cfg.bundle, workdir)
        manifest = json.loads((path / "manifest.json").read_text())
        _, reqs = world_requests(manifest["model_config"]["schema"], cfg.n_requests)
        place = bench_placement(cfg.pin)
        server_cpus, client_cpus, placement = place.service, place.load, place.text
        load = LoadProcess(reqs.bodies, client_cpus, runner=run_job_async)
        stack.callback(load.stop)
        b = Bench(LoadSettings(connections=cfg.connections), workdir, path, reqs, load,
                  server_cpus)  # fmt: skip

        @stack.callback
        def _stop() -> None:
            for s in b.servers.values():
                s.stop()

        lines = [
            f"Admission benchmark: bundle {manifest['version']} ({how}); {reqs.source}",
            f"  client {client_loop_name()}; nproc {os.cpu_count()}; {placement}; load average "
            f"{os.getloadavg()[0]:.2f} at the start; shipped settings (budget "
            f"{shipped('default_budget_ms'):g} ms, admission share "
            f"{shipped('admission_share')}, floor {shipped('admission_floor')})"
            + "".join(f", {k}={v}" for k, v in cfg.env),
        ]
        figures: dict[str, Any] = {"setup": {"bundle": manifest["version"],
                                             "placement": placement}}  # fmt: skip
        runs = {}
        base = dict(cfg.env)
        for name, env in (("admission on", base),
                          ("admission off", {**base, "RERANK_ADMISSION": "false"})):  # fmt: skip
            if name == "admission off" and not cfg.off:
                continue
            t0 = time.monotonic()
            figs, _ = run_step(b, name.replace(" ", "_"), env, cfg)
            figs["wall_s"] = time.monotonic() - t0
            runs[name] = figs
            lines += ["", *step_text(name, figs)]
        figures["steps"] = runs
        if cfg.tight_s > 0:
            t = tight_run(b, cfg)
            figures["tight"] = t
            lines += [
                "",
                f"== tight budgets: budget_ms {t['budget_ms']:g} in every body, open loop "
                f"{t['rate']:.0f} req/s for {t['seconds']:.0f} s",
                f"  answered {t['answered']} / {t['sent']} (shed {t['shed']}, degraded "
                f"{t['degraded']}); after their budget: {t['server_late_share']:.2%} by the "
                f"server's own timings (handler p99 {t['server_p99_ms']:.1f} ms), "
                f"{t['client_late_share']:.2%} as the client saw them (p99 "
                f"{t['client_p99_ms']:.1f} ms)",
            ]
        if cfg.out is not None and runs:
            plot(runs, cfg.out)
            lines.append(f"\nplot: {cfg.out}")
        return "\n".join(lines), figures
    raise AssertionError("unreachable")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, help="bundle or artifacts dir (default: artifacts/)")
    p.add_argument("--step", type=float, default=3.0, help="the step's rate, x saturation")
    p.add_argument("--step-s", type=float, default=60.0, help="the step's length, s")
    p.add_argument("--off", action="store_true", help="also run the step with admission off")
    p.add_argument("--tight-s", type=float, default=20.0,
                   help="seconds of the budget_ms 20 run at 200 req/s (0: none)")  # fmt: skip
    p.add_argument("--requests", type=int, default=2000, help="distinct world requests")
    p.add_argument("--out", type=Path, default=DEFAULT_PNG, help="the plot (PNG)")
    p.add_argument("--json", type=Path, help="write every figure here")
    p.add_argument("--no-pin", action="store_true", help="do not pin server and client")
    p.add_argument("--env", action="append", default=[], metavar="RERANK_X=V",
                   help="a setting of the measured service (repeatable)")  # fmt: skip
    p.add_argument("--raw", type=Path, help="every request's figures (npz, one per step run)")
    args = p.parse_args(argv)
    env = tuple(tuple(e.split("=", 1)) for e in args.env)
    cfg = AdmissionBench(bundle=args.bundle, step=args.step, step_s=args.step_s, off=args.off,
                         tight_s=args.tight_s, n_requests=args.requests, out=args.out,
                         pin=not args.no_pin, env=env, raw=args.raw)  # type: ignore[arg-type]  # fmt: skip
    text, figures = run(cfg)
    print(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(jsonable(figures), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
