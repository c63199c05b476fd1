"""`pytest -m bench -s tests/bench/test_bench_idle_wait.py`: an idle engine takes a request
at once, whatever max_wait_ms says: the wait is for an engine whose last batch ended less
than max_wait_ms ago. One client sends requests one at a time to a server with
max_wait_ms=50 and to one with max_wait_ms=0 on the same tiny bundle, in two ways:
- spaced (a pause of twice the wait before each request): the engine is idle at each
  arrival; the ratio of the medians is about 1 when an idle engine does not wait (a
  wait would add 50 ms);
- back to back (the next request as soon as the answer came): each arrives within the
  wait of the last batch's end, so each pays the wait; this row shows what max_wait_ms
  costs a lone closed-loop client.
Prints the medians and their ratios."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from model.network import GenReranker
from service.settings import Settings
from tests.support.bodies import make_request
from tests.support.server import ServerThread, wait_ready

REQUESTS = 60
WAIT_MS = 50.0


def median_latency_ms(bundle: Path, max_wait_ms: float, pause_s: float) -> float:
    settings = Settings(bundle=bundle, max_wait_ms=max_wait_ms, default_budget_ms=30_000,
                        decode_policy="fixed")  # fmt: skip
    rng = np.random.default_rng(0)
    bodies = [make_request(rng, 30, 10) for _ in range(REQUESTS)]
    srv = ServerThread(settings).start()
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as client:
            wait_ready(client)
            for body in bodies[:10]:  # warm-up, discarded
                client.post("/v1/rerank", json=body)
            times = []
            for body in bodies:
                time.sleep(pause_s)
                t0 = time.perf_counter()
                assert client.post("/v1/rerank", json=body).status_code == 200
                times.append((time.perf_counter() - t0) * 1e3)
    finally:
        srv.stop()
    return statistics.median(times)


@pytest.mark.bench
def test_an_idle_engine_does_not_wait(tiny_bundle: tuple[Path, GenReranker]) -> None:
    print()
    for name, pause_s in (("spaced", 2 * WAIT_MS / 1e3), ("back to back", 0.0)):
        waiting = median_latency_ms(tiny_bundle[0], WAIT_MS, pause_s)
        at_once = median_latency_ms(tiny_bundle[0], 0.0, pause_s)
        print(f"{name:>12}: median max_wait_ms={WAIT_MS:g} {waiting:7.2f} ms, "
              f"max_wait_ms=0 {at_once:7.2f} ms, ratio {waiting / at_once:5.2f}")  # fmt: skip
