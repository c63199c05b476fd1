"""Measure what the Kubernetes manifests are sized from: one replica's warm-up time and its
resident memory (RSS) when ready, with its L1 embedding cache filled, and at the peak of a
bundle swap (two engines loaded at once).

    .venv/bin/python deploy/k8s/measure.py --bundle artifacts [--fill-s 60]

It starts `python -m service` on loopback ports with the default settings (one worker,
RERANK_L1_CACHE_BYTES at its default), polls the admin port's /healthz and /readyz from
process start, sends requests of new item ids until the L1 is full or --fill-s passes,
then publishes a copy of the bundle under a new version and samples RSS every 20 ms until
/v1/model serves it. Prints one JSON object; nothing is written outside a temporary
directory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

MIB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_bytes(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, bytes: now and its peak so far."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


def bundle_dir(path: Path) -> Path:
    if (path / "manifest.json").is_file():
        return path
    return path / (path / "latest").read_text().strip()


def request_body(schema: dict[str, Any], rng: np.random.Generator, m: int) -> dict[str, Any]:
    """A valid body whose m item ids are new (random 40-bit ids): each one an L1 miss."""
    cats = [name for name, _ in schema["item_categorical"]]
    return {
        "user": {
            "id": int(rng.integers(1 << 40)),
            "features": {n: float(rng.standard_normal()) for n in schema["user_dense"]},
        },
        "candidates": [
            {
                "item_id": int(i),
                "score": float(rng.standard_normal()),
                "features": {
                    **{c: int(rng.integers(0, 100)) for c in cats},
                    **{n: float(rng.standard_normal()) for n in schema["item_dense"]},
                },
            }
            for i in rng.choice(1 << 40, m, replace=False)
        ],
        "k": 10,
    }


def wait_for(url: str, deadline: float) -> float:
    """Poll url every 20 ms until it answers 200; returns the time it did."""
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return time.monotonic()
        except httpx.HTTPError:
            pass
        time.sleep(0.02)
    raise TimeoutError(url)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", default="artifacts", help="bundle or artifacts directory")
    p.add_argument("--fill-s", type=float, default=60.0, help="most seconds of L1 filling")
    p.add_argument("--m", type=int, default=200, help="candidates (new ids) per request")
    args = p.parse_args()

    source = bundle_dir(Path(args.bundle))
    manifest = json.loads((source / "manifest.json").read_text())
    schema, m = (
        manifest["model_config"]["schema"],
        min(args.m, manifest["model_config"]["max_candidates"]),
    )
    tmp = Path(tempfile.mkdtemp(prefix="gref-measure-"))
    try:
        artifacts = tmp / "artifacts"
        shutil.copytree(source, artifacts / source.name)
        (artifacts / "latest").write_text(source.name + "\n")
        port, admin = free_port(), free_port()
        env = {**os.environ, "RERANK_BUNDLE": str(artifacts), "RERANK_PORT": str(port),
               "RERANK_ADMIN_PORT": str(admin), "RERANK_HOST": "127.0.0.1",
               "RERANK_RELOAD_INTERVAL_S": "0.5", "RERANK_LOG_LEVEL": "warning"}  # fmt: skip
        t0 = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "service"], env=env)
        try:
            base = f"http://127.0.0.1:{admin}"
            alive = wait_for(base + "/healthz", t0 + 300)
            ready = wait_for(base + "/readyz", t0 + 300)
            rss_ready, _ = rss_bytes(proc.pid)

            l1_bytes = 64 * MIB  # Settings.l1_cache_bytes' default
            row_bytes = 4 * int(manifest["model_config"]["d_model"])
            rng, sent, t_fill = np.random.default_rng(0), 0, time.monotonic()
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
                while sent * row_bytes < l1_bytes and time.monotonic() - t_fill < args.fill_s:
                    r = client.post("/v1/rerank", json=request_body(schema, rng, m))
                    r.raise_for_status()
                    sent += m
            fill = min(1.0, sent * row_bytes / l1_bytes)
            time.sleep(1.0)  # write-backs and the allocator settle
            rss_filled, hwm_before_swap = rss_bytes(proc.pid)

            # a new version: the same files under another name (the manifest says which)
            new = source.name + "-swap"
            shutil.copytree(source, artifacts / new)
            doc = json.loads((artifacts / new / "manifest.json").read_text())
            doc["version"] = new
            (artifacts / new / "manifest.json").write_text(json.dumps(doc))
            (artifacts / "latest.tmp").write_text(new + "\n")
            (artifacts / "latest.tmp").rename(artifacts / "latest")
            t_swap, peak = time.monotonic(), 0
            while time.monotonic() - t_swap < 120:
                peak = max(peak, rss_bytes(proc.pid)[0])
                served = httpx.get(f"http://127.0.0.1:{port}/v1/model", timeout=2).json()
                if served.get("version") == new:
                    break
                time.sleep(0.02)
            else:
                raise TimeoutError("the new version was not swapped in")
            swap_s = time.monotonic() - t_swap
            rss_after, hwm = rss_bytes(proc.pid)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    per_fill = (rss_filled - rss_ready) / fill if fill else 0.0
    print(json.dumps({
        "bundle": source.name,
        "alive_s": round(alive - t0, 2),
        "ready_s": round(ready - t0, 2),
        "rss_ready_mib": round(rss_ready / MIB, 1),
        "l1_filled_fraction": round(fill, 3),
        "rss_l1_filled_mib": round(rss_filled / MIB, 1),
        "rss_l1_full_estimate_mib": round((rss_ready + per_fill) / MIB, 1),
        "swap_s": round(swap_s, 2),
        "rss_swap_peak_sampled_mib": round(peak / MIB, 1),
        "rss_after_swap_mib": round(rss_after / MIB, 1),
        "hwm_before_swap_mib": round(hwm_before_swap / MIB, 1),
        "hwm_mib": round(hwm / MIB, 1),
    }, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
