"""The tiny exported bundle the service, engine and export tests share: a random
GenReranker checkpoint of the tiny schema, an item table, and the bundle built from them
(fp32 and fp16 graphs, with the item table); versions of a bundle in an artifacts
directory, as a rollout makes them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from contract.config import ModelConfig
from export.build import build_bundle
from export.config import ExportConfig
from model.checkpoint import save_checkpoint
from model.log_io import write_items
from model.network import GenReranker
from tests.support.tiny import TINY_SCHEMA, tiny_config

SCHEMA = TINY_SCHEMA
# room for m = 200 and k = 50
BUNDLE_CFG = tiny_config(max_candidates=256, max_steps=64)
N_ITEMS = 300  # rows of the item table


def make_checkpoint(directory: Path, seed: int = 0, cfg: ModelConfig = BUNDLE_CFG) -> GenReranker:
    torch.manual_seed(seed)
    model = GenReranker(cfg).eval()
    meta = {"valid": {"ndcg@10": 0.42}, "epoch": 3}
    save_checkpoint(directory, model, cfg, train_config={"stage": "pretrain"}, meta=meta)
    return model


def make_items(path: Path, n: int = N_ITEMS, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    ids = rng.permutation(10_000)[:n].astype(np.int64)
    cat = np.stack([rng.integers(0, 50, n), rng.integers(0, 500, n)], axis=1).astype(np.int64)
    dense = rng.standard_normal((n, 3)).astype(np.float32)
    write_items(path, ids, cat, dense, SCHEMA)
    return ids, cat, dense


def build_tiny_bundle(root: Path) -> tuple[Path, GenReranker]:
    """A tiny random model exported with --items and --fp16 under `root`:
    (bundle dir, torch model)."""
    model = make_checkpoint(root / "ckpt")
    make_items(root / "items.parquet")
    ec = ExportConfig(fp16=True, label="test", items_path=str(root / "items.parquet"))
    return build_bundle(root / "ckpt", root / "artifacts", ec), model


def copy_version(src: Path, artifacts: Path, name: str, **manifest: Any) -> Path:
    """A copy of the bundle `src` as `artifacts/name`; its manifest's version is `name`
    unless `manifest` says otherwise (any top-level manifest field may be given)."""
    dst = artifacts / name
    shutil.copytree(src, dst)
    data = json.loads((dst / "manifest.json").read_text())
    data.update({"version": name, **manifest})
    (dst / "manifest.json").write_text(json.dumps(data))
    return dst


def point_latest(artifacts: Path, name: str) -> None:
    """artifacts/latest names `name`, replaced atomically as `python -m export build` does."""
    tmp = artifacts / "latest.tmp"
    tmp.write_text(f"{name}\n")
    tmp.replace(artifacts / "latest")
