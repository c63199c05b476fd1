"""Where the CPU of a rerank answer goes: py-spy on the service under the HTTP benchmark's
load, its samples attributed to request-path stages.

    python tests/bench/profile_http.py [--bundle DIR] [--rate 100] [--seconds 10]

The service (`python -m service`, one worker, default settings unless --set) pinned to one
core and the load generator of tests/bench/bench_http.py to the other, as there. Two
windows: a closed loop at 32 connections (saturation), then an open loop at --rate
requests/s (low load). py-spy (the `dev` extra) samples every thread of the server at
200 Hz; each sample goes to the first stage whose rule matches its stack; samples of a
thread waiting (the event loop in epoll, the engine thread on its queue) are left out,
and the shares of the rest are scaled to the CPU per answer read from /proc over the
same window. A sampling profile: shares within a few percent, and a thread waiting for
the GIL counts as busy (at low load that inflates the event loop's stages).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from loadtest.driver import LoadProcess, Phase  # noqa: E402
from loadtest.redis_server import pin_to  # noqa: E402
from tests.support.load import (  # noqa: E402
    bench_placement,
    build_bodies,
    resolve_bundle,
    start_service,
)

# first match wins: a stage's samples are those whose leaf frame contains one of its
# `leaf` strings or whose stack contains one of its `stack` strings; the engine thread's
# work first, then the event loop's by call site, the rest last
STAGES: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = [
    # (stage, leaf has any of, stack has any of)
    ("waiting", ("runners.py", "EngineThread._serve"), ()),
    ("engine: onnxruntime runs (encode, decode passes)", ("fast_run", "onnxruntime"), ()),
    ("engine: decode loop, selection, prepare (numpy, Python)", (), ("Reranker._run",)),
    ("batching hop (queue, engine thread, wake-up)", (),
     ("Reranker._batches", "EngineThread", "_settle", "queues.py")),
    ("parse + validate (RequestReader.read_json)", (), ("RequestReader.",)),
    ("cache L1 lookup (+ its counters)", (), ("EmbeddingCache.", "L1Cache.")),
    ("metrics (prometheus observe / inc)", ("prometheus_client",), ("_observe",)),
    ("response: build, serialise, Response", (), ("_respond", "json_response")),
    ("body read", (), ("read_body",)),
    ("handler and reranker glue", ("service/app.py",),
     ("rerank (service/app.py", "Reranker.")),
    ("FastAPI / Starlette", ("fastapi/", "starlette/", "contextlib.py"), ()),
    ("uvicorn + asyncio (HTTP parsing, transport, loop)", ("",), ()),
]  # fmt: skip


def _stage(stack: str, leaf: str) -> str:
    return next(name for name, leaves, stacks in STAGES
                if any(x in leaf for x in leaves) or any(x in stack for x in stacks))  # fmt: skip


def attribute(raw: Path) -> Counter[str]:
    """py-spy's raw output (`frame;frame;... count` per line) -> samples per stage."""
    out: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        leaf = stack.rsplit(";", 1)[-1]
        out[_stage(stack, leaf)] += int(count)
    return out


def table(samples: Counter[str], us_per_answer: float) -> str:
    busy = sum(n for stage, n in samples.items() if stage != "waiting") or 1
    lines = ["| stage | share | us / answer |", "|---|---:|---:|"]
    for name, _, _ in STAGES[1:]:
        share = samples[name] / busy
        lines.append(f"| {name} | {share:.0%} | {share * us_per_answer:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, help="bundle or artifacts dir (default: as bench_http)")
    p.add_argument("--rate", type=float, default=100.0, help="low-load window: requests/s")
    p.add_argument("--seconds", type=float, default=10.0, help="each window's length")
    p.add_argument("--set", action="append", default=[], metavar="RERANK_X=V",
                   help="a service setting (repeatable)")  # fmt: skip
    args = p.parse_args(argv)
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    with tempfile.TemporaryDirectory(prefix="gref-profile-") as tmp:
        workdir = Path(tmp)
        path, _ = resolve_bundle(args.bundle, workdir)
        bodies = build_bodies(json.loads((path / "manifest.json").read_text()), 30, 10)
        place = bench_placement(True)
        server_cpus, client_cpus, placement = place.service, place.load, place.text
        env = dict(kv.split("=", 1) for kv in args.set)
        server = start_service(path, workdir, server_cpus, env)
        load = None
        try:
            server.wait_ready()
            load = LoadProcess(bodies, client_cpus)
            print(f"bundle {path.name}; {placement}; service settings: {env or 'defaults'}")
            for mode, rate in (("closed", 0.0), ("open", args.rate)):
                raw = workdir / f"{mode}.txt"
                sampler = subprocess.Popen(
                    [spy, "record", "--pid", str(server.proc.pid), "--format", "raw",
                     "--rate", "200", "--duration", f"{args.seconds:g}", "--nonblocking",
                     "--output", str(raw)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    preexec_fn=pin_to(client_cpus),  # beside the load, off the server's core
                )  # fmt: skip
                # the load's 1 s warm-up, then the window py-spy samples (started with it)
                r = load.run(Phase("service", server.port, server.proc.pid, mode,
                                   args.seconds - 1.0, 1.0, 32, rate=rate))  # fmt: skip
                sampler.wait()
                us = r.server_cpu_s / max(1, len(r.latencies)) * 1e6
                what = "closed loop, 32 connections" if mode == "closed" else f"{rate:g} req/s"
                print(f"\n{what}: {r.answered:.0f} answers/s, {us:.0f} us of server CPU per "
                      f"answer\n")  # fmt: skip
                print(table(attribute(raw), us))
        finally:
            if load is not None:
                load.stop()
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
