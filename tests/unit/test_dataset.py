"""Dataset directories (model/dataset.py): the time split, in memory and streamed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from contract.features import FeatureSchema
from model.dataset import dataset_paths, split_by_time, split_log_file, write_dataset
from model.log_io import read_items, read_logs, write_logs
from tests.support.batches import SCHEMA, assert_batches_equal, random_batch, trimmed


def test_split_by_time_respects_ts() -> None:
    batch = random_batch(B=50, seed=3)  # ts in [0, 50): ties included
    train, valid, test = split_by_time(batch, (0.8, 0.1, 0.1))
    assert (len(train), len(valid), len(test)) == (40, 5, 5)
    assert train.ts.max() <= valid.ts.min() and valid.ts.max() <= test.ts.min()
    for part in (train, valid, test):
        assert (np.diff(part.ts) >= 0).all()
    ids = np.concatenate([train.request_id, valid.request_id, test.request_id])
    assert sorted(ids.tolist()) == sorted(batch.request_id.tolist())
    with pytest.raises(ValueError, match="fractions"):
        split_by_time(batch, (0.5, 0.1, 0.1))


def test_write_dataset_and_streamed_split_agree(tmp_path: Path) -> None:
    batch = random_batch(B=40, seed=4)
    rng = np.random.default_rng(0)
    items = (
        np.arange(20, dtype=np.int64),
        rng.integers(0, 9, (20, 2)).astype(np.int64),
        rng.random((20, 2)).astype(np.float32),
    )
    paths = write_dataset(tmp_path / "ds", batch, SCHEMA, items=items)
    assert paths == dataset_paths(tmp_path / "ds")
    assert FeatureSchema.from_dict(json.loads(paths.schema.read_text())) == SCHEMA
    for got, want in zip(read_items(paths.items, SCHEMA), items, strict=True):
        np.testing.assert_array_equal(got, want)
        assert got.dtype == want.dtype
    in_memory = [read_logs(getattr(paths, s)) for s in ("train", "valid", "test")]
    for part, want in zip(in_memory, split_by_time(batch), strict=True):
        assert_batches_equal(part, trimmed(want))

    write_logs(batch, tmp_path / "all.parquet", SCHEMA, row_group_size=7)
    counts = split_log_file(tmp_path / "all.parquet", tmp_path / "streamed", row_group_size=7)
    assert counts == {"train": 32, "valid": 4, "test": 4}
    streamed = dataset_paths(tmp_path / "streamed")
    for s, want in zip(("train", "valid", "test"), in_memory, strict=True):
        got = read_logs(getattr(streamed, s))
        assert sorted(got.request_id.tolist()) == sorted(want.request_id.tolist())
