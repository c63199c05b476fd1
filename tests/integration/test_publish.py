"""`python -m export publish`: item embeddings into a real Redis (design §7 key layout)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from contract.bundle import load_bundle
from export.__main__ import main as export_main
from export.build import build_bundle
from export.config import ExportConfig
from export.publish import (
    PublishError,
    emb_key,
    meta_key,
    publish_arrays,
    publish_bundle,
    read_meta,
)
from model.network import GenReranker
from tests.support.bundle import make_checkpoint, make_items

pytestmark = pytest.mark.integration


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    r = redis.Redis.from_url(redis_url)
    yield r
    r.close()


def stored(r: redis.Redis, prefix: str, version: str, ids: np.ndarray, dtype: str) -> np.ndarray:
    raw = r.mget([emb_key(prefix, version, int(i)) for i in ids])
    assert all(v is not None for v in raw)
    return np.stack([np.frombuffer(v, dtype="<f2" if dtype == "float16" else "<f4") for v in raw])


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip_of_the_bytes(
    tiny_bundle: tuple[Path, GenReranker],
    redis_url: str,
    client: redis.Redis,
    dtype: str,
) -> None:
    bundle = load_bundle(tiny_bundle[0])
    assert bundle.item_ids is not None and bundle.item_embeddings is not None
    prefix = f"rt{dtype}"
    report = publish_bundle(tiny_bundle[0], redis_url, prefix=prefix, dtype=dtype)
    assert report.count == len(bundle.item_ids) and report.dim == bundle.model_config.d_model
    got = stored(client, prefix, bundle.version, bundle.item_ids, dtype)
    np.testing.assert_array_equal(got, bundle.item_embeddings.astype(dtype))
    meta = read_meta(client, bundle.version, prefix)
    assert meta == {
        "dim": bundle.model_config.d_model,
        "dtype": dtype,
        "count": len(bundle.item_ids),
        "version": bundle.version,
        "created": bundle.manifest["created"],
    }


def test_two_versions_coexist_and_a_rerun_is_idempotent(
    tmp_path: Path, redis_url: str, client: redis.Redis
) -> None:
    make_items(tmp_path / "items.parquet")
    paths = []
    for seed in (0, 1):
        make_checkpoint(tmp_path / f"ckpt{seed}", seed=seed)
        ec = ExportConfig(label="two", items_path=str(tmp_path / "items.parquet"))
        paths.append(build_bundle(tmp_path / f"ckpt{seed}", tmp_path / "art", ec))
    a, b = (load_bundle(p) for p in paths)
    assert a.version != b.version
    for p in paths:
        publish_bundle(p, redis_url, prefix="co")
    before = {k: client.get(k) for k in client.scan_iter("co:*")}
    assert len(before) == 2 * (len(a.item_ids) + 1)
    for bundle in (a, b):
        got = stored(client, "co", bundle.version, bundle.item_ids, "float16")
        np.testing.assert_array_equal(got, bundle.item_embeddings.astype(np.float16))
    publish_bundle(paths[0], redis_url, prefix="co")  # rerun
    after = {k: client.get(k) for k in client.scan_iter("co:*")}
    assert after == before


def test_meta_is_written_last(client: redis.Redis) -> None:
    calls: list[str] = []

    class Recording:
        """Proxy that records the order of writes (pipelines flush on execute)."""

        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def __getattr__(self, name: str) -> Any:
            attr = getattr(self.inner, name)
            if name in ("set", "mset", "execute", "delete"):

                def wrapped(*args: Any, **kwargs: Any) -> Any:
                    calls.append(f"{name}:{args[0] if name == 'set' else ''}")
                    return attr(*args, **kwargs)

                return wrapped
            if name == "pipeline":
                return lambda **kw: Recording(attr(**kw))
            return attr

    ids = np.arange(2500, dtype=np.int64)
    emb = np.random.default_rng(0).standard_normal((2500, 8)).astype(np.float32)
    publish_arrays(Recording(client), "v1", ids, emb, prefix="order", chunk=1000,
                   chunks_per_round_trip=2)  # fmt: skip
    assert calls[-1] == f"set:{meta_key('order', 'v1')}"
    assert calls.count("execute:") == 2  # 3 chunks, 2 per round trip


def test_a_different_earlier_run_loses_its_meta_first(client: redis.Redis) -> None:
    ids = np.arange(10, dtype=np.int64)
    emb = np.random.default_rng(1).standard_normal((10, 4)).astype(np.float32)
    publish_arrays(client, "v", ids, emb, prefix="redo", dtype="float32")
    assert read_meta(client, "v", "redo")["dtype"] == "float32"
    publish_arrays(client, "v", ids, emb, prefix="redo", dtype="float16")
    assert read_meta(client, "v", "redo")["dtype"] == "float16"
    np.testing.assert_array_equal(stored(client, "redo", "v", ids, "float16"), emb.astype("<f2"))


def test_no_item_table_is_refused(tmp_path: Path, redis_url: str) -> None:
    make_checkpoint(tmp_path / "ckpt")
    path = build_bundle(tmp_path / "ckpt", tmp_path / "art", ExportConfig(label="empty"))
    with pytest.raises(PublishError, match="nothing to publish"):
        publish_bundle(path, redis_url)


def test_cli_publish(
    tiny_bundle: tuple[Path, GenReranker],
    redis_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["publish", str(tiny_bundle[0]), "--redis-url", redis_url, "--prefix", "cli"]
    assert export_main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["count"] > 0 and out["dtype"] == "float16" and out["items_per_s"] > 0


def test_throughput(client: redis.Redis) -> None:
    """Printed, not asserted (wall-clock asserts flip on shared machines)."""
    n, d = 100_000, 32
    ids = np.arange(n, dtype=np.int64) * 7 + 1
    emb = np.random.default_rng(2).standard_normal((n, d)).astype(np.float32)
    t0 = time.perf_counter()
    report = publish_arrays(client, "tput", ids, emb, prefix="tput")
    seconds = time.perf_counter() - t0
    print(f"\npublish: {n} items of d={d} float16 in {seconds:.3f} s = {n / seconds:,.0f} items/s")
    assert report.count == n
    client.delete(*[emb_key("tput", "tput", int(i)) for i in ids[:10]])


def test_publish_to_a_redis_cluster(
    tiny_bundle: tuple[Path, GenReranker],
    cluster_node: str,
) -> None:
    path = tiny_bundle[0]
    bundle = load_bundle(path)
    assert bundle.item_ids is not None and bundle.item_embeddings is not None
    # CROSSSLOT: why --cluster exists
    with pytest.raises(redis.ResponseError, match="don't hash to the same slot"):
        publish_bundle(path, cluster_node, prefix="x", chunk=50)
    report = publish_bundle(path, cluster_node, prefix="cl", chunk=50, cluster=True)
    assert report.count == len(bundle.item_ids)
    cluster = redis.RedisCluster.from_url(cluster_node)
    try:
        raw = cluster.mget_nonatomic([emb_key("cl", bundle.version, int(i))
                                      for i in bundle.item_ids])  # fmt: skip
        got = np.stack([np.frombuffer(v, "<f2") for v in raw])
        np.testing.assert_array_equal(got, bundle.item_embeddings.astype(np.float16))
        meta = read_meta(cluster, bundle.version, "cl")
        assert meta is not None and meta["count"] == len(bundle.item_ids)
    finally:
        cluster.close()
