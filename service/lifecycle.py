"""The served bundle's life: opened (every sha256 checked), warmed, swapped, retired.

`lifespan` opens the bundle before the server accepts connections and warms every bucket
after, in the background (/readyz answers 503 until it is done). With an artifacts
directory it watches `latest`: a new version is opened and warmed beside the served one,
then swapped in with one assignment while the old one finishes what it holds and is
closed. Nothing keeps a retired bundle: the runtime's reranker is the one reference to
the served engine, so a swap frees the old one's memory.

A `latest` that is missing, unreadable or names a directory without a bundle is a failed
reload (counted, so GrefBundleReloadFailed fires), not a silent retry; a start with such a
`latest` serves the newest bundle of the artifacts directory that passes verification,
and says so in the log, rather than refusing to start.

On SIGTERM (an orchestrator's stop) the service drains before it stops: uvicorn alone
closes its listener at once, so a load balancer still sending here gets connection errors
until its readiness probe notices. The lifespan puts its own SIGTERM handler in front of
uvicorn's: /readyz fails on both ports (`Runtime.begin_drain`) while requests are still
answered for `drain_s` seconds, then uvicorn's handler runs its graceful shutdown (the
listener closes, in-flight requests finish, the lifespan's shutdown). A second SIGTERM
stops at once; SIGINT (Ctrl-C) is uvicorn's own graceful stop, without a drain. Every
uvicorn worker runs the lifespan, so each drains.

One idea, kept in one module at its size: the served bundle's life, from the first open
to the last close (open, assemble the reranker and its cache, warm, watch and swap,
retire, drain). The routes that read the runtime are in app.py and routing.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import anyio
from fastapi import FastAPI

from contract.bundle import BundleError, read_manifest
from contract.config import ModelConfig
from contract.features import FeatureSchema
from contract.limits import limits_misfit
from service.admin import start_admin
from service.admission import Admission
from service.api import Limits
from service.cache import EmbeddingCache, L1Cache, ReadGate
from service.engine import Engine, EngineConfig, open_engine
from service.metrics import Metrics
from service.policy import DecodeLevel, DecodePolicy, PolicyConfig, fixed, ladder
from service.redis_l2 import CircuitBreaker, RedisConfig, RedisL2
from service.request_reader import RequestReader
from service.rerank import BatchConfig, Reranker
from service.settings import Settings, resolve_bundle_dir, serving_choices
from service.tasks import stop

log = logging.getLogger("service")


@dataclass
class Runtime:
    """Everything a request needs, built once by the lifespan."""

    settings: Settings
    metrics: Metrics
    admission: Admission | None = None  # None: off (RERANK_ADMISSION=false)
    # the served bundle: its engine, cache and decode policy are the reranker's, so a
    # bundle swap is one assignment
    reranker: Reranker | None = None
    ready: bool = False
    draining: bool = False  # shutting down: readiness fails, requests are still served
    warmup_s: float | None = None
    warmup_error: str | None = None
    # swapped-out rerankers finishing their requests before they close: retired off the
    # reload watch, so a slow retire never holds up the next swap
    retiring: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def engine(self) -> Engine | None:
        return self.reranker.engine if self.reranker is not None else None

    @property
    def cache(self) -> EmbeddingCache | None:
        return self.reranker.cache if self.reranker is not None else None

    @property
    def policy(self) -> DecodePolicy | None:
        return self.reranker.policy if self.reranker is not None else None

    def set_ready(self, ready: bool) -> None:
        """Readiness and its gauge (rerank_ready), always together."""
        self.ready = ready
        self.metrics.ready.set(int(ready and not self.draining))

    def begin_drain(self) -> None:
        """Shutdown's first step: /readyz fails on both ports (and rerank_ready reads 0)
        while POST /v1/rerank is still served; safe from a signal handler or any thread."""
        if not self.draining:
            self.draining = True
            self.metrics.ready.set(0)
            log.info("draining: readiness fails, requests are still served")

    def readiness(self) -> dict[str, Any]:
        """/readyz's body, on either port: plain attribute reads (no await, no lock), so the
        admin listener's threads may call it while the event loop runs."""
        reranker = self.reranker  # once: a bundle swap between two reads would mix bundles
        cache = reranker.cache if reranker is not None else None
        return {
            "ready": self.ready and not self.draining,
            "draining": self.draining,
            "model_version": reranker.engine.version if reranker is not None else None,
            "warmup_s": self.warmup_s,
            "warmup_error": self.warmup_error,
            "redis": cache.breaker_state if cache is not None else "unknown",
            "l1_items": len(cache.l1) if cache is not None else 0,
            "redis_published": cache.l2.published if cache is not None and cache.l2 else None,
            "decode_level": reranker.policy.level.name if reranker is not None else None,
        }

    def exposition(self) -> tuple[bytes, str]:
        """/metrics' text and content type, on either port (every worker's in multiprocess
        mode)."""
        return self.metrics.render()


def _open(runtime: Runtime, bundle_dir: Path) -> Engine:
    """A verified bundle -> its engine (sessions built; raises BundleError / EngineError)."""
    s = runtime.settings
    return open_engine(
        str(bundle_dir),
        EngineConfig(
            device=s.device,
            precision=s.precision,
            intra_op_threads=s.intra_op_threads,
            inter_op_threads=s.inter_op_threads,
            default_items_per_pass=s.items_per_pass,
            io_binding=s.io_binding,
        ),
    )


def _open_first(runtime: Runtime) -> Engine:
    """The engine of the bundle to serve at start: the one `latest` names, or, when
    `latest` is missing, unreadable or names no bundle, the newest that opens (every
    sha256 checked, a recorded parity failure refused), said in the log."""
    choices, problem = serving_choices(runtime.settings.bundle)
    if problem is None:
        return _open(runtime, choices[0])
    log.error("%s: trying the other bundles of %s, newest first", problem,
              runtime.settings.bundle)  # fmt: skip
    errors = []
    for path in choices:
        try:
            engine = _open(runtime, path)
        except Exception as e:  # a broken version: the next newest one
            log.warning("bundle %s refused: %s", path, e)
            errors.append(f"{path.name}: {e}")
            continue
        log.warning("serving %s, the newest bundle that passed verification, instead of "
                    "the one `latest` should name (%s)", path, problem)  # fmt: skip
        return engine
    raise BundleError(f"{problem}; no other bundle opens: {'; '.join(errors)}")


def model_labels(engine: Engine) -> tuple[str, str, str]:
    """rerank_model_info's labels of the bundle `engine` serves."""
    manifest = engine.bundle.manifest
    return engine.version, str(manifest.get("label", "")), str(manifest.get("created", ""))


def _assemble(runtime: Runtime, engine: Engine, policy: DecodePolicy) -> Reranker | None:
    """Engine + policy -> its cache and batched reranker, started and served by the runtime
    (one assignment on the event loop: a request sees the old one or the new one);
    returns the one it replaced. rerank_model_info names the new bundle only, also when
    both carry the same labels (then the series simply stays 1)."""
    s = runtime.settings
    cache = _build_cache(runtime, engine)
    limit = s.max_candidates or engine.model_config.max_candidates
    reader = RequestReader(engine.model_config.schema, Limits(max_candidates=limit, max_k=s.max_k))
    reranker = Reranker(
        engine,
        reader,
        cache,
        runtime.metrics,
        BatchConfig(s.max_batch, s.max_queue, s.max_wait_ms / 1000, s.inline_batch, s.engine_nice),
        policy,
    )
    reranker.start()
    old, runtime.reranker = runtime.reranker, reranker
    labels = model_labels(engine)
    if old is not None and model_labels(old.engine) != labels:
        unlabel_model(runtime.metrics, model_labels(old.engine))
    runtime.metrics.model_info.labels(*labels).set(1)
    return old


def unlabel_model(metrics: Metrics, labels: tuple[str, str, str]) -> None:
    """rerank_model_info no longer names the bundle of these labels. set(0) first: in
    multiprocess mode remove() leaves the value in this worker's file, where the old
    version would still read 1."""
    metrics.model_info.labels(*labels).set(0)
    with contextlib.suppress(KeyError):
        metrics.model_info.remove(*labels)


RETIRE_S = 30.0  # the longest a swapped-out reranker waits for its requests to finish


async def _retire(old: Reranker, timeout_s: float = RETIRE_S) -> None:
    """After a swap: let the old reranker finish what it holds, then close it."""
    deadline = time.monotonic() + timeout_s
    while old.active and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    await _close(old)
    del old
    if gc.get_freeze_count():  # the warm-up froze the first bundle's objects: a cycle
        # among them (the retired engine's, perhaps) would never be collected. One full
        # collection per swap, on the loop (finalizers of loop-bound objects run here)
        gc.unfreeze()
        gc.collect()
        gc.freeze()
    await anyio.to_thread.run_sync(trim_heap)  # off the loop: it walks every arena


def _libc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, macOS): nothing to trim
        return None
    return getattr(libc, "malloc_trim", None)


_MALLOC_TRIM = _libc_trim()


def trim_heap() -> bool:
    """Hand the C heap's free pages back to the OS (glibc's malloc_trim); False where
    there is no glibc. A retired engine's memory (onnxruntime's sessions and buffers,
    numpy arrays, the decode state) is freed into malloc's arenas, fragmented among
    what stays, and glibc returns little of it by itself: without this, RSS grew by
    tens of MB with each of the first swaps (291 -> 337 MB over ten with the default
    bundle) before it levelled off."""
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True


def _retire_later(runtime: Runtime, old: Reranker) -> None:
    """Retire `old` in a task of its own, held by the runtime until it is done."""
    task = asyncio.create_task(_retire(old), name=f"retire-{old.engine.version}")
    runtime.retiring.add(task)
    task.add_done_callback(runtime.retiring.discard)
    task.add_done_callback(_log_failure)


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("%s failed", task.get_name(), exc_info=task.exception())


async def _close(reranker: Reranker) -> None:
    """Stop a reranker's batcher and engine thread, then its Redis client."""
    await reranker.close()
    if reranker.cache.l2 is not None:
        await reranker.cache.l2.close()


def _served_version(runtime: Runtime) -> str | None:
    return runtime.engine.version if runtime.engine is not None else None


def _reload_failed(runtime: Runtime, what: object, problem: object) -> None:
    runtime.metrics.reloads.labels("error").inc()
    log.error("bundle reload: %s failed, still serving %s: %s", what,
              _served_version(runtime), problem)  # fmt: skip


async def _reload_loop(runtime: Runtime) -> None:
    """Watch the artifacts dir's `latest`: a new version is opened (every sha256 checked),
    warmed and swapped in while the old one serves; one that fails leaves the old serving
    (logged, counted) and is not retried until `latest` names another version. A `latest`
    that cannot be read or names no bundle is a failed reload too, counted once until it
    changes (`latest` is replaced atomically: there is no half-written one to wait out)."""
    s = runtime.settings
    failed: Path | str | None = None  # the version, or the problem, last counted
    while True:
        await asyncio.sleep(s.reload_interval_s)
        try:
            target = resolve_bundle_dir(s.bundle)
        except (ValueError, OSError, BundleError) as e:
            if str(e) != failed:
                failed = str(e)
                _reload_failed(runtime, "artifacts/latest", e)
            continue
        if target in (_served_path(runtime), failed):
            continue
        try:  # anything that goes wrong keeps the old bundle serving, and the watch going
            await _swap(runtime, target)
        except Exception as e:
            failed = target
            _reload_failed(runtime, target, e)
        else:
            failed = None


def _served_path(runtime: Runtime) -> Path | None:
    return runtime.engine.bundle.path if runtime.engine is not None else None


async def _swap(runtime: Runtime, target: Path) -> None:
    """Open, check and warm the bundle at `target`, swap it in, and start retiring the
    old one (it closes once its requests are done; the watch goes on meanwhile). Its own
    function: no local of the watch outlives a swap and keeps an old engine alive."""
    engine, policy = await _prepare(runtime, target)
    old = _assemble(runtime, engine, policy)
    runtime.metrics.reloads.labels("ok").inc()
    log.info("bundle reload: now serving %s", engine.version)
    if old is not None:
        _retire_later(runtime, old)


async def _prepare(runtime: Runtime, target: Path) -> tuple[Engine, DecodePolicy]:
    """The bundle at `target` opened (every sha256 checked), checked against the served
    limits and warmed, ready to swap in; raises whatever went wrong."""
    s = runtime.settings
    problem = _misfit(runtime, target)
    if problem is not None:  # the API's limits must not shrink under the clients
        raise BundleError(f"refused: {problem}")
    log.info("bundle reload: loading %s", target)
    engine = await anyio.to_thread.run_sync(_open, runtime, target)
    policy = decode_policy(s, engine.heads)  # its own levels: its heads may differ
    if s.warmup:
        await anyio.to_thread.run_sync(_warm, engine, s, policy)
    return engine, policy


def _misfit(runtime: Runtime, target: Path) -> str | None:
    """Why the bundle at `target` cannot serve the limits the API has now (None: it can):
    a reload must not turn requests that are valid now into 422s or engine errors."""
    s, reranker = runtime.settings, runtime.reranker
    try:  # read_manifest checks every field (check_manifest): a malformed one is a BundleError
        cfg = ModelConfig.from_dict(read_manifest(target)["model_config"])
    except BundleError as e:
        return str(e)
    if reranker is not None:  # a feature name known now would become a 422
        known = set(_feature_names(cfg.schema))
        gone = sorted(set(_feature_names(reranker.reader.schema)) - known)
        if gone:
            return f"it does not know the features {gone}, which requests may send now"
    limit = reranker.reader.limits.max_candidates if reranker is not None else None
    return limits_misfit(cfg, limit, s.max_k, s.items_per_pass)


def _feature_names(schema: FeatureSchema) -> tuple[str, ...]:
    """Every feature name a request may send under `schema` (items', then the user's)."""
    return schema.categorical_names + schema.item_dense + schema.user_dense


def decode_policy(s: Settings, heads: int) -> DecodePolicy:
    """The settings' decode policy: fixed at one level, or adaptive over the ladder."""
    budget_s = s.default_budget_ms / 1000
    if s.decode_policy == "fixed":
        return fixed(DecodeLevel(s.items_per_pass or heads), budget_s)
    levels = ladder(s.items_per_pass or heads, s.beam)
    # step faster at once when the queue is half full (past max_queue requests are shed)
    config = PolicyConfig(budget_s=budget_s, queue_limit=max(1, s.max_queue // 2))
    return DecodePolicy(levels, config)


def _build_cache(runtime: Runtime, engine: Engine) -> EmbeddingCache:
    s, metrics = runtime.settings, runtime.metrics
    l1 = L1Cache(s.l1_cache_bytes, engine.d_model)
    l2 = None
    if s.redis_url is None:
        log.info("no RERANK_REDIS_URL: embedding cache is L1 (in-process) + item tower only")
    else:
        gauge = metrics.breaker_open
        gauge.set(0)  # a new breaker starts closed (also after a bundle swap)
        # set by each worker as its own breaker moves: livemax over the workers is right
        breaker = CircuitBreaker(s.breaker_failures, s.breaker_cooldown_s,
                                 on_change=lambda state: gauge.set(state != "closed"))  # fmt: skip
        config = RedisConfig(s.redis_url, s.redis_prefix, s.redis_timeout_ms / 1000,
                             s.writeback_queue, s.redis_cluster, s.writeback_ttl_s)  # fmt: skip
        l2 = RedisL2(config, engine.version, engine.d_model, breaker, metrics)
        l2.start()
    gate = ReadGate() if l2 is not None and s.redis_read == "measured" else None
    return EmbeddingCache(l1, l2, metrics, gate)


def _warm_sizes(s: Settings) -> list[int]:
    """Batch sizes 1, 2, 4, .. max_batch: the shapes batching will produce most."""
    return [1 << i for i in range(s.max_batch.bit_length())]


def _warm(engine: Engine, s: Settings, policy: DecodePolicy) -> float:
    """Every bucket x batch size x decode level the policy may pick (engine thread)."""
    greedy = [lv.items_per_pass for lv in policy.levels if lv.beam == 1]
    beam = max(lv.beam for lv in policy.levels)
    return engine.warmup(_warm_sizes(s), _warm_k(s, engine), greedy, beam)


def _warm_k(s: Settings, engine: Engine) -> int:
    return min(s.max_k, engine.model_config.max_steps)


async def _warm_up(runtime: Runtime) -> None:
    """Warm every bucket of the served bundle, then ready. A warm-up that fails (e.g. the
    device runs out of memory) leaves the worker not ready, said in /readyz, the log and
    rerank_ready = 0 (the GrefNoReadyInstance alert), rather than serving a model that
    cannot run. The engine is read from the runtime, not held: a swap frees it."""
    s, reranker = runtime.settings, runtime.reranker
    if reranker is None:
        return
    version = reranker.engine.version
    try:
        if s.warmup:
            runtime.warmup_s = await anyio.to_thread.run_sync(
                _warm, reranker.engine, s, reranker.policy
            )
    except Exception as e:
        runtime.warmup_error = f"{type(e).__name__}: {e}"
        log.exception("warm-up of model %s failed: not ready", version)
        return
    # what the process holds by now (modules, the app, the bundle) lives as long as it:
    # frozen out of the cyclic GC's full passes, which otherwise scan all of it and stall
    # the event loop for tens of ms every second or two under load (refcounting still
    # frees what a later swap drops)
    gc.collect()
    gc.freeze()
    runtime.set_ready(True)
    log.info("ready: model %s", version)


async def _start(runtime: Runtime) -> None:
    """The first bundle opened and served (its warm-up is the caller's task)."""
    engine = await anyio.to_thread.run_sync(_open_first, runtime)
    _assemble(runtime, engine, decode_policy(runtime.settings, engine.heads))


def _drain_on_sigterm(runtime: Runtime) -> Callable[[], None] | None:
    """Put a drain in front of the SIGTERM handler (uvicorn's) and return what undoes it;
    None when there is nothing to put it in front of (drain_s 0, not the main thread, no
    Python handler: an embedded server stops the way its owner says)."""
    drain_s = runtime.settings.drain_s
    if drain_s <= 0 or threading.current_thread() is not threading.main_thread():
        return None
    stop = signal.getsignal(signal.SIGTERM)
    if not callable(stop):
        return None
    timer: threading.Timer | None = None

    def on_sigterm(sig: int, frame: FrameType | None) -> None:
        nonlocal timer
        if timer is not None:  # a second SIGTERM: stop now
            timer.cancel()
            stop(sig, frame)
            return
        runtime.begin_drain()
        log.info("SIGTERM: draining for %.1f s, then shutting down", drain_s)
        # uvicorn's handler only sets flags its main loop polls: safe from a timer thread
        timer = threading.Timer(drain_s, stop, (sig, frame))
        timer.daemon = True
        timer.start()

    def undo() -> None:
        signal.signal(signal.SIGTERM, stop)

    signal.signal(signal.SIGTERM, on_sigterm)
    return undo


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    runtime: Runtime = app.state.runtime
    s = runtime.settings
    runtime.set_ready(False)
    await _start(runtime)  # no local here holds the engine: a reload frees it
    # once the bundle is loaded, as the main port: Prometheus' `up` keeps its meaning
    app.state.admin = admin = start_admin(runtime)
    if runtime.admission is not None:
        runtime.admission.start()
    undrain = _drain_on_sigterm(runtime)
    tasks = [asyncio.create_task(_warm_up(runtime), name="warm-up")]
    if s.reload_interval_s > 0 and s.bundle != s.bundle_dir:  # an artifacts dir: watch it
        tasks.append(asyncio.create_task(_reload_loop(runtime), name="bundle-reload"))
    try:
        yield
    finally:
        runtime.set_ready(False)
        if runtime.admission is not None:
            runtime.admission.stop()
        if undrain is not None:
            undrain()
        for task in tasks:
            await stop(task)
        if runtime.retiring:  # the server drained their requests: they close at once
            await asyncio.wait(set(runtime.retiring), timeout=5)
            for task in list(runtime.retiring):
                await stop(task)
        if admin is not None:  # shutdown() waits for its poll: off the loop
            await anyio.to_thread.run_sync(admin.close)
        if runtime.reranker is not None:
            await _close(runtime.reranker)
