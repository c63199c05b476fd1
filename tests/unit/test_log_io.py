"""Reading and writing log files (model/log_io.py) in the log format
(model/log_format.py): round trips, streaming, validation naming the file, column and
request, and the item table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from contract.features import FeatureSchema
from contract.ids import id_key
from model.data import ListBatch
from model.log_format import LogSchemaError, log_arrow_schema, read_schema
from model.log_io import iter_logs, read_items, read_logs, write_items, write_logs
from tests.support.batches import SCHEMA, assert_batches_equal, random_batch

# --- round trip -------------------------------------------------------------------------


def test_round_trip_variable_m_and_k(tmp_path: Path) -> None:
    batch = random_batch()
    path = tmp_path / "logs.parquet"
    write_logs(batch, path, SCHEMA)
    assert_batches_equal(read_logs(path, SCHEMA), batch)
    assert_batches_equal(read_logs(path), batch)  # schema from the file's metadata
    assert read_schema(path) == SCHEMA
    meta = pq.read_schema(path).metadata
    assert meta[b"gref.log_version"] == b"1"
    assert FeatureSchema.from_dict(json.loads(meta[b"gref.schema"])) == SCHEMA
    assert pq.read_schema(path).remove_metadata() == log_arrow_schema(SCHEMA).remove_metadata()


def test_string_ids_round_trip_as_their_keys(tmp_path: Path) -> None:
    batch = random_batch()
    path = tmp_path / "logs.parquet"
    write_logs(batch, path, SCHEMA, string_ids=True)
    table = pq.read_table(path)
    assert table.schema.field("item_ids").type == pa.list_(pa.string())
    assert table.column("user_id").to_pylist()[0] == f"u-{batch.user_id[0]}"
    assert table.column("item_ids").to_pylist()[0][0] == f"sku-{batch.item_id[0, 0]}"
    cand = batch.cand_mask
    item_keys = np.where(cand, 0, -1)
    item_keys[cand] = [id_key(f"sku-{i}") for i in batch.item_id[cand]]
    user_keys = np.array([id_key(f"u-{i}") for i in batch.user_id])
    assert (item_keys[cand] < -1).all()  # hashed strings: negative keys, never padding
    assert_batches_equal(read_logs(path), batch.with_(item_id=item_keys, user_id=user_keys))
    items = tmp_path / "items.parquet"
    ids = np.array([5, 123, 7])
    write_items(items, ids, np.zeros((3, 2), np.int64), np.zeros((3, 2)), SCHEMA, string_ids=True)
    assert read_items(items, SCHEMA)[0].tolist() == [id_key(f"sku-{i}") for i in ids]


def test_integer_ids_written_as_strings_are_the_same_ids(tmp_path: Path) -> None:
    """A log whose ids are the integers' canonical strings reads as the integer log."""
    batch = random_batch()
    path = tmp_path / "logs.parquet"
    write_logs(batch, path, SCHEMA)
    table = pq.read_table(path)
    for name in ("user_id", "item_ids"):
        i = table.schema.get_field_index(name)
        table = table.set_column(i, name, table.column(name).cast(
            pa.list_(pa.string()) if name == "item_ids" else pa.string()))  # fmt: skip
    pq.write_table(table, path)
    assert_batches_equal(read_logs(path), batch)


def test_stored_lists_are_unpadded(tmp_path: Path) -> None:
    batch = random_batch()
    path = tmp_path / "logs.parquet"
    write_logs(batch, path, SCHEMA)
    table = pq.read_table(path)
    assert table.column("item_ids").to_pylist()[2] == batch.item_id[2, batch.cand_mask[2]].tolist()
    assert table.column("exposed").type == pa.list_(pa.int32())
    assert table.column("exposed").to_pylist()[1] == []  # the K = 0 row
    k = (batch.exposed >= 0).sum(1)
    assert [len(c) for c in table.column("click").to_pylist()] == k.tolist()


def test_streaming_yields_several_batches_each_padded_to_its_own_max(tmp_path: Path) -> None:
    batch = random_batch(B=13)
    path = tmp_path / "logs.parquet"
    write_logs(batch, path, SCHEMA, row_group_size=4)
    assert pq.ParquetFile(path).metadata.num_row_groups == 4
    parts = list(iter_logs(path, batch_size=3))
    assert [len(p) for p in parts] == [3, 3, 3, 3, 1]
    for p in parts:
        assert p.m == int(p.cand_mask.sum(1).max())
        assert p.k == int((p.exposed >= 0).sum(1).max())
    assert_batches_equal(ListBatch.concat(parts), batch)


def test_several_files_and_empty_file(tmp_path: Path) -> None:
    a, b = random_batch(B=5, seed=1), random_batch(B=6, M=3, seed=2)
    write_logs(a, tmp_path / "a.parquet", SCHEMA)
    write_logs(b, tmp_path / "b.parquet", SCHEMA)
    both = read_logs([tmp_path / "a.parquet", tmp_path / "b.parquet"])
    assert_batches_equal(both, ListBatch.concat([a, b]))
    write_logs(a.take(slice(0, 0)), tmp_path / "empty.parquet", SCHEMA)
    empty = read_logs(tmp_path / "empty.parquet")
    assert len(empty) == 0 and empty.item_cat.shape == (0, 0, 2)


def test_write_rejects_a_broken_batch(tmp_path: Path) -> None:
    batch = random_batch()
    exposed = batch.exposed.copy()
    exposed[0, 0] = batch.m  # past the last candidate
    with pytest.raises(ValueError, match="out of range"):
        write_logs(batch.with_(exposed=exposed), tmp_path / "x.parquet", SCHEMA)
    mask = batch.cand_mask.copy()
    mask[0, 0] = False  # a hole before real candidates
    with pytest.raises(ValueError, match="tail"):
        write_logs(batch.with_(cand_mask=mask), tmp_path / "x.parquet", SCHEMA)


# --- validation --------------------------------------------------------------------------


def _rewrite(path: Path, column: str, row: int | None, value: object) -> None:
    """Replace one row of a column (or, with row=None, the whole column's type)."""
    table = pq.read_table(path)
    i = table.schema.get_field_index(column)
    if row is None:
        new = table.column(column).cast(value)
    else:
        values = table.column(column).to_pylist()
        values[row] = value
        new = pa.array(values, table.schema.field(column).type)
    pq.write_table(table.set_column(i, column, new), path)


BAD_ROW = 3


@pytest.mark.parametrize(
    ("column", "edit", "problem"),
    [
        ("cand_creator", "drop", "missing"),
        ("user_id", pa.float64(), "wrong type"),
        ("item_ids", pa.list_(pa.float64()), "wrong type"),
        ("item_ids", "negative", "negative item id"),
        ("item_ids", "string_with_space", "'sku 1': a string id is"),
        ("exposed", pa.list_(pa.float64()), "wrong type"),
        ("cand_quality", "short", "differs from item_ids"),
        ("cand_category", "short", "differs from item_ids"),
        ("upstream_scores", "short", "differs from item_ids"),
        ("exposed", "out_of_range", "out of range"),
        ("exposed", "negative", "negative"),
        ("exposed", "repeated", "repeated"),
        ("click", "long", "differs from exposed"),
        ("long_view", "short", "differs from exposed"),
        ("upstream_scores", "nan", "NaN"),
    ],
)
def test_schema_errors_name_file_column_and_problem(
    tmp_path: Path, column: str, edit: object, problem: str
) -> None:
    batch = random_batch()
    path = tmp_path / "bad.parquet"
    write_logs(batch, path, SCHEMA)
    m = int(batch.cand_mask[BAD_ROW].sum())
    row = pq.read_table(path).column(column).to_pylist()[BAD_ROW]
    if edit == "drop":
        pq.write_table(pq.read_table(path).drop_columns([column]), path)
    elif isinstance(edit, pa.DataType):
        _rewrite(path, column, None, edit)
    elif edit == "short":
        _rewrite(path, column, BAD_ROW, row[:-1])
    elif edit == "long":
        _rewrite(path, column, BAD_ROW, [*row, 0.0])
    elif edit == "out_of_range":
        _rewrite(path, column, BAD_ROW, [m])
    elif edit == "negative":
        _rewrite(path, column, BAD_ROW, [-1] if column == "exposed" else [*row[:-1], -1])
    elif edit == "string_with_space":
        table = pq.read_table(path)
        values = [[f"sku-{i}" for i in r] for r in table.column(column).to_pylist()]
        values[BAD_ROW][-1] = "sku 1"
        i = table.schema.get_field_index(column)
        pq.write_table(table.set_column(i, column, pa.array(values)), path)
    elif edit == "repeated":
        _rewrite(path, column, BAD_ROW, [0, 0])
    elif edit == "nan":
        _rewrite(path, column, BAD_ROW, [float("nan"), *row[1:]])
    with pytest.raises(LogSchemaError) as err:
        read_logs(path, SCHEMA)
    msg = str(err.value)
    assert str(path) in msg and repr(column) in msg and problem in msg, msg
    if edit not in ("drop",) and not isinstance(edit, pa.DataType):
        assert f"request_id={int(batch.request_id[BAD_ROW])}" in msg


def test_missing_metadata_needs_a_schema(tmp_path: Path) -> None:
    path = tmp_path / "plain.parquet"
    write_logs(random_batch(), path, SCHEMA)
    pq.write_table(pq.read_table(path).replace_schema_metadata(None), path)
    with pytest.raises(LogSchemaError, match=r"gref\.schema"):
        read_logs(path)
    assert len(read_logs(path, SCHEMA)) == 13


# --- item table ----------------------------------------------------------------------


def test_read_items_checks_columns(tmp_path: Path) -> None:
    path = tmp_path / "items.parquet"
    write_items(path, np.arange(3), np.zeros((3, 2), np.int64), np.zeros((3, 2)), SCHEMA)
    pq.write_table(pq.read_table(path).drop_columns(["duration"]), path)
    with pytest.raises(LogSchemaError, match="'duration'"):
        read_items(path, SCHEMA)
