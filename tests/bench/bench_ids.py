"""The cost of string ids on the HTTP path, in one run.

    python tests/bench/bench_ids.py [--bundle DIR] [--ref-root DIR] [--duration S]
    pytest -m bench -s tests/bench/test_bench_ids.py     (a short run, checks correctness)

Targets, each its own uvicorn process on loopback, ONE worker (bench_http.py's servers and
load process: servers pinned to one core, the load generator to another):
  service / int     python -m service, the bodies of bench_http.py (m = 30, k = 10, 64
                    distinct bodies, their items in L1 after the warm-up), integer ids
  service / string  the same process, the same bodies with every id a string: item n as
                    "sku-<n>", user n as "u-<n>" (each key hashed once, then memoised)
  ref / int         with --ref-root: `python -m service` of another checkout (the same
                    bundle, settings and interpreter; its code only), integer ids: the
                    reference the integer path is held to

Closed loop, C keep-alive connections, the targets alternating in rounds so drifting
machine load hits all alike. Prints answers/s, client-side p50 / p99, the server's CPU per
answer, and the ratios: string / int on the service, service / ref on integer ids.

Then the request reader alone, in this process (the only code on the request path that
ids change): `RequestReader.read_json` of the same bodies, this checkout's on integer and
on string ids and, with --ref-root, the other checkout's service/api.py on integer ids,
in alternating blocks; the median block's microseconds per body. On a shared machine this
is the sharper figure: HTTP rounds carry the noise of everything else running.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from loadtest.driver import LoadProcess, Phase, PhaseResult, merge_results  # noqa: E402
from loadtest.servers import Server  # noqa: E402
from tests.support.load import (  # noqa: E402
    bench_placement,
    build_bodies,
    ratio,
    resolve_bundle,
    server_env,
    start_service,
    string_bodies,
    us_per_answer,
)


def start_ref(ref_root: Path, bundle: Path, logdir: Path, cpus: set[int] | None) -> Server:
    """`python -m service` of the checkout at ref_root: its directory first on sys.path."""
    root = repr(str(ref_root))
    boot = (f"import os, runpy, sys; os.chdir({root}); sys.path[:0] = [{root}]; "
            "runpy.run_module('service', run_name='__main__')")  # fmt: skip
    argv = [sys.executable, "-c", boot, "--bundle", str(bundle), "--workers", "1"]
    env = {**server_env(), "PYTHONPATH": str(ref_root)}
    return Server("ref", argv, env, logdir, cpus)


def _api_of(root: Path) -> ModuleType:
    """service/api.py of the checkout at `root`, as a module of its own (its imports of
    contract/ resolve to this checkout's: read_json uses only the feature schema's names)."""
    spec = importlib.util.spec_from_file_location(f"api_{abs(hash(root))}", root / "service/api.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def reader_costs(manifest: dict[str, Any], bodies: dict[str, list[bytes]],
                 ref_root: Path | None, blocks: int = 21, reps: int = 5,
                 ) -> dict[str, float]:  # fmt: skip
    """Microseconds per read_json (median of alternating blocks) by row: "service/int",
    "service/string", and with ref_root "ref/int"."""
    from contract.config import ModelConfig

    schema = ModelConfig.from_dict(manifest["model_config"]).schema
    readers = {}
    for name, root in [("service", ROOT)] + ([("ref", ref_root)] if ref_root else []):
        api = _api_of(root)
        limits = api.Limits(max_candidates=int(manifest["model_config"]["max_candidates"]),
                            max_k=10)  # fmt: skip
        readers[name] = api.RequestReader(schema, limits)
    rows = [("service", "int"), ("service", "string")] + ([("ref", "int")] if ref_root else [])
    times: dict[str, list[float]] = {f"{t}/{i}": [] for t, i in rows}
    for _ in range(blocks):
        for target, ids in rows:
            read, batch = readers[target].read_json, bodies[ids]
            t0 = time.perf_counter()
            for _ in range(reps):
                for body in batch:
                    read(body)
            times[f"{target}/{ids}"].append((time.perf_counter() - t0) / (reps * len(batch)))
    return {row: statistics.median(t) * 1e6 for row, t in times.items()}


def run(bundle: Path | None = None, ref_root: Path | None = None, duration_s: float = 12.0,
        warmup_s: float = 2.0, concurrency: int = 32, rounds: int = 4, pin: bool = True,
        ) -> tuple[str, dict[str, PhaseResult]]:  # fmt: skip
    """The rounds against every target; (the printed table, the merged results by row)."""
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gref-ids-")))
        path, how = resolve_bundle(bundle, workdir)
        manifest = json.loads((path / "manifest.json").read_text())
        ints = [json.dumps(json.loads(b), separators=(",", ":")).encode()
                for b in build_bodies(manifest, 30, 10)]  # fmt: skip
        strings = string_bodies(ints)
        place = bench_placement(pin)
        server_cpus, client_cpus, placement = place.service, place.load, place.text
        servers = {"service": start_service(path, workdir, server_cpus)}
        stack.callback(lambda: [s.stop() for s in servers.values()])
        if ref_root is not None:
            servers["ref"] = start_ref(ref_root, path, workdir, server_cpus)
        for s in servers.values():
            s.wait_ready()
        loads = {"int": LoadProcess(ints, client_cpus), "string": LoadProcess(strings, client_cpus)}
        for load in loads.values():
            stack.callback(load.stop)
        rows = [("service", "int"), ("service", "string")]
        rows += [("ref", "int")] if ref_root is not None else []
        parts: dict[tuple[str, str], list[PhaseResult]] = {row: [] for row in rows}
        for r in range(rounds):
            for target, ids in rows:
                s = servers[target]
                s.check_alive()
                warm = warmup_s if r == 0 else min(warmup_s, 0.5)
                ph = Phase(target, s.port, s.proc.pid, "closed", duration_s / rounds, warm,
                           concurrency)  # fmt: skip
                parts[target, ids].append(loads[ids].run(ph))
        merged = {f"{t}/{i}": merge_results(p) for (t, i), p in parts.items()}
        size = {k: sum(map(len, b)) / len(b) / 1024 for k, b in (("int", ints), ("string",
                strings))}  # fmt: skip
        setup = (f"bundle {manifest['version']} ({how}); m = 30, k = 10, 64 bodies of "
                 f"~{size['int']:.1f} KiB (int) / ~{size['string']:.1f} KiB (string); "
                 f"{placement}; ref: {ref_root or 'none'}")  # fmt: skip
        for s in servers.values():
            s.stop()  # the reader's timing below has the core to itself
        costs = reader_costs(manifest, {"int": ints, "string": strings}, ref_root)
        return table(merged, setup, duration_s, rounds, concurrency, costs), merged
    raise AssertionError("unreachable")  # ExitStack does not swallow exceptions


def table(rows: dict[str, PhaseResult], setup: str, duration_s: float, rounds: int,
          concurrency: int, costs: dict[str, float]) -> str:  # fmt: skip
    lines = [
        "String ids on the HTTP path",
        f"  {setup}",
        f"  closed loop, {concurrency} connections, {duration_s:g} s per row in {rounds} "
        "alternating rounds; times in ms (client side); us/answer: server CPU per answer",
        "",
        "| row            | answers/s |    p50 |    p99 | degraded | errors | us/answer |",
        "|:---------------|----------:|-------:|-------:|---------:|-------:|----------:|",
    ]
    for name, r in rows.items():
        lines.append(f"| {name:<14} | {r.throughput:9.0f} | {r.pct_ms(50):6.2f} | "
                     f"{r.pct_ms(99):6.2f} | {r.degraded:8d} | {r.errors:6d} | "
                     f"{us_per_answer(r.server_cpu_s, r):9.0f} |")  # fmt: skip

    def ratios(a: PhaseResult, b: PhaseResult) -> str:
        cpu = ratio(us_per_answer(a.server_cpu_s, a), us_per_answer(b.server_cpu_s, b))
        return f"throughput {ratio(a.throughput, b.throughput):.3f}, CPU per answer {cpu:.3f}"

    si, ss = rows["service/int"], rows["service/string"]
    lines += ["", f"string / int on the service: {ratios(ss, si)}"]
    if "ref/int" in rows:
        lines.append(f"service / ref on integer ids: {ratios(si, rows['ref/int'])}")
    lines += ["", "the request reader alone (read_json, in one process, alternating blocks): "
              + ", ".join(f"{row} {us:.1f} us" for row, us in costs.items())]  # fmt: skip
    ci = costs["service/int"]
    lines.append(f"string / int: {costs['service/string'] / ci:.3f}" + (
        f"; service / ref on integer ids: {ci / costs['ref/int']:.3f}" if "ref/int" in costs
        else ""))  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, help="bundle or artifacts dir (as bench_http.py)")
    p.add_argument("--ref-root", type=Path,
                   help="another checkout whose service is the integer-id reference")  # fmt: skip
    p.add_argument("--duration", type=float, default=12.0, help="seconds per row")
    p.add_argument("--rounds", type=int, default=4, help="alternating rounds")
    p.add_argument("--concurrency", type=int, default=32, help="closed-loop connections")
    p.add_argument("--no-pin", action="store_true", help="do not pin servers and client")
    args = p.parse_args(argv)
    text, _ = run(args.bundle, args.ref_root, args.duration, concurrency=args.concurrency,
                  rounds=args.rounds, pin=not args.no_pin)  # fmt: skip
    print(text)
    return 0


if __name__ == "__main__":
    # by its package name, as bench_http: the spawned load process imports that module
    from tests.bench.bench_ids import main as _main

    sys.exit(_main())
