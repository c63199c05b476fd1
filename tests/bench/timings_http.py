"""The service's own stage times at low load: Poisson arrivals on one connection, each
answer's `timings` and the client-side latency, as percentiles.

    python tests/bench/timings_http.py [--bundle DIR] [--rate 30] [--requests 300]
                                       [--set RERANK_DECODE_POLICY=fixed]

The service (`python -m service`, one worker) pinned to one core, this client (httpx,
one keep-alive connection, one request at a time) to the other, as in bench_http.py.
After --warmup requests sent back to back, --requests are sent at Poisson arrival times
of mean rate --rate (a request whose time came while the previous one was out waits for
it: at a low rate, rarely). What the service spends on an answer when nothing queues.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from tests.support.load import (  # noqa: E402
    bench_placement,
    build_bodies,
    resolve_bundle,
    start_service,
)

STAGES = ("total_ms", "queue_ms", "cache_ms", "encode_ms", "decode_ms")


def main(argv: list[str] | None = None) -> int:
    import httpx

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, help="bundle or artifacts dir (default: as bench_http)")
    p.add_argument("--rate", type=float, default=30.0, help="mean arrivals per second")
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--set", action="append", default=[], metavar="RERANK_X=V",
                   help="a service setting (repeatable)")  # fmt: skip
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gref-timings-") as tmp:
        path, _ = resolve_bundle(args.bundle, Path(tmp))
        bodies = build_bodies(json.loads((path / "manifest.json").read_text()), 30, 10)
        place = bench_placement(True)
        server_cpus, client_cpus, placement = place.service, place.load, place.text
        env = dict(kv.split("=", 1) for kv in args.set)
        server = start_service(path, Path(tmp), server_cpus, env)
        try:
            server.wait_ready()
            if client_cpus:
                os.sched_setaffinity(0, client_cpus)
            headers = {"content-type": "application/json"}
            rng = np.random.default_rng(0)
            rows: dict[str, list[float]] = {"client_ms": [], "passes": []}
            rows.update({name: [] for name in STAGES})
            with httpx.Client(base_url=server.url, timeout=30) as client:
                for i in range(args.warmup):
                    client.post("/v1/rerank", content=bodies[i % len(bodies)], headers=headers)
                due = time.perf_counter()
                for i in range(args.requests):
                    due += rng.exponential(1 / args.rate)
                    time.sleep(max(0.0, due - time.perf_counter()))
                    t0 = time.perf_counter()
                    r = client.post("/v1/rerank", content=bodies[i % len(bodies)],
                                    headers=headers)  # fmt: skip
                    rows["client_ms"].append((time.perf_counter() - t0) * 1e3)
                    out = r.json()
                    rows["passes"].append(out["passes"])
                    for name in STAGES:
                        rows[name].append(out["timings"][name])
        finally:
            server.stop()
    print(f"bundle {path.name}; {placement}; service settings: {env or 'defaults'}; Poisson "
          f"{args.rate:g} req/s, {args.requests} requests after {args.warmup}\n")  # fmt: skip
    print("| measure | p50 | p90 | p99 | max |\n|---|---:|---:|---:|---:|")
    for name, values in rows.items():
        q = np.percentile(values, [50, 90, 99])
        print(f"| {name} | {q[0]:.2f} | {q[1]:.2f} | {q[2]:.2f} | {max(values):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
