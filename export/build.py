"""`python -m export build CHECKPOINT --out artifacts/`: checkpoint -> bundle (design §5).

The bundle is written into a temporary sibling directory and renamed into place, and
`artifacts/latest` is replaced atomically after it, so a reader never sees half a bundle.
With --verify, `latest` moves only once parity has passed: a bundle that fails it stays
in its directory for inspection, but `latest` keeps naming the previous version.
version = "<label>-<8 hex of sha256(weights, model config, export settings)>": the same
checkpoint exported the same way gets the same hash. The item table does not enter it:
an embedding is a function of the model alone, so a bundle rebuilt with a refreshed item
table keeps its version and the Redis keys already published for it stay valid.

fp16 (--fp16): a second set of graphs, `*.fp16.onnx`, in the SAME bundle (one version, one
manifest, one item table; the service picks by provider: fp16 on CUDA, fp32 on CPU). The
weights and the tensors that only travel between graphs (z, bos, keys/values) are float16;
what the service feeds and reads (features, static embeddings, head scores) stays float32,
so the engine's numpy side is the same for both. Its parity is reported separately, with
fp16 tolerances (export/verify.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from contract.bundle import (
    GRAPHS,
    ITEM_EMBEDDINGS,
    ITEM_IDS,
    LATEST,
    MANIFEST,
    SCHEMA_VERSION,
    graph_file,
    sha256_file,
)
from contract.config import ModelConfig
from contract.features import hash_items
from contract.ids import ID_KEY_NAME
from export.config import ExportConfig
from export.graphs import describe, export_graph, metadata_props
from export.greedy import greedy_graph, loop_pass_graph
from model.checkpoint import load_checkpoint, tensors_digest
from model.network import GenReranker

log = logging.getLogger(__name__)

NOTES = (
    "decoder.onnx runs ONE decode pass; head_scores are the n OMTP heads' scores over the "
    "candidates at the LAST position only (all that decoding needs). Masking of chosen "
    "items happens in the engine. tokens: candidate indices chosen by the previous pass; "
    "start: absolute step position of tokens[:, 0] (0 = BOS, pass -1 there)."
)


# The layout of the graphs this exporter writes. A bundle's version hashes the weights and
# the export settings, not the graphs' bytes (a re-export must give the same version), so
# an exporter that writes other graphs for the same weights and settings bumps this and
# gets a new version. tests/unit/test_export.py pins the tiny bundle's graph structure to
# it: a graph change without a bump fails there.
GRAPH_REVISION = 2


def content_hash(weights: bytes, cfg: ModelConfig, export: ExportConfig) -> str:
    """weights: tensors_digest of the checkpoint."""
    h = hashlib.sha256(weights)
    settings = {
        "graph_revision": GRAPH_REVISION,
        "model_config": cfg.to_dict(),
        "opset": export.opset,
        "fp16": export.fp16,
        "simplify": export.simplify,
        "first_pass": export.first_pass,
        "fused_ops": export.fused_ops,
        "one_call": export.one_call and export.first_pass,
    }
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()[:8]


def git_commit() -> dict[str, Any] | None:
    """HEAD of the repository this code runs from, and whether the tree is dirty (read-only
    git calls); None outside a git checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        if head.returncode:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def load_gen_reranker(checkpoint: str | Path) -> tuple[GenReranker, ModelConfig, dict[str, Any]]:
    model, cfg, config = load_checkpoint(checkpoint)
    if not isinstance(model, GenReranker):
        raise ValueError(f"{checkpoint}: a {config['kind']!r} checkpoint, not a gen_reranker")
    return model, cfg, config


def embed_item_table(
    item_tower_onnx: Path, cfg: ModelConfig, items_path: str, batch: int
) -> tuple[np.ndarray, np.ndarray]:
    """The item table through the exported fp32 item tower (the very graph the service runs
    for cache misses). -> ids (N,) int64 keys (contract.ids: an integer id is itself, a
    string one its key; read_items refuses negative integers), embeddings (N, d) float32."""
    from model.log_io import read_items  # pyarrow: only needed with --items

    ids, cat, dense = read_items(items_path, cfg.schema)
    unique, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"{items_path}: duplicate item ids, e.g. keys {unique[counts > 1][:5]}")
    hashed = hash_items(cfg.schema, ids, cat, dense)
    session = ort.InferenceSession(str(item_tower_onnx), providers=["CPUExecutionProvider"])
    out = np.empty((len(ids), cfg.d_model), np.float32)
    for s in range(0, len(ids), batch):
        feeds = {
            "item_id": hashed.item_id[s : s + batch],
            "item_cat": hashed.item_cat[s : s + batch],
            "item_dense": hashed.item_dense[s : s + batch],
        }
        out[s : s + batch] = session.run(["static"], feeds)[0]
    return ids.astype(np.int64), out


def _graphs_manifest(
    model: GenReranker, cfg: ModelConfig, ec: ExportConfig, tmp: Path, version: str
) -> dict[str, dict[str, Any]]:
    config_json = json.dumps(cfg.to_dict(), sort_keys=True)
    precisions = ["fp32", "fp16"] if ec.fp16 else ["fp32"]
    graphs: dict[str, dict[str, Any]] = {}
    for precision in precisions:
        graphs[precision] = {}
        for name in GRAPHS:
            path = tmp / graph_file(name, precision)
            meta = metadata_props(config_json, name, precision, version)
            proto = export_graph(
                name, model, precision, path, ec.opset, meta, ec.simplify, ec.first_pass,
                ec.fused_ops,
            )  # fmt: skip
            onnx.checker.check_model(str(path), full_check=ec.check_full)
            graphs[precision][name] = {"file": path.name, **describe(proto)}
            log.info("exported %s (%s): %d bytes", path.name, precision, path.stat().st_size)
    if ec.one_call and ec.first_pass:
        graphs["fp32"]["greedy"] = _export_greedy(model, tmp, config_json, version, ec)
    return graphs


def _export_greedy(
    model: GenReranker, tmp: Path, config_json: str, version: str, ec: ExportConfig
) -> dict[str, Any]:
    """greedy.onnx from the fp32 encoder just written and a loop pass (export/greedy.py)."""
    cfg = model.cfg
    encoder = onnx.load(str(tmp / graph_file("encoder", "fp32")))
    loop_pass = loop_pass_graph(model, ec.opset, ec.fused_ops)
    proto = greedy_graph(encoder, loop_pass, cfg.omtp_heads, cfg.dec_layers)
    onnx.helper.set_model_props(proto, metadata_props(config_json, "greedy", "fp32", version))
    path = tmp / graph_file("greedy", "fp32")
    onnx.save(proto, str(path))
    onnx.checker.check_model(str(path), full_check=ec.check_full)
    log.info("exported %s (fp32): %d bytes", path.name, path.stat().st_size)
    return {"file": path.name, **describe(proto)}


def build_bundle(
    checkpoint: str | Path, out_dir: str | Path, ec: ExportConfig, point_latest: bool = True
) -> Path:
    """Export the checkpoint's Gen-Reranker to out_dir/<version>/; returns that path.
    point_latest=False: out_dir/latest is left as it is (`build --verify` moves it once
    parity has passed)."""
    ckpt = Path(checkpoint)
    model, cfg, ckpt_config = load_gen_reranker(ckpt)
    weights = (ckpt / "model.safetensors").read_bytes()
    digest = tensors_digest(ckpt / "model.safetensors")
    created = datetime.now(timezone.utc)
    label = ec.label or created.strftime("%Y%m%d")
    if not label.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"label {label!r}: letters, digits, '-' and '_' only")
    version = f"{label}-{content_hash(digest, cfg, ec)}"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".tmp-{version}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        graphs = _graphs_manifest(model, cfg, ec, tmp, version)
        item_table = _item_table(tmp, cfg, ec)
        files = {
            p.name: {"sha256": sha256_file(p), "size": p.stat().st_size}
            for p in sorted(tmp.iterdir())
        }
        manifest = _manifest(
            version=version, label=label, created=created, cfg=cfg, ec=ec, ckpt=ckpt,
            ckpt_config=ckpt_config, weights=weights, graphs=graphs, item_table=item_table,
            files=files,
        )  # fmt: skip
        write_manifest(tmp, manifest)
        final = out / version
        if final.exists():
            shutil.rmtree(final)  # same version = same weights and settings: a rebuild
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if point_latest:
        write_latest(out, version)
    log.info("bundle %s written to %s", version, final)
    return final


def _item_table(tmp: Path, cfg: ModelConfig, ec: ExportConfig) -> dict[str, Any]:
    """The item table's embeddings (the bundle's item tower over --items), written into
    `tmp`, and its manifest entry; without --items, an entry that says there is none."""
    if ec.items_path:
        tower = tmp / graph_file("item_tower", "fp32")
        ids, emb = embed_item_table(tower, cfg, ec.items_path, ec.item_batch)
        np.save(tmp / ITEM_EMBEDDINGS, emb, allow_pickle=False)
        np.save(tmp / ITEM_IDS, ids, allow_pickle=False)
        return {
            "embeddings": ITEM_EMBEDDINGS,
            "ids": ITEM_IDS,
            "count": len(ids),
            "dim": cfg.d_model,
            "dtype": "float32",
            "source": str(ec.items_path),
        }
    return {
        "embeddings": None,
        "ids": None,
        "count": 0,
        "skipped": "no --items given: no item table in this bundle",
    }


def _manifest(
    *,
    version: str,
    label: str,
    created: datetime,
    cfg: ModelConfig,
    ec: ExportConfig,
    ckpt: Path,
    ckpt_config: dict[str, Any],
    weights: bytes,
    graphs: dict[str, Any],
    item_table: dict[str, Any],
    files: dict[str, Any],
) -> dict[str, Any]:
    """The bundle's manifest.json (contract/bundle.py reads it), parity not yet recorded."""
    return {
        "schema_version": SCHEMA_VERSION,
        "version": version,
        "label": label,
        "created": created.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "git": git_commit(),
        "model_config": cfg.to_dict(),
        "model": {
            "kind": ckpt_config["kind"],
            "heads": cfg.omtp_heads,
            "enc_layers": cfg.enc_layers,
            "dec_layers": cfg.dec_layers,
            "d_model": cfg.d_model,
            "n_attn_heads": cfg.n_attn_heads,
            "max_candidates": cfg.max_candidates,
            "max_steps": cfg.max_steps,
        },
        "hashing": {
            "name": cfg.schema.hash_name,
            "salt": cfg.schema.hash_salt,
            "id_keys": ID_KEY_NAME,
        },
        "opset": ec.opset,
        "exporter": {
            "name": "torch.onnx.export (TorchScript tracer, dynamo=False)",
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            # fp32 encoder/decoder on onnxruntime's com.microsoft contrib kernels
            "fused_ops": ec.fused_ops,
        },
        "notes": NOTES,
        "graphs": graphs,
        "item_table": item_table,
        "files": files,
        "source": {
            "checkpoint": str(ckpt.resolve()),
            "weights_sha256": hashlib.sha256(weights).hexdigest(),
        },
        "training": {
            "meta": ckpt_config.get("meta", {}),
            "train_config": ckpt_config.get("train_config", {}),
        },
        "parity": None,  # filled by `python -m export verify`
    }


def write_manifest(bundle_dir: Path, manifest: dict[str, Any]) -> None:
    tmp = bundle_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    tmp.replace(bundle_dir / MANIFEST)


def write_latest(out_dir: Path, version: str) -> None:
    tmp = out_dir / (LATEST + ".tmp")
    tmp.write_text(version + "\n")
    tmp.replace(out_dir / LATEST)
