"""Dataset directories: logs split by time into train / valid / test, beside the item
table and the schema (numpy + pyarrow only, no torch).

A dataset directory (``write_dataset`` / ``dataset_paths``) holds ``train.parquet``,
``valid.parquet``, ``test.parquet`` (time split), optionally ``items.parquet``, and
``schema.json`` (the FeatureSchema). ``split_log_file`` writes one from a log file too big
for memory.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from contract.features import FeatureSchema
from model.data import ListBatch
from model.log_format import PathLike, read_schema
from model.log_io import write_items, write_logs

SPLITS = ("train", "valid", "test")


def _split_labels(ts: np.ndarray, fractions: Sequence[float]) -> np.ndarray:
    """(B,) int8 split of each request: 0 train, 1 valid, 2 test, by ts rank.

    The first floor(f_train * B) requests in (stable) ts order are train, and so on, so
    every train ts <= every valid ts <= every test ts."""
    fr = np.asarray(fractions, np.float64)
    if fr.shape != (3,) or (fr < 0).any() or not np.isclose(fr.sum(), 1.0):
        raise ValueError(f"fractions must be 3 non-negative numbers summing to 1, got {fractions}")
    B = ts.shape[0]
    order = np.argsort(ts, kind="stable")
    cuts = np.floor(np.cumsum(fr)[:2] * B + 1e-9).astype(np.int64)
    labels = np.empty(B, np.int8)
    labels[order[: cuts[0]]] = 0
    labels[order[cuts[0] : cuts[1]]] = 1
    labels[order[cuts[1] :]] = 2
    return labels


def split_by_time(
    batch: ListBatch, fractions: Sequence[float] = (0.8, 0.1, 0.1)
) -> tuple[ListBatch, ListBatch, ListBatch]:
    """(train, valid, test) by ts order; each part is sorted by ts (stable)."""
    labels = _split_labels(batch.ts, fractions)
    order = np.argsort(batch.ts, kind="stable")
    lab = labels[order]
    train, valid, test = (batch.take(order[lab == s]) for s in range(3))
    return train, valid, test


@dataclass(frozen=True)
class DatasetPaths:
    """The files of a dataset directory."""

    root: Path
    train: Path
    valid: Path
    test: Path
    items: Path
    schema: Path


def dataset_paths(root: PathLike) -> DatasetPaths:
    """Where each file of a dataset directory lives (whether or not it exists yet)."""
    r = Path(root)
    return DatasetPaths(
        root=r,
        train=r / "train.parquet",
        valid=r / "valid.parquet",
        test=r / "test.parquet",
        items=r / "items.parquet",
        schema=r / "schema.json",
    )


def _write_schema_json(paths: DatasetPaths, schema: FeatureSchema) -> None:
    paths.schema.write_text(json.dumps(schema.to_dict(), indent=2, sort_keys=True) + "\n")


def write_dataset(
    out_dir: PathLike,
    batch: ListBatch,
    schema: FeatureSchema,
    items: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    string_ids: bool = False,
) -> DatasetPaths:
    """Split an in-memory batch by time and write a dataset directory.

    items = (item_id, item_cat, item_dense) as for write_items, or None. string_ids=True
    writes every id as a string ("u-<n>", "sku-<n>"; write_logs)."""
    paths = dataset_paths(out_dir)
    paths.root.mkdir(parents=True, exist_ok=True)
    for name, part in zip(SPLITS, split_by_time(batch, fractions), strict=True):
        write_logs(part, getattr(paths, name), schema, string_ids=string_ids)
    if items is not None:
        write_items(paths.items, *items, schema, string_ids=string_ids)
    _write_schema_json(paths, schema)
    return paths


def split_log_file(
    src: PathLike,
    out_dir: PathLike,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    row_group_size: int = 16_384,
) -> dict[str, int]:
    """Streamed write_dataset for a log file too big for memory: the same rows go to each
    split as split_by_time would put there (rows keep file order inside a split).
    Holds only the ts column (8 bytes per request) in memory. -> rows per split."""
    schema = read_schema(src)
    paths = dataset_paths(out_dir)
    paths.root.mkdir(parents=True, exist_ok=True)
    pf = pq.ParquetFile(src)
    ts = pf.read(columns=["ts"]).column("ts").to_numpy()
    labels = _split_labels(ts, fractions)
    arrow = pf.schema_arrow
    writers = [pq.ParquetWriter(getattr(paths, s), arrow) for s in SPLITS]
    try:
        start = 0
        for rb in pf.iter_batches(batch_size=row_group_size):
            lab = labels[start : start + rb.num_rows]
            start += rb.num_rows
            for s, writer in enumerate(writers):
                part = rb.filter(pa.array(lab == s))
                if part.num_rows:
                    writer.write_batch(part, row_group_size=row_group_size)
    finally:
        for writer in writers:
            writer.close()
    _write_schema_json(paths, schema)
    return {s: int((labels == i).sum()) for i, s in enumerate(SPLITS)}
