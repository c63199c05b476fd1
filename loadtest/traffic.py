"""Production-like rerank traffic and the check of every answer: the pure part of the load
test (no locust here, so the tests import it without gevent's monkey-patching).

The catalogue is fixed and synthetic: item ids 0..N-1, where id = popularity rank and
popularity is Zipf-like (p(rank r) ~ 1 / (r + 1)^s), so the embedding cache sees the hit
rates a real catalogue gives. The default bundle's item table (the simulated world's items,
ids 0..19999) is therefore the head of the catalogue: what `export publish` put in Redis.
A small share of candidates are never-seen ids (new items): L3 work for every cache.

Each request: m candidates (a mix of sizes) drawn by popularity without repeats, in
upstream order with descending scores; k from a mix; the server's default budget or an
explicit budget_ms; user and item features named by the served bundle's feature schema
(the manifest of GET /v1/model). Every item keeps the same features in every request.
About 1% are deliberately bad (a duplicate id, k > m, a NaN score): the service must
answer 422, and they are reported under their own names.

Bodies are assembled from pre-rendered JSON fragments and numpy pools: the load generator
shares the machine's cores with the service.

One seed, one traffic: a single locust process sends the same requests every run (bar the
never-seen ids, which carry the run's start time). Distributed locust workers each draw
their own stream of the seed (TrafficConfig.stream: the worker index), so they do not send
the same requests in step, which would inflate the cache hits.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

RERANK = "/v1/rerank"  # the name of every valid request in locust's statistics
REASONS = ("budget", "overload", "cache", "model")
INVALID_KINDS = ("duplicate_id", "k_too_large", "nan_score")
# never-seen ids start far above any catalogue id; the run's start time keeps two runs
# against one long-lived service (whose caches remember) from reusing each other's ids, and
# each stream has a range of its own (_STREAM_SPAN apart) so that workers started within
# the same moment do not either; all below 2**63 (the service's int64)
_NEW_ID_BASE = 1 << 52
_STREAM_SPAN = 1 << 47  # > the time offset (< 2**46) plus any run's count of new ids
_STREAMS = 1 << 10  # ranges, reused beyond (a pid as stream: the time offset separates)


@dataclass(frozen=True)
class TrafficConfig:
    """The shape of the traffic (defaults: a plausible production mix)."""

    catalogue: int = 200_000  # item ids 0..catalogue-1, id = popularity rank
    zipf: float = 1.0  # popularity exponent s
    new_item_share: float = 0.005  # candidates that are never-seen items
    invalid_share: float = 0.01  # requests that must be refused (422)
    m_mix: tuple[tuple[int, float], ...] = ((30, 0.6), (100, 0.3), (200, 0.1))
    k_mix: tuple[tuple[int, float], ...] = ((10, 0.7), (4, 0.3))
    # None = the server's default budget (RERANK_DEFAULT_BUDGET_MS)
    budget_mix: tuple[tuple[float | None, float], ...] = (
        (None, 0.7), (10.0, 0.1), (20.0, 0.1), (100.0, 0.1),
    )  # fmt: skip
    seed: int = 0
    # None: the seed's own stream (one process); n: child n of the seed (locust worker n),
    # independent of the others
    stream: int | None = None


@dataclass(frozen=True)
class FeatureSpec:
    """What a request must carry for the served bundle (from its manifest)."""

    version: str
    categorical: tuple[tuple[str, int], ...]  # (name, hash buckets)
    item_dense: tuple[str, ...]
    user_dense: tuple[str, ...]
    max_candidates: int

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> FeatureSpec:
        cfg = manifest["model_config"]
        schema = cfg["schema"]
        return cls(
            version=str(manifest["version"]),
            categorical=tuple((str(n), int(b)) for n, b in schema["item_categorical"]),
            item_dense=tuple(str(n) for n in schema["item_dense"]),
            user_dense=tuple(str(n) for n in schema["user_dense"]),
            max_candidates=int(cfg["max_candidates"]),
        )


@dataclass(frozen=True)
class RerankCall:
    """One request to send and what its answer must be."""

    name: str  # RERANK, or "invalid:<kind>"
    body: bytes
    request_id: str
    item_ids: tuple[int, ...]  # the candidates in upstream order
    k: int  # items the answer must hold (valid requests: k <= m)
    expect: int  # HTTP status: 200 or 422
    budget_ms: float | None = None  # the body's budget_ms (None: the server's default)


@dataclass(frozen=True)
class Check:
    """The verdict on one answer: error (a failure) or None; degraded: its reason;
    timings: the answer's own stage times (its body's `timings`), when it has them."""

    error: str | None = None
    degraded: str | None = None
    timings: dict[str, Any] | None = None


def _mix(rng: np.random.Generator, mix: tuple[tuple[Any, float], ...], n: int) -> list[Any]:
    values = [v for v, _ in mix]
    p = np.array([w for _, w in mix], float)
    return [values[i] for i in rng.choice(len(values), n, p=p / p.sum())]


class Traffic:
    """Endless rerank requests for one bundle's feature schema. `next()` is cheap: pools of
    pre-drawn numbers, JSON fragments rendered once per item."""

    POOL = 1 << 16  # pre-drawn choices (mix draws, budgets, ...), reused cyclically
    RANKS = 1 << 20  # pre-drawn popularity ranks

    def __init__(self, spec: FeatureSpec, config: TrafficConfig | None = None) -> None:
        config = config or TrafficConfig()
        self.spec, self.config = spec, config
        key = () if config.stream is None else (config.stream,)
        rng = self.rng = np.random.default_rng(np.random.SeedSequence(config.seed, spawn_key=key))
        n = config.catalogue
        weights = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** config.zipf
        cdf = np.cumsum(weights)
        self.ranks = np.searchsorted(cdf / cdf[-1], rng.random(self.RANKS)).astype(np.int64)
        self._at = 0
        # fixed features of every catalogue item: raw categorical ids (the service hashes
        # them into the schema's buckets) and dense values
        highs = [4 * buckets for _, buckets in spec.categorical]
        self.item_cat = np.stack([rng.integers(0, h, n) for h in highs], 1) if highs else (
            np.zeros((n, 0), np.int64))  # fmt: skip
        self.item_dense = rng.standard_normal((n, len(spec.item_dense))).astype(np.float32)
        self._fragments: dict[int, str] = {}
        # per request choices
        sizes = [(m if m <= spec.max_candidates else spec.max_candidates, w)
                 for m, w in config.m_mix]  # fmt: skip
        self.m_pool = np.array(_mix(rng, tuple(sizes), self.POOL), np.int64)
        self.k_pool = np.array(_mix(rng, config.k_mix, self.POOL), np.int64)
        self.budget_pool = _mix(rng, config.budget_mix, self.POOL)
        self.invalid_pool = rng.random(self.POOL) < config.invalid_share
        self.kind_pool = rng.integers(0, len(INVALID_KINDS), self.POOL)
        self.new_pool = rng.random(self.POOL * 4) < config.new_item_share
        # 64 upstream score lists, descending, rendered once: a request uses a prefix
        most = max(m for m, _ in sizes)
        self.score_lists = [[f"{s:.4f}" for s in np.sort(rng.standard_normal(most))[::-1]]
                            for _ in range(64)]  # fmt: skip
        users = rng.integers(0, 1 << 40, 4096)
        user_dense = rng.standard_normal((4096, len(spec.user_dense)))
        self.users = [json.dumps({"id": int(u), "features": dict(zip(spec.user_dense,
                      map(float, f.round(4)), strict=True))}, separators=(",", ":"))
                      for u, f in zip(users, user_dense, strict=True)]  # fmt: skip
        stream_base = _NEW_ID_BASE + (config.stream or 0) % _STREAMS * _STREAM_SPAN
        self._new_next = stream_base + (time.time_ns() // 1000 % (1 << 40)) * 64
        self.count = 0

    # ------------------------------------------------------------ items

    def _features(self, cat: np.ndarray, dense: np.ndarray) -> str:
        parts = [f'"{name}":{int(v)}' for (name, _), v in zip(self.spec.categorical, cat,
                                                                 strict=True)]  # fmt: skip
        parts += [f'"{name}":{float(v):.4f}' for name, v in zip(self.spec.item_dense, dense,
                                                                 strict=True)]  # fmt: skip
        return "{" + ",".join(parts) + "}"

    def fragment(self, item_id: int) -> str:
        """'{"item_id":ID,"features":{...},"score":' (the score and '}' follow)."""
        frag = self._fragments.get(item_id)
        if frag is not None:
            return frag
        if item_id >= self.config.catalogue:  # a new item, seen once: features of its own
            highs = [4 * b for _, b in self.spec.categorical]
            cat = np.array([self.rng.integers(0, h) for h in highs], np.int64)
            feats = self._features(cat, self.rng.standard_normal(len(self.spec.item_dense)))
            return f'{{"item_id":{item_id},"features":{feats},"score":'
        feats = self._features(self.item_cat[item_id], self.item_dense[item_id])
        frag = self._fragments[item_id] = f'{{"item_id":{item_id},"features":{feats},"score":'
        return frag

    def draw_items(self, m: int) -> list[int]:
        """m distinct ids: catalogue items by popularity, a few never-seen ones."""
        out: dict[int, None] = {}
        while len(out) < m:
            want = 2 * (m - len(out)) + 8
            if self._at + want > self.RANKS:
                self._at = 0
            chunk = self.ranks[self._at : self._at + want].tolist()
            self._at += want
            out.update(dict.fromkeys(chunk))
        ids = list(out)[:m]
        start = (self.count * 7) % (len(self.new_pool) - m)
        for i in np.flatnonzero(self.new_pool[start : start + m]).tolist():
            ids[i] = self._new_next
            self._new_next += 1
        return ids

    # ------------------------------------------------------------ requests

    def next(self) -> RerankCall:
        """The next request (valid, or now and then one that must be refused)."""
        at = self.count % self.POOL
        self.count += 1
        m, k = int(self.m_pool[at]), int(self.k_pool[at])
        k = min(k, m)
        budget = self.budget_pool[at]
        ids = self.draw_items(m)
        scores = self.score_lists[at % len(self.score_lists)]
        name, expect = RERANK, 200
        if self.invalid_pool[at]:
            kind = INVALID_KINDS[int(self.kind_pool[at])]
            name, expect = f"invalid:{kind}", 422
            if kind == "duplicate_id" and m > 1:
                ids[1] = ids[0]
            elif kind != "nan_score":  # k_too_large (and a duplicate in a list of one)
                k = m + 1
            else:
                scores = ["NaN", *scores[1:]]  # JSON's NaN: refused, never a score
        request_id = f"lt-{self.count}"
        # scores: a prefix of a longer list (zip stops at the m ids)
        candidates = ",".join(f"{self.fragment(i)}{s}}}" for i, s in zip(ids, scores,
                                                                         strict=False))  # fmt: skip
        user = self.users[at % len(self.users)]
        extra = f',"budget_ms":{budget}' if budget is not None else ""
        body = (f'{{"request_id":"{request_id}","user":{user},"candidates":[{candidates}],'
                f'"k":{k}{extra}}}')  # fmt: skip
        return RerankCall(name, body.encode(), request_id, tuple(ids), k, expect, budget)


# ---------------------------------------------------------------- the answers


def check_response(call: RerankCall, status: int, body: bytes) -> Check:
    """Is this the answer `call` must get? A 200 must hold k distinct ids of the request
    (the upstream top k when degraded without a decoder pass); a bad request must get a
    422 with the error body."""
    if call.expect == 422:
        if status != 422:
            return Check(f"{call.name}: HTTP {status}, want 422")
        try:
            error = json.loads(body)["error"]
        except (ValueError, KeyError, TypeError):
            return Check(f"{call.name}: 422 without an error body: {body[:200]!r}")
        if error.get("type") != "invalid_request":
            return Check(f"{call.name}: error type {error.get('type')!r}")
        return Check()
    if status != 200:
        return Check(f"HTTP {status}: {body[:200]!r}")
    try:
        out = json.loads(body)
        got = [item["item_id"] for item in out["items"]]
        degraded, reason, passes = out["degraded"], out["reason"], out["passes"]
    except (ValueError, KeyError, TypeError) as e:
        return Check(f"malformed 200 body ({type(e).__name__}: {e}): {body[:200]!r}")
    timings = out.get("timings")
    return Check(_list_error(call, got, out, degraded, reason, passes),
                 reason if degraded else None,
                 timings if isinstance(timings, dict) else None)  # fmt: skip


def _list_error(call: RerankCall, got: list[Any], out: dict[str, Any], degraded: Any,
                reason: Any, passes: Any) -> str | None:  # fmt: skip
    if len(got) != call.k:
        return f"{len(got)} items, want k={call.k}"
    if len(set(got)) != len(got):
        return f"duplicate item ids in the answer: {got}"
    foreign = set(got) - set(call.item_ids)
    if foreign:
        return f"item ids not in the request: {sorted(foreign)[:5]}"
    if out.get("request_id") != call.request_id:
        return f"request_id {out.get('request_id')!r}, want {call.request_id!r}"
    if degraded is True:
        if reason not in REASONS:
            return f"degraded with reason {reason!r}"
        if passes == 0 and tuple(got) != call.item_ids[: call.k]:
            return "degraded to upstream order (0 passes) but not the upstream top k"
    elif degraded is False:
        if reason is not None or not isinstance(passes, int) or passes < 1:
            return f"not degraded but reason={reason!r}, passes={passes!r}"
    else:
        return f"degraded={degraded!r}"
    return None
