"""`python -m service`: a real process tree with two uvicorn workers, metrics aggregated
across them (Prometheus multiprocess mode) on the main port and on the admin port both
workers share, JSON log lines with the request id, and a clear refusal of bad settings."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from model.network import GenReranker
from tests.support.bodies import make_request
from tests.support.redis_server import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


# gauges each worker re-measures every window (the door's limit, the loop's lag): they move
# between two scrapes with no request in between
LIVE = {"rerank_admission_limit", "rerank_event_loop_lag_seconds"}


def samples_of(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name not in LIVE
    }


def test_two_workers_share_their_metrics(
    tiny_bundle: tuple[Path, GenReranker], tmp_path: Path
) -> None:
    port, admin_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RERANK_", "PROMETHEUS_"))}
    # a generous budget: this test counts requests across workers, a busy machine must not
    # turn some into degraded ones
    env |= {
        "RERANK_LOG_LEVEL": "debug",
        "RERANK_MAX_K": "10",
        "RERANK_DEFAULT_BUDGET_MS": "30000",
        "RERANK_DRAIN_S": "0",
    }
    err = (tmp_path / "stderr").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "--workers", "2", "--port", str(port),
         "--admin-port", str(admin_port), "--bundle", str(tiny_bundle[0])],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err,
    )  # fmt: skip
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            deadline, ready = time.monotonic() + 90, 0
            # several answers in a row, and rerank_ready (the minimum over the workers) 1:
            # both workers are warm (one keep-alive connection reaches only one of them)
            while ready < 6:
                assert proc.poll() is None, (tmp_path / "stderr").read_text()
                assert time.monotonic() < deadline, "not ready"
                try:
                    both = "rerank_ready 1.0" in c.get("/metrics").text
                    ready = ready + 1 if both and c.get("/readyz").status_code == 200 else 0
                except httpx.TransportError:
                    ready = 0
                time.sleep(0.05)
            rng = np.random.default_rng(0)
            ids = []
            for i in range(20):
                r = c.post("/v1/rerank", json=make_request(rng, 20, 5, request_id=f"req-{i}"))
                assert r.status_code == 200, r.text
                ids.append(r.json()["request_id"])
            samples = samples_of(c.get("/metrics").text)
        # the admin port: either worker answers, each with every worker's metrics
        with httpx.Client(base_url=f"http://127.0.0.1:{admin_port}", timeout=30) as admin:
            for _ in range(6):
                assert admin.get("/healthz").json() == {"status": "alive"}
                assert admin.get("/readyz").json()["ready"] is True
                assert samples_of(admin.get("/metrics").text) == samples
        assert samples["rerank_request_duration_seconds_count", (("outcome", "ok"),)] == 20
        assert samples["rerank_candidates_count", ()] == 20
        assert samples["rerank_inflight_requests", ()] == 0
        assert any(n == "rerank_model_info" for n, _ in samples)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        err.close()
    lines = [json.loads(line) for line in (tmp_path / "stderr").read_text().splitlines()
             if line.startswith("{")]  # fmt: skip
    logged = {json.loads(x["message"])["request_id"] for x in lines
              if x["logger"] == "service.access" and x["message"].startswith("{")}  # fmt: skip
    assert set(ids) <= logged
    admin_log = [x["message"] for x in lines if x["logger"] == "service.admin"
                 and x["level"] != "debug"]  # fmt: skip
    # each worker bound the admin port (SO_REUSEPORT), none was refused
    assert [m.startswith("admin listener (") for m in admin_log] == [True, True], admin_log


def test_bad_settings_exit_2_with_the_reason(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RERANK_")}
    r = subprocess.run(
        [sys.executable, "-m", "service", "--bundle", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2 and "neither a bundle" in r.stderr


def _start_service(bundle: Path, tmp_path: Path, **env_extra: str) -> tuple[
    subprocess.Popen[bytes], int, int
]:  # fmt: skip
    port, admin_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RERANK_", "PROMETHEUS_"))}
    env |= {"RERANK_MAX_K": "10", "RERANK_DEFAULT_BUDGET_MS": "30000", **env_extra}
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "--port", str(port), "--admin-port", str(admin_port),
         "--bundle", str(bundle)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=(tmp_path / "stderr").open("wb"),
    )  # fmt: skip
    deadline = time.monotonic() + 90
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
        while True:
            assert proc.poll() is None, (tmp_path / "stderr").read_text()
            assert time.monotonic() < deadline, "not ready"
            try:
                if c.get("/readyz").status_code == 200:
                    return proc, port, admin_port
            except httpx.TransportError:
                pass
            time.sleep(0.05)


def test_sigterm_fails_readiness_first_serves_the_drain_then_stops(
    tiny_bundle: tuple[Path, GenReranker], tmp_path: Path
) -> None:
    """SIGTERM: /readyz answers 503 at once on both ports while POST /v1/rerank is still
    answered for RERANK_DRAIN_S; then the process exits cleanly."""
    drain_s = 3.0
    proc, port, admin_port = _start_service(tiny_bundle[0], tmp_path,
                                            RERANK_DRAIN_S=str(drain_s))  # fmt: skip
    body = make_request(np.random.default_rng(1), 20, 5)
    try:
        with (
            httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as c,
            httpx.Client(base_url=f"http://127.0.0.1:{admin_port}", timeout=10) as admin,
        ):
            assert c.post("/v1/rerank", json=body).status_code == 200
            proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            wait = t0 + 2
            while c.get("/readyz").status_code != 503:
                assert time.monotonic() < wait, "readiness did not fail"
                time.sleep(0.02)
            assert admin.get("/readyz").json()["draining"] is True
            assert admin.get("/readyz").status_code == 503
            served = 0
            while time.monotonic() - t0 < drain_s - 1:  # well inside the drain
                out = c.post("/v1/rerank", json=body)
                assert out.status_code == 200 and not out.json()["degraded"], out.text
                served += 1
            assert served > 0 and proc.poll() is None
        # uvicorn ends by re-raising the signal it stopped on
        assert proc.wait(timeout=drain_s + 30) in (0, -signal.SIGTERM)
        assert time.monotonic() - t0 >= drain_s - 0.1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_keep_alive_timeout_is_a_setting(
    tiny_bundle: tuple[Path, GenReranker], tmp_path: Path
) -> None:
    """An idle keep-alive connection is closed by the service after RERANK_KEEP_ALIVE_S,
    not after uvicorn's fixed 5 s."""
    proc, port, _ = _start_service(
        tiny_bundle[0], tmp_path, RERANK_KEEP_ALIVE_S="1", RERANK_DRAIN_S="0"
    )
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b""
            while not answer.endswith(b'{"status":"alive"}'):  # headers, then the body
                chunk = sock.recv(4096)
                assert chunk, answer
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200")
            time.sleep(2.5)  # past the setting, well before uvicorn's default
            sock.settimeout(1)
            assert sock.recv(4096) == b""  # closed by the service
    finally:
        proc.terminate()
        proc.wait(timeout=30)
