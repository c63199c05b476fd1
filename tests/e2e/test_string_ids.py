"""String ids end to end: simulated logs and an item table written with string ids
(`u-<n>`, `sku-<n>`) train a tiny model, export (item table included), publish to a real
Redis and serve under a real uvicorn; the served lists, asked with the logs' own string
ids, equal the torch reference decode of the trained checkpoint, and their embeddings come
from the published keys (L2 hits)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from contract.bundle import load_bundle
from contract.config import ModelConfig
from contract.features import FeatureSchema
from contract.ids import id_key
from export.build import build_bundle, load_gen_reranker
from export.config import ExportConfig
from export.publish import publish_bundle
from model.dataset import write_dataset
from model.log_io import read_logs
from model.network import GenReranker
from model.simulated_logs import generate_logs
from model.train import TrainConfig, train
from model.world import WorldConfig
from service.settings import Settings
from tests.support.reference import reference
from tests.support.server import ServerThread, metric_samples, wait_ready

pytestmark = pytest.mark.integration

SCHEMA = FeatureSchema(item_id_buckets=4096, user_id_buckets=1024)
CFG = ModelConfig(schema=SCHEMA, d_model=16, n_attn_heads=2, omtp_heads=2, max_steps=16)


@dataclass
class Trained:
    bundle: Path
    model: GenReranker
    data: Path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    root = tmp_path_factory.mktemp("strids")
    world, logs = generate_logs(WorldConfig(n_items=2000, n_users=300), seed=5, n_requests=800,
                                progress=False)  # fmt: skip
    items = (world.item_id, world.item_cat, world.item_dense)
    paths = write_dataset(root / "data", logs, SCHEMA, items=items, string_ids=True)
    tc = TrainConfig(stage="pretrain", epochs=1, batch_size=128, seed=7, threads=1)
    run = train(CFG, tc, read_logs(paths.train), read_logs(paths.valid), root / "run",
                progress=False)  # fmt: skip
    ec = ExportConfig(label="strids", items_path=str(paths.items))
    bundle = build_bundle(run.best_dir, root / "artifacts", ec)
    model = load_gen_reranker(run.best_dir)[0].eval()
    return Trained(bundle, model, root / "data")


def test_the_logs_and_the_item_table_hold_string_ids(trained: Trained) -> None:
    test = pq.read_table(trained.data / "test.parquet")
    assert test.schema.field("item_ids").type.value_type == pa.string()
    assert test.column("user_id").to_pylist()[0].startswith("u-")
    table = load_bundle(trained.bundle).item_ids
    assert table is not None
    items = pq.read_table(trained.data / "items.parquet").column("item_id").to_pylist()
    assert items[0].startswith("sku-")
    assert table.tolist() == [id_key(i) for i in items]  # the bundle holds their keys


def _bodies(data: Path, n: int) -> list[dict[str, Any]]:
    """The first n requests of the test split as rerank bodies, ids as logged (strings)."""
    rows = pq.read_table(data / "test.parquet").slice(0, n).to_pylist()
    bodies = []
    for row in rows:
        cands = [
            {
                "item_id": item,
                "score": row["upstream_scores"][j],
                "features": {
                    **{c: row[f"cand_{c}"][j] for c in SCHEMA.categorical_names},
                    **{d: row[f"cand_{d}"][j] for d in SCHEMA.item_dense},
                },
            }
            for j, item in enumerate(row["item_ids"])
        ]
        user = {"id": row["user_id"], "features": {u: row[f"user_{u}"] for u in SCHEMA.user_dense}}
        bodies.append({"user": user, "candidates": cands, "k": 10})
    return bodies


@pytest.fixture(scope="module")
def client(trained: Trained, redis_url: str) -> Iterator[httpx.Client]:
    publish_bundle(trained.bundle, redis_url, prefix="strids")
    settings = Settings(
        bundle=trained.bundle,
        redis_url=redis_url,
        redis_prefix="strids",
        max_k=10,
        default_budget_ms=30_000,  # lists, not latency: a busy test machine must not degrade
        decode_policy="fixed",  # every head per pass, as the torch reference decode
    )
    srv = ServerThread(settings).start()
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            wait_ready(c)
            yield c
    finally:
        srv.stop()


def test_served_lists_equal_the_torch_reference_on_string_ids(
    client: httpx.Client, trained: Trained
) -> None:
    torch.set_num_threads(1)
    bodies = _bodies(trained.data, 20)
    for i, body in enumerate(bodies):
        r = client.post("/v1/rerank", json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        assert not out["degraded"], out
        served = [it["item_id"] for it in out["items"]]
        assert all(isinstance(x, str) and x.startswith("sku-") for x in served)
        assert served == reference(trained.model, body, schema=SCHEMA), i
    # the model learned from these ids: its list is not the upstream order on every request
    upstream = [[c["item_id"] for c in b["candidates"][:10]] for b in bodies]
    lists = [[it["item_id"] for it in client.post("/v1/rerank", json=b).json()["items"]]
             for b in bodies]  # fmt: skip
    assert lists != upstream
    assert np.mean([a == b for a, b in zip(lists, upstream, strict=True)]) < 1
    # every candidate's first lookup found the vector publish wrote under its string's key
    lookups = {labels: v for (name, labels), v in metric_samples(client).items()
               if name == "rerank_embedding_lookups_total"}  # fmt: skip
    assert lookups[("result", "hit"), ("tier", "l2")] > 0
    assert lookups.get((("result", "miss"), ("tier", "l2")), 0) == 0, lookups
