"""Run fault scenarios against one stack and write the report: `run_suite(...)`. Also a
command: `python -m tests.support.chaos.run [--bundle artifacts] [--only NAME ...]` (what
`make chaos` runs through pytest)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from service.settings import serving_choices
from tests.support.chaos.harness import Bodies, Record, Stack, StackConfig
from tests.support.chaos.report import write
from tests.support.chaos.scenarios import SCENARIOS, Plan

log = logging.getLogger("chaos")
ROOT = Path(__file__).resolve().parents[3]


def run_suite(bundle: Path, out: Path, plan: Plan, names: list[str],
              env: dict[str, str] | None = None) -> tuple[list[Record], Path]:  # fmt: skip
    """The scenarios `names` in order on one stack (Redis, the service, Prometheus);
    returns their records and the report's path."""
    bundle_dir = serving_choices(bundle)[0][0]
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per probe otherwise
    env = {"RERANK_L1_CACHE_BYTES": str(8 << 20), "RERANK_DRAIN_S": "3", **(env or {})}
    records: list[Record] = []
    with tempfile.TemporaryDirectory(prefix="gref-chaos-") as tmp:
        stack = Stack(StackConfig(bundle_dir, Path(tmp), env, prometheus=True))
        try:
            stack.start()
            bodies = Bodies(stack.manifest, budget_ms=plan.budget_ms)
            for name in names:
                title, scenario = SCENARIOS[name]
                rec = Record(name, title)
                log.info("scenario %s: %s", name, title)
                try:
                    with _young_gc_only():
                        asyncio.run(scenario(stack, rec, plan, bodies))
                except Exception as e:  # a scenario that could not finish fails, the rest run
                    log.exception("scenario %s stopped", name)
                    rec.check("the scenario ran to its end", False, f"{type(e).__name__}: {e}")
                records.append(rec)
                stopped = stack.service is None or stack.service.poll() is not None
                if stopped and name != names[-1]:  # after sigterm: a fresh service
                    stack.start_service()
        finally:
            (out / "service.log").parent.mkdir(parents=True, exist_ok=True)
            if (Path(tmp) / "service.log").exists():
                (out / "service.log").write_bytes((Path(tmp) / "service.log").read_bytes())
            stack.stop()
    header = (f"Bundle {bundle_dir.name}; open-loop {plan.rate:.0f} req/s unless said, m = "
              f"{30}, k = {10}, budget {plan.budget_ms:.0f} ms; one worker; "
              f"load average (1 min) at the end: {os.getloadavg()[0]:.2f}; "
              f"git {_git()}; {time.strftime('%Y-%m-%d %H:%M:%S %Z')}.")  # fmt: skip
    return records, write(records, out, header)


@contextlib.contextmanager
def _young_gc_only() -> Iterator[None]:
    """The load generator without full (oldest-generation) collections while a scenario
    runs, one after it: with tens of thousands of answers recorded and hundreds of
    connections open, each full collection stopped this process for 0.1-0.3 s (up to
    1.9 s when the service fell behind and connections piled up; gc.callbacks), and every
    answer due meanwhile was counted that much later, as if the service had been slow.
    Young collections still free the requests' own garbage as it comes."""
    gc.collect()
    threshold = gc.get_threshold()
    gc.set_threshold(threshold[0], threshold[1], 1 << 30)
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        gc.collect()


def _git() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.chaos.run", description=__doc__)
    parser.add_argument("--bundle", type=Path, default=ROOT / "artifacts")
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "loadtest" / "reports" / f"chaos-{time.strftime('%Y%m%d-%H%M%S')}",
    )
    parser.add_argument("--only", nargs="*", choices=sorted(SCENARIOS), default=None)
    parser.add_argument("--overload-s", type=float, default=Plan.overload_s)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    plan = replace(Plan(), overload_s=args.overload_s)
    records, path = run_suite(args.bundle, args.out, plan, args.only or list(SCENARIOS))
    print(path.read_text())
    return 0 if all(r.passed for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
