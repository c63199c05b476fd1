"""What the load benchmarks of tests/bench share beyond the load generator (loadtest/): the
bundle they serve, their request bodies, the service started with bench settings, and
`Bench`, the servers, load process and requests of one run with the CPU the rest of the
machine took meanwhile.

The load generator itself (phases, schedules, the load process, server processes and
placement) lives in the loadtest package, which the load test uses too; this module holds
what only the benchmarks need (a tiny test bundle when there is no artifacts/, the
simulated world's requests, the met / MISSED verdicts of their goals).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
import orjson

from loadtest.driver import LoadProcess, Phase, PhaseResult
from loadtest.schedules import Schedule, Segment, Warm, WarmResult, run_warm
from loadtest.servers import (
    ROOT,
    Placement,
    Server,
    machine_cpu_s,
    placement,
    process_cpu_s,
    python_env,
)
from loadtest.traffic import FeatureSpec, Traffic, TrafficConfig

N_BODIES = 64


class BenchSettings(Protocol):
    """What `Bench` reads of a benchmark's configuration."""

    @property
    def duration_s(self) -> float: ...  # per measured window
    @property
    def warmup_s(self) -> float: ...  # unrecorded before each window
    @property
    def concurrency(self) -> int: ...  # closed-loop connections
    @property
    def connections(self) -> int: ...  # most connections of the open-loop sender
    @property
    def extra_env(self) -> tuple[tuple[str, str], ...]: ...  # RERANK_* on every service


@dataclass(frozen=True)
class LoadSettings:
    """BenchSettings with the load benchmark's defaults."""

    duration_s: float = 8.0
    warmup_s: float = 2.0
    concurrency: int = 32
    connections: int = 512
    extra_env: tuple[tuple[str, str], ...] = ()


C = TypeVar("C", bound=BenchSettings)


def build_bodies(manifest: dict[str, Any], m: int, k: int, n: int = N_BODIES, seed: int = 0
                 ) -> list[bytes]:  # fmt: skip
    """n distinct rerank bodies for the served bundle (its manifest's feature schema), made
    by the load test's traffic generator with one m and one k, every body valid and on the
    server's default budget; item ids drawn uniformly from a catalogue of 64 m ids, so the
    warm-up leaves them all in the cache."""
    config = TrafficConfig(
        catalogue=64 * m, zipf=0.0, new_item_share=0.0, invalid_share=0.0,
        m_mix=((m, 1.0),), k_mix=((k, 1.0),), budget_mix=((None, 1.0),), seed=seed,
    )  # fmt: skip
    traffic = Traffic(FeatureSpec.from_manifest(manifest), config)
    return [traffic.next().body for _ in range(n)]


def string_bodies(bodies: list[bytes]) -> list[bytes]:
    """The same bodies with every id a string: item n -> "sku-<n>", user n -> "u-<n>"."""
    out = []
    for raw in bodies:
        body = orjson.loads(raw)
        body["user"]["id"] = f"u-{body['user']['id']}"
        for c in body["candidates"]:
            c["item_id"] = f"sku-{c['item_id']}"
        out.append(orjson.dumps(body))
    return out


def us_per_answer(cpu_s: float, r: PhaseResult) -> float:
    """CPU microseconds per answer of a phase (cpu_s: a process's CPU over its window)."""
    return cpu_s / max(1, len(r.latencies)) * 1e6


def ratio(a: float, b: float) -> float:
    """a / b; NaN when b is 0."""
    return a / b if b else float("nan")


def resolve_bundle(bundle: Path | None, workdir: Path) -> tuple[Path, str]:
    """(bundle dir, how it was found): --bundle, artifacts/ with a `latest`, or a tiny
    random bundle built as tests/unit/test_export.py's tiny_bundle fixture builds it."""
    from service.settings import resolve_bundle_dir

    if bundle is not None:
        return resolve_bundle_dir(bundle), "--bundle"
    if (ROOT / "artifacts" / "latest").is_file():
        return resolve_bundle_dir(ROOT / "artifacts"), "artifacts/latest"
    import torch

    from export.build import build_bundle
    from export.config import ExportConfig
    from tests.support.bundle import make_checkpoint, make_items

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        make_checkpoint(workdir / "ckpt")
        make_items(workdir / "items.parquet")
        ec = ExportConfig(fp16=True, label="bench", items_path=str(workdir / "items.parquet"))
        path = build_bundle(workdir / "ckpt", workdir / "artifacts", ec)
    finally:
        torch.set_num_threads(threads)
    return path, "tiny random test bundle (no artifacts/latest)"


@dataclass(frozen=True)
class Requests:
    """Requests of the simulated world and their HTTP bodies (row r = body r)."""

    users: np.ndarray  # (n,) world user ids (raw ids = world indices)
    items: np.ndarray  # (n, m) world item ids in upstream order, -1 = padding
    k: int
    bodies: list[bytes]
    source: str


def world_requests(schema: dict[str, Any], n: int, seed: int = 0) -> tuple[Any, Requests]:
    """(the World, n of its requests as bodies for the bundle's FeatureSchema `schema`)."""
    from model.log_format import read_schema
    from model.log_io import read_logs
    from model.simulated_logs import generate_logs
    from model.world import World, WorldConfig

    data = ROOT / "data" / "default"
    if (data / "world.npz").is_file() and (data / "test.parquet").is_file():
        world = World.load(data / "world.npz")
        logs = read_logs(data / "test.parquet")
        log_schema = read_schema(data / "test.parquet")
        rows = np.sort(np.random.default_rng(seed).choice(len(logs), min(n, len(logs)), False))
        logs = logs.take(rows)
        source = (f"{len(logs)} requests sampled from data/default/test.parquet, world.npz "
                  f"(seed {world.seed}, default config: {world.cfg == WorldConfig()})")  # fmt: skip
    else:
        from contract.features import FeatureSchema

        world, logs = generate_logs(WorldConfig(), 0, n, progress=False)
        log_schema = FeatureSchema()
        source = f"{n} fresh requests of generate_logs(WorldConfig(), seed 0) (no data/default)"
    cat_col = {name: i for i, name in enumerate(log_schema.categorical_names)}
    dense_col = {name: i for i, name in enumerate(log_schema.item_dense)}
    user_col = {name: i for i, name in enumerate(log_schema.user_dense)}
    cats = [str(name) for name, _ in schema["item_categorical"]]
    missing = ({*cats} - cat_col.keys()) | (set(schema["item_dense"]) - dense_col.keys())
    missing |= set(schema["user_dense"]) - user_col.keys()
    if missing:
        raise ValueError(f"the bundle's features {sorted(missing)} are not in the world's logs")
    k = logs.k
    bodies = []
    for r in range(len(logs)):
        m = int(logs.cand_mask[r].sum())  # candidates are a prefix (padding at the end)
        cat, dense = logs.item_cat[r], logs.item_dense[r]
        candidates = [
            {
                "item_id": int(logs.item_id[r, j]),
                "score": float(logs.upstream_score[r, j]),
                "features": {
                    **{name: int(cat[j, cat_col[name]]) for name in cats},
                    **{name: float(dense[j, dense_col[name]]) for name in schema["item_dense"]},
                },
            }
            for j in range(m)
        ]
        user = {
            "id": int(logs.user_id[r]),
            "features": {n: float(logs.user_dense[r, user_col[n]]) for n in schema["user_dense"]},
        }
        bodies.append(orjson.dumps({"user": user, "candidates": candidates, "k": k}))
    items = np.where(logs.cand_mask, logs.item_id, -1)
    return world, Requests(logs.user_id.copy(), items, k, bodies, source)


def server_env() -> dict[str, str]:
    """The environment minus RERANK_* (no Redis, default settings) plus quiet logs and no
    admin listener (services run side by side)."""
    env = {k: v for k, v in python_env().items()
           if not k.startswith("RERANK_") and k != "PROMETHEUS_MULTIPROC_DIR"}  # fmt: skip
    return {**env, "RERANK_LOG_LEVEL": "warning", "RERANK_ADMIN_PORT": "0"}


def start_service(bundle: Path, logdir: Path, cpus: set[int] | None,
                  env: dict[str, str] | None = None, name: str = "service",
                  ) -> Server:  # fmt: skip
    """`env`: RERANK_* settings over the defaults; `name`: of the log file, for several."""
    argv = [sys.executable, "-m", "service", "--bundle", str(bundle), "--workers", "1"]
    return Server(name, argv, {**server_env(), **(env or {})}, logdir, cpus)


def bench_placement(pin: bool) -> Placement:
    """The servers on one core, the load generator on one other (when there are two)."""
    return placement(pin, load_cores=1, service="servers", load="load generator")


def shipped(name: str) -> Any:
    """The default of a service setting (RERANK_<NAME>)."""
    from service.settings import Settings

    return Settings.model_fields[name].default


@dataclass(frozen=True)
class Mark:
    """The machine's and this benchmark's CPU at one moment (Bench.others compares two)."""

    wall: float
    busy_s: float
    steal_s: float
    own_s: float


def model_max(top: PhaseResult) -> tuple[float, str]:
    """A closed-loop run's maximum counting the model's answers only (non-degraded 200s:
    a degraded answer is the upstream order, almost no work), and a text with the degraded
    share of that run beside it."""
    answered = len(top.latencies)
    text = (f"{top.throughput:.0f} model answers/s (non-degraded; all 200 answers "
            f"{top.answered:.0f}/s, degraded {top.degraded / max(1, answered):.1%} of them, "
            f"errors {top.errors})")  # fmt: skip
    return top.throughput, text


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


@dataclass
class Bench(Generic[C]):
    """The servers, the load process and the requests of one run."""

    cfg: C
    workdir: Path
    bundle: Path
    requests: Requests
    load: LoadProcess
    server_cpus: set[int] | None
    servers: dict[str, Server] = field(default_factory=dict)
    retired_cpu_s: float = 0.0  # CPU of the servers already stopped
    warmed: dict[str, WarmResult] = field(default_factory=dict)  # each target's warm pass

    def own_cpu_s(self) -> float:
        """CPU used so far by this benchmark's processes: servers, load process, this one."""
        live = sum(process_cpu_s(s.proc.pid) for s in self.servers.values()
                   if s.proc.poll() is None)  # fmt: skip
        return self.retired_cpu_s + live + process_cpu_s(self.load.proc.pid) + time.process_time()

    def mark(self) -> Mark:
        busy, steal = machine_cpu_s()
        return Mark(time.monotonic(), busy, steal, self.own_cpu_s())

    def others(self, since: Mark) -> tuple[float, float]:
        """(cores used by OTHER processes on the machine, steal in cores) since `since`:
        what else competed with the measurement."""
        now_ = self.mark()
        wall = max(1e-9, now_.wall - since.wall)
        other = (now_.busy_s - since.busy_s) - (now_.own_s - since.own_s)
        return max(0.0, other) / wall, (now_.steal_s - since.steal_s) / wall

    def others_text(self, since: Mark) -> str:
        other, steal = self.others(since)
        return (f"other processes on the machine used {other:.2f} cores meanwhile (steal "
                f"{steal:.2f}); load average {os.getloadavg()[0]:.2f}")  # fmt: skip

    @property
    def warm_cap_s(self) -> float:
        return max(60.0, 0.05 * len(self.requests.bodies))

    def start(self, targets: dict[str, dict[str, str]]) -> None:
        """Start the services {name: RERANK_* env} together, wait until each is ready,
        then warm each: every body answered once with the model's list (their items into
        its L1 cache; Warm), at most warm_cap_s."""
        for name, env in targets.items():
            env = {**env, **dict(self.cfg.extra_env)}
            self.servers[name] = start_service(self.bundle, self.workdir, self.server_cpus,
                                               env, name)  # fmt: skip
        for name in targets:
            self.servers[name].wait_ready()
        for name in targets:
            self.alive()
            job = Warm(self.servers[name].port, self.cfg.concurrency, self.warm_cap_s)
            self.warmed[name] = run_warm(self.load, job)

    def warm_text(self, *names: str) -> str:
        """The warm passes of these targets, for a section's setup lines."""
        w = {name: self.warmed[name] for name in names}
        parts = ", ".join(f"{name} {r.seconds:.1f} s, {r.sends} sends" for name, r in w.items())
        head = (f"L1 warm pass before measuring: every one of the {len(self.requests.bodies)} "
                "bodies answered once with the model's list")  # fmt: skip
        cut = {name: r for name, r in w.items() if r.cut}
        if not cut:
            return f"{head}: {parts}"
        short = ", ".join(f"{name} only {r.warmed}" for name, r in cut.items())
        return (f"{head} -- CUT SHORT by its {self.warm_cap_s:.0f} s cap: {short} (item-tower "
                f"work leaks into the measured windows); {parts}")  # fmt: skip

    def warm_figures(self, *names: str) -> dict[str, Any]:
        return {name: {**vars(self.warmed[name]), "cut": self.warmed[name].cut}
                for name in names}  # fmt: skip

    def stop(self, *names: str) -> None:
        for name in names:
            server = self.servers.pop(name)
            if server.proc.poll() is None:
                self.retired_cpu_s += process_cpu_s(server.proc.pid)
            server.stop()

    def alive(self) -> None:
        for s in self.servers.values():
            s.check_alive()

    def phase(self, name: str, mode: str, seconds: float, warm: float, **kw: Any) -> Phase:
        self.alive()
        s = self.servers[name]
        kw.setdefault("scrape", True)
        return Phase(name, s.port, s.proc.pid, mode, seconds, warm, self.cfg.concurrency, **kw)

    def closed_max(self, name: str) -> PhaseResult:
        """Closed loop at the configured concurrency: the target's maximum throughput."""
        return self.load.run(self.phase(name, "closed", self.cfg.duration_s, self.cfg.warmup_s))

    def schedule(self, name: str, segments: tuple[Segment, ...], **kw: Any) -> Schedule:
        self.alive()
        kw.setdefault("connections", self.cfg.connections)
        return Schedule(self.servers[name].port, segments, **kw)


def jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x
