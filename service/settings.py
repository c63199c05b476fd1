"""The service's one configuration: environment variables `RERANK_*`, validated at start.

Read once, by the app factory (`create_app`) or `python -m service`, never at import time.
Every field carries a description; the README's settings table repeats them
(tests/unit/test_readme_settings.py checks that it does).
Nonsense is refused with a message naming the variable: a bundle path that is neither a
bundle nor an artifacts directory, limits above what the bundle's model can take, a
breaker that never opens, ...
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from contract.bundle import LATEST, MANIFEST, BundleError, latest_version, read_manifest
from contract.config import ModelConfig
from contract.limits import limits_misfit


def resolve_bundle_dir(path: Path) -> Path:
    """A bundle directory as given, or `path/<version>` when path is an artifacts directory
    whose `latest` file names the version."""
    if (path / MANIFEST).is_file():
        return path
    if (path / LATEST).is_file():
        bundle = path / latest_version(path)
        if not (bundle / MANIFEST).is_file():
            raise ValueError(f"{path / LATEST} names {bundle.name!r}, which has no {MANIFEST}")
        return bundle
    raise ValueError(f"{path}: neither a bundle (no {MANIFEST}) nor an artifacts dir (no {LATEST})")


def serving_choices(path: Path) -> tuple[list[Path], str | None]:
    """The bundle directories to try serving, in order, and why `latest` is not what they
    are (None: it is): `resolve_bundle_dir(path)`, or, when `path` is a directory whose
    `latest` is missing, unreadable or names no bundle, every version in it with a
    readable manifest, newest (`created`) first. Raises ValueError when there is none."""
    try:
        return [resolve_bundle_dir(path)], None
    except (ValueError, OSError, BundleError) as e:
        problem = str(e)
    versions = []
    if path.is_dir():
        for child in path.iterdir():
            try:
                created = str(read_manifest(child)["created"])
            except (BundleError, OSError, KeyError):
                continue
            versions.append((created, child.name, child))
    if not versions:
        raise ValueError(f"{problem}; and no bundle in {path} to serve instead")
    return [child for _, _, child in sorted(versions, reverse=True)], problem


class Settings(BaseSettings):
    """Settings of the reranking service. Environment: RERANK_<FIELD NAME IN CAPITALS>."""

    model_config = SettingsConfigDict(
        env_prefix="RERANK_", extra="forbid", validate_default=True, frozen=True
    )

    bundle: Path = Field(
        default=Path("artifacts"),
        description="Model bundle directory, or an artifacts directory whose `latest` file "
        "names the version to serve.",
    )
    reload_interval_s: float = Field(
        default=5.0,
        ge=0,
        description="When bundle is an artifacts dir: seconds between looks at its `latest`. "
        "A new version is verified and warmed beside the old one, then swapped in; one that "
        "fails to load leaves the old one serving. 0 = never reload.",
    )
    redis_url: str | None = Field(
        default=None,
        description="Redis URL of the L2 embedding cache (redis:// or rediss://). Unset: L1 "
        "in-process cache + item tower only.",
    )
    redis_cluster: bool = Field(
        default=False,
        description="redis_url names a node of a Redis Cluster: the keys of a request are "
        "read with one MGET per slot, pipelined (mget_nonatomic).",
    )
    redis_prefix: str = Field(
        default="gref",
        min_length=1,
        description="Key prefix of the embeddings in Redis (as publish).",
    )
    redis_timeout_ms: float = Field(
        default=20.0, gt=0, le=10_000, description="Per-call Redis timeout (connect and read), ms."
    )
    breaker_failures: int = Field(
        default=3, ge=1, description="Consecutive Redis failures that open the circuit breaker."
    )
    breaker_cooldown_s: float = Field(
        default=2.0, gt=0, description="Seconds an open breaker waits before one half-open probe."
    )
    redis_read: Literal["measured", "always"] = Field(
        default="measured",
        description="When a request's L1 misses are read from Redis: measured (when the rows "
        "a read is expected to find would cost the item tower more than the read's measured "
        "round trip; one request in 16 that would skip reads anyway, so both stay "
        "measured) or always.",
    )
    writeback_queue: int = Field(
        default=1024,
        ge=1,
        description="Bound of the queue of computed embeddings waiting to be written to "
        "Redis; beyond it write-backs are dropped (and counted).",
    )
    writeback_ttl_s: int = Field(
        default=86_400,
        ge=0,
        description="Expiry of an embedding the item tower computed and wrote back to Redis, "
        "s (0 = none). A write-back never replaces a key that exists (SET NX): published "
        "embeddings (no expiry) stay as published.",
    )
    default_budget_ms: float = Field(
        default=50.0, gt=0, description="Latency budget of a request that gives no budget_ms, ms."
    )
    max_candidates: int | None = Field(
        default=None,
        ge=1,
        description="Most candidates per request (default and upper bound: the bundle's "
        "max_candidates).",
    )
    max_k: int = Field(
        default=50,
        ge=1,
        description="Largest k a request may ask for (at most the model's max_steps).",
    )
    items_per_pass: int | None = Field(
        default=None,
        ge=1,
        description="Items emitted per decoder pass (1..heads; default: every head).",
    )
    decode_policy: Literal["adaptive", "fixed"] = Field(
        default="fixed",
        description="fixed: always greedy with items_per_pass (default every head, in one "
        "greedy.onnx call: the fastest decode; for the default recipe beam and n = 1 measured "
        "no better in true utility); adaptive: the slower levels at low load (beam when "
        "beam > 1, then n = 1), more items per pass as queueing + decode time nears the "
        "budget, for a model whose slower levels measure better.",
    )
    beam: int = Field(
        default=1,
        ge=1,
        le=8,
        description="Beam width of the adaptive policy's slowest level (1 = no beam: greedy "
        "n = 1 at the top); the fixed policy is always greedy.",
    )
    max_batch: int = Field(
        default=32,
        ge=1,
        le=1024,
        description="Most requests per engine call: requests that queued while the engine "
        "was busy run together (no waiting when it is idle).",
    )
    max_wait_ms: float = Field(
        default=0.0,
        ge=0,
        le=50,
        description="When the engine was busy until less than this ago, wait up to this "
        "long to batch more requests (an idle engine never waits); 0 = never wait.",
    )
    inline_batch: int = Field(
        default=8,
        ge=0,
        le=1024,
        description="A batch of at most this many requests runs on the event loop's thread, "
        "not the engine thread (0 = never): on a worker's one core the hand-over to the "
        "engine thread and back costs more than a small batch's engine call (default 8: with "
        "the one-call n = 4 decode a batch of 8 at m = 30 is a few ms); bigger batches "
        "(load), and any batch while a Redis read is in flight, run in the engine thread "
        "while the loop keeps reading and shedding.",
    )
    engine_nice: int = Field(
        default=0,
        ge=0,
        le=19,
        description="Nice increment of the engine thread (the thread's own, Linux): on a "
        "worker's one core, a positive value lets the event loop preempt a running engine "
        "batch when it wakes (a connection to shed, a result handed back) instead of "
        "waiting out the engine's time slice; 0 = the process's priority.",
    )
    switch_interval_ms: float = Field(
        default=0.0,
        ge=0,
        le=100,
        description="CPython's GIL switch interval while the service runs, ms "
        "(sys.setswitchinterval; restored at shutdown): how long the event loop waits for "
        "the GIL while the engine thread runs Python between onnxruntime calls, and the "
        "other way round; 0 = Python's own (5 ms).",
    )
    max_queue: int = Field(
        default=64,
        ge=0,
        description="Requests allowed to wait for the engine; beyond it a request is answered "
        "at once in upstream order, degraded with reason 'overload'.",
    )
    admission: bool = Field(
        default=True,
        description="Admission at the door: a rerank request the service cannot start "
        "within the default budget (working requests beyond the measured answer rate x "
        "admission_share x the budget, or an event loop lagging more than that) is "
        "answered 503 with Retry-After at once, before its body is read. Off: every "
        "request is read, parsed and queued (max_queue still answers 'overload').",
    )
    admission_share: float = Field(
        default=0.5,
        gt=0,
        lt=1,
        description="Share of the default budget a request may wait in the service before "
        "it starts (the rest is its own lookup and decode): what admission sizes its "
        "limit by.",
    )
    admission_floor: int = Field(
        default=32,
        ge=1,
        description="Working requests always admitted, whatever the measured rate (a "
        "batch's worth: bursts at low load are not shed).",
    )
    retry_after_s: int = Field(
        default=1,
        ge=0,
        description="Retry-After of a request shed at the door (503), s.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="onnxruntime device: auto (CUDA when available), cpu or cuda."
    )
    precision: Literal["auto", "fp32", "fp16"] = Field(
        default="auto", description="Graph precision: auto (fp16 on CUDA when the bundle has it)."
    )
    io_binding: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="Keep encoder outputs and the KV cache on the device between decoder "
        "passes (onnxruntime IO binding): auto (on with CUDA, off on CPU), on or off.",
    )
    intra_op_threads: int = Field(
        default=1, ge=0, description="onnxruntime intra-op threads (0 = onnxruntime's default)."
    )
    inter_op_threads: int = Field(
        default=1, ge=0, description="onnxruntime inter-op threads (0 = onnxruntime's default)."
    )
    l1_cache_bytes: int = Field(
        default=64 << 20,
        ge=0,
        description="Bound of the in-process embedding LRU, bytes (0 = off).",
    )
    max_body_bytes: int = Field(
        default=1 << 20, ge=1024, description="Largest accepted request body, bytes (larger: 413)."
    )
    body_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="Time a request's body may take to arrive once its headers have, s; "
        "later: 408 and the connection closed. The budget starts when the body has arrived.",
    )
    warmup: bool = Field(
        default=True, description="Run every candidate bucket once before /readyz says ready."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Log level; debug logs one JSON line per request."
    )
    otel: bool = Field(
        default=False,
        description="FastAPI's native OpenTelemetry instrumentation (traces, metrics, logs "
        "through the OpenTelemetry SDK the process configures). Off by default: the "
        "Prometheus metrics are the service's telemetry, and FastAPI's per-request check "
        "for a configured provider costs the hot path even when none is.",
    )
    host: str = Field(default="127.0.0.1", description="Bind address of `python -m service`.")
    port: int = Field(default=8000, ge=1, le=65535, description="Port of `python -m service`.")
    admin_port: int = Field(
        default=9000,
        ge=0,
        le=65535,
        description="Port of the admin listener on host: GET /healthz, /readyz and /metrics "
        "answered on threads of their own, off the event loop, so liveness probes and "
        "scrapes are answered under overload. 0 = off. With workers > 1 every worker listens "
        "on it (SO_REUSEPORT).",
    )
    keep_alive_s: int = Field(
        default=75,
        ge=1,
        le=3600,
        description="Seconds an idle keep-alive connection stays open. Longer than the idle "
        "timeout of the load balancer in front (60 s on the common ones), so the service "
        "never closes a connection the balancer is about to reuse (a 502 for its client).",
    )
    drain_s: float = Field(
        default=10.0,
        ge=0,
        le=600,
        description="On SIGTERM: seconds during which /readyz fails while requests are "
        "still served, so load balancers stop sending here (at least their readiness "
        "probe period x failure threshold); then the listener closes and in-flight "
        "requests finish. 0 = stop at once.",
    )
    workers: int = Field(
        default=1,
        ge=1,
        le=64,
        description="uvicorn worker processes (> 1: Prometheus multiprocess).",
    )

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, url: str | None) -> str | None:
        if url is None or url == "":
            return None
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"{url!r}: want redis://, rediss:// or unix://")
        return url

    @field_validator("bundle")
    @classmethod
    def _bundle_exists(cls, path: Path) -> Path:
        serving_choices(path)  # a bundle, or an artifacts dir with one
        return path

    @model_validator(mode="after")
    def _ports_differ(self) -> Settings:
        if self.admin_port == self.port:
            raise ValueError(f"admin_port={self.admin_port} is also port: give the admin "
                             "listener a port of its own, or 0 to turn it off")  # fmt: skip
        return self

    @property
    def bundle_dir(self) -> Path:
        """The bundle directory to serve: `bundle`, or the version its `latest` names now
        (when `latest` names none: the newest version in it, see serving_choices)."""
        return serving_choices(self.bundle)[0][0]

    @model_validator(mode="after")
    def _within_the_model(self) -> Settings:
        """Limits must fit the bundle's model (its manifest is read, nothing else)."""
        try:  # read_manifest checks every field, model_config included (check_manifest)
            cfg = ModelConfig.from_dict(read_manifest(self.bundle_dir)["model_config"])
        except BundleError as e:
            raise ValueError(str(e)) from e
        problem = limits_misfit(cfg, self.max_candidates, self.max_k, self.items_per_pass)
        if problem is not None:
            raise ValueError(problem)
        return self

    @property
    def candidate_limit(self) -> int:
        """max_candidates, or the bundle's."""
        if self.max_candidates is not None:
            return self.max_candidates
        return int(read_manifest(self.bundle_dir)["model_config"]["max_candidates"])
