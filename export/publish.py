"""`python -m export publish artifacts/<version> --redis-url URL`: the bundle's item table
into Redis, the L2 of the embedding cache (design §7).

    {prefix}:emb:{version}:{key}        raw little-endian float16 (default) or float32 bytes
    {prefix}:emb:{version}:__meta__     JSON {dim, dtype, count, version, created}, written LAST

key: the item id's 64-bit key in decimal, as the bundle's item_ids.npy holds it
(contract/ids.py: an integer id is itself, a string id its hashed, negative key).

Keys carry the bundle version, so two bundles coexist and a reader of version v never sees
another model's vectors. The meta key is written only after every data chunk is
acknowledged, so a reader that finds the meta finds the data. A rerun writes the same
bytes (created is the bundle's creation time): idempotent. If a previous run of the same
version used another dtype, its meta is deleted first, so no reader pairs the old meta
with new bytes. Writes are MSETs of `chunk` keys, several chunks per pipeline round trip;
on a Redis Cluster (--cluster) one MSET per hash slot of each chunk (mset_nonatomic: the
keys of one MSET must share a slot). A table that is not finite in the chosen dtype (a
value beyond float16's 65504 becomes inf) is refused before anything is written.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import redis
from redis.cluster import RedisCluster

from contract.bundle import load_bundle

log = logging.getLogger(__name__)

DTYPES = {"float16": "<f2", "float32": "<f4"}  # explicit little-endian, whatever the host


class PublishError(Exception):
    """The bundle cannot be published (no item table, bad arguments)."""


def emb_key(prefix: str, version: str, item_id: int | str) -> str:
    return f"{prefix}:emb:{version}:{item_id}"


def meta_key(prefix: str, version: str) -> str:
    return emb_key(prefix, version, "__meta__")


@dataclass(frozen=True)
class PublishReport:
    version: str
    prefix: str
    dtype: str
    count: int
    dim: int
    seconds: float

    @property
    def items_per_s(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"items_per_s": round(self.items_per_s)}


def publish_arrays(
    client: redis.Redis | RedisCluster,
    version: str,
    ids: np.ndarray,
    embeddings: np.ndarray,
    *,
    prefix: str = "gref",
    dtype: str = "float16",
    created: str = "",
    chunk: int = 10_000,
    chunks_per_round_trip: int = 8,
) -> PublishReport:
    """ids (N,) int64, embeddings (N, d) -> Redis. Meta last."""
    if dtype not in DTYPES:
        raise PublishError(f"dtype={dtype!r}: {sorted(DTYPES)}")
    if embeddings.ndim != 2 or ids.shape != (embeddings.shape[0],):
        raise PublishError(f"ids {ids.shape} / embeddings {embeddings.shape} do not match")
    if chunk < 1 or chunks_per_round_trip < 1:
        raise PublishError("chunk and chunks_per_round_trip must be >= 1")
    t0 = time.perf_counter()
    n, d = embeddings.shape
    with np.errstate(over="ignore"):  # an overflow is refused just below, by row
        values = np.ascontiguousarray(embeddings.astype(DTYPES[dtype]))
    bad = ~np.isfinite(values).all(axis=1)  # (N,) before anything is written
    if bad.any():
        if not np.isfinite(embeddings[bad]).all():
            how = "NaN or inf in the table"
        else:
            how = f"a value beyond ±{float(np.finfo(values.dtype).max):g} overflows {dtype}"
            how += "; --dtype float32 keeps them" if dtype == "float16" else ""
        raise PublishError(
            f"{int(bad.sum())} of {n} rows are not finite as {dtype} ({how}), e.g. item ids "
            f"{ids[bad][:5].tolist()}: nothing published"
        )
    meta = {"dim": d, "dtype": dtype, "count": n, "version": version, "created": created}
    mkey = meta_key(prefix, version)
    old = client.get(mkey)
    if old is not None and json.loads(old) != meta:
        client.delete(mkey)  # a different earlier run: hide it until the new data is in
    chunks = _chunks(emb_key(prefix, version, ""), ids, values, chunk)
    if isinstance(client, RedisCluster):
        for mapping in chunks:  # its keys span hash slots: one MSET per slot, pipelined
            client.mset_nonatomic(mapping)
    else:
        pipe = client.pipeline(transaction=False)
        queued = 0
        for mapping in chunks:
            pipe.mset(mapping)
            queued += 1
            if queued == chunks_per_round_trip:
                pipe.execute()
                queued = 0
        if queued:
            pipe.execute()
    client.set(mkey, json.dumps(meta, sort_keys=True))
    report = PublishReport(version, prefix, dtype, n, d, time.perf_counter() - t0)
    log.info("published %d embeddings of %s: %.0f items/s", n, version, report.items_per_s)
    return report


def _chunks(
    base: str, ids: np.ndarray, values: np.ndarray, chunk: int
) -> Iterator[dict[str, bytes]]:
    """{key: raw row bytes} of `chunk` items at a time; values (N, d) C-contiguous."""
    row = values.strides[0]  # bytes per embedding
    raw = values.tobytes()
    n = len(ids)
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        keys = [f"{base}{i}" for i in ids[s:e].tolist()]
        rows = (raw[o : o + row] for o in range(s * row, e * row, row))
        yield dict(zip(keys, rows, strict=True))


def read_meta(
    client: redis.Redis | RedisCluster, version: str, prefix: str = "gref"
) -> dict[str, Any] | None:
    raw = client.get(meta_key(prefix, version))
    return None if raw is None else dict(json.loads(raw))


def publish_bundle(
    bundle_dir: str | Path,
    redis_url: str,
    *,
    prefix: str = "gref",
    dtype: str = "float16",
    chunk: int = 10_000,
    cluster: bool = False,
) -> PublishReport:
    """Verify the bundle (every sha256, its parity, its item table) and publish its item
    table. cluster: redis_url names a node of a Redis Cluster."""
    bundle = load_bundle(bundle_dir)
    if bundle.item_ids is None or bundle.item_embeddings is None:
        reason = (bundle.manifest.get("item_table") or {}).get("skipped", "no item table")
        raise PublishError(f"{bundle.path}: nothing to publish ({reason})")
    client: redis.Redis | RedisCluster = (
        RedisCluster.from_url(redis_url) if cluster else redis.Redis.from_url(redis_url)
    )
    try:
        return publish_arrays(
            client,
            bundle.version,
            bundle.item_ids,
            bundle.item_embeddings,
            prefix=prefix,
            dtype=dtype,
            created=str(bundle.manifest.get("created", "")),
            chunk=chunk,
        )
    finally:
        client.close()
