"""The Parquet log contract (model/log_format.py), streamed reading, writing and validation
(model/log_io.py), the time split (model/dataset.py) and the Avito converter
(model/avito.py, on a tiny fixture in Avito's exact TSV layout)."""

from __future__ import annotations

import json
from dataclasses import fields
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from contract.features import FeatureSchema
from model.avito import AVITO_SCHEMA, convert_avito
from model.data import ListBatch
from model.dataset import dataset_paths, split_by_time, split_log_file, write_dataset
from model.log_format import LogSchemaError, log_arrow_schema, read_schema
from model.log_io import iter_logs, read_items, read_logs, write_items, write_logs

SCHEMA = FeatureSchema(
    item_categorical=(("category", 64), ("creator", 128)),
    item_dense=("quality", "duration"),
    user_dense=("pref_0", "patience"),
)


def random_batch(B: int = 13, M: int = 7, seed: int = 0) -> ListBatch:
    """A padded batch with m varying per row (one row full, so M is the true max) and K
    varying per row (including K = 0), padding at the tail as data.py prescribes."""
    rng = np.random.default_rng(seed)
    m = rng.integers(1, M + 1, B)
    m[0] = M
    k = np.minimum(rng.integers(0, M + 1, B), m)
    k[1] = 0
    K = int(k.max())
    cand = np.arange(M)[None, :] < m[:, None]  # (B, M)
    shown = np.arange(K)[None, :] < k[:, None]  # (B, K)
    exposed = np.full((B, K), -1, np.int64)
    for b in range(B):  # a random permutation prefix per row (test data only)
        exposed[b, : k[b]] = rng.permutation(m[b])[: k[b]]
    fc, fd = len(SCHEMA.categorical_names), len(SCHEMA.item_dense)

    def fb() -> np.ndarray:
        return np.where(shown, rng.random((B, K)) < 0.4, 0).astype(np.float32)

    return ListBatch(
        request_id=np.arange(1000, 1000 + B, dtype=np.int64),
        ts=rng.integers(0, 50, B).astype(np.int64),
        user_id=rng.integers(0, 10**12, B).astype(np.int64),
        user_dense=rng.standard_normal((B, len(SCHEMA.user_dense))).astype(np.float32),
        item_id=np.where(cand, rng.integers(0, 10**9, (B, M)), -1).astype(np.int64),
        item_cat=np.where(cand[..., None], rng.integers(0, 500, (B, M, fc)), 0).astype(np.int64),
        item_dense=np.where(cand[..., None], rng.random((B, M, fd)), 0).astype(np.float32),
        upstream_score=np.where(cand, rng.standard_normal((B, M)), 0).astype(np.float32),
        cand_mask=cand,
        exposed=exposed,
        click=fb(),
        like=fb(),
        long_view=fb(),
    )


def trimmed(batch: ListBatch) -> ListBatch:
    """The batch padded to its own largest m and K (as the reader pads)."""
    m = int(batch.cand_mask.sum(1).max(initial=0))
    k = int((batch.exposed >= 0).sum(1).max(initial=0))
    cut = {f: getattr(batch, f)[:, :m] for f in ("item_id", "item_cat", "item_dense")}
    cut |= {f: getattr(batch, f)[:, :m] for f in ("upstream_score", "cand_mask", "propensity")}
    cut |= {f: getattr(batch, f)[:, :k] for f in ("exposed", "click", "like", "long_view")}
    return batch.with_(**cut)


def assert_batches_equal(a: ListBatch, b: ListBatch) -> None:
    for f in fields(ListBatch):
        x, y = getattr(a, f.name), getattr(b, f.name)
        assert x.dtype == y.dtype, f.name
        np.testing.assert_array_equal(x, y, err_msg=f.name)


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
        ("user_id", pa.string(), "wrong type"),
        ("item_ids", pa.list_(pa.string()), "wrong type"),
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
        _rewrite(path, column, BAD_ROW, [-1])
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


# --- time split, dataset directories, items --------------------------------------------


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


def test_read_items_checks_columns(tmp_path: Path) -> None:
    path = tmp_path / "items.parquet"
    write_items(path, np.arange(3), np.zeros((3, 2), np.int64), np.zeros((3, 2)), SCHEMA)
    pq.write_table(pq.read_table(path).drop_columns(["duration"]), path)
    with pytest.raises(LogSchemaError, match="'duration'"):
        read_items(path, SCHEMA)


# --- Avito ---------------------------------------------------------------------------------

STREAM_HEADER = ["ID", "SearchID", "AdID", "Position", "ObjectType", "HistCTR", "IsClick"]
# (SearchID, AdID, Position, ObjectType, HistCTR, IsClick); "" = empty field as in Avito
STREAM_ROWS = [
    (101, 1003, 7, 3, "0.05", "0"),
    (101, 1001, 1, 3, "0.02", "1"),
    (101, 1002, 2, 1, "", ""),
    (101, 1004, 6, 2, "", ""),
    (102, 2001, 1, 3, "0.1", "0"),
    (102, 2002, 2, 3, "0.003", "0"),
    (102, 2006, 6, 1, "", ""),
    (102, 2007, 7, 3, "0.0125", "0"),
    (102, 2008, 8, 3, "0.2", "1"),
    (103, 3001, 1, 1, "", ""),  # regular ads only: no contextual list
    (103, 3002, 2, 2, "", ""),
    (104, 4001, 1, 3, "0.5", "1"),  # no SearchInfo row
    (105, 5001, 1, 3, "0.07", "0"),
]
INFO_HEADER = [
    "SearchID", "SearchDate", "IPID", "UserID", "IsUserLoggedOn", "SearchQuery",
    "SearchLocationID", "SearchCategoryID", "SearchParams",
]  # fmt: skip
INFO_ROWS = [
    (101, "2015-05-10 18:11:01.0", 9, 7, 1, 'шуба "норка', 10, 20, "{83:'Обувь'}"),
    (102, "2015-05-12 09:00:00.0", 9, 8, 0, "", 11, 21, ""),
    (103, "2015-05-11 00:00:00.0", 9, 9, 0, "iphone", 12, 22, ""),
    (105, "2015-04-25 00:00:30.0", 9, "", "", "", 13, "", ""),  # empty user and category
]
ADS_HEADER = ["AdID", "LocationID", "CategoryID", "Params", "Price", "Title", "IsContext"]
ADS_ROWS = [  # 2008 and 5001 are missing: their category/location fall back to the search
    (1001, 501, 601, "{5:'x'}", "1500", 'Шуба "люкс"', 1),
    (1003, "", 603, "", "", "t", 1),
    (2001, 521, 621, "", "99.5", "t", 1),
    (2002, 522, 622, "", "0", "t", 1),
    (2007, 527, 627, "", "10", "t", 1),
    (1002, 502, 602, "", "5", "t", 0),
    (1004, 504, 604, "", "5", "t", 0),
    (2006, 526, 626, "", "5", "t", 0),
]


def _tsv(path: Path, header: list[str], rows: list[tuple]) -> Path:
    lines = ["\t".join(header)] + ["\t".join(str(v) for v in r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def avito(tmp_path: Path) -> dict[str, Path]:
    stream = [(i + 1, *r) for i, r in enumerate(STREAM_ROWS)]
    return {
        "search_stream": _tsv(tmp_path / "trainSearchStream.tsv", STREAM_HEADER, stream),
        "search_info": _tsv(tmp_path / "SearchInfo.tsv", INFO_HEADER, INFO_ROWS),
        "ads_info": _tsv(tmp_path / "AdsInfo.tsv", ADS_HEADER, ADS_ROWS),
    }


def _read_dataset(out: Path) -> ListBatch:
    p = dataset_paths(out)
    batch = read_logs([p.train, p.valid, p.test])
    return batch.take(np.argsort(batch.request_id))


def _unix(s: str) -> int:
    return int(datetime.fromisoformat(s).replace(tzinfo=timezone.utc).timestamp())


def _lists(batch: ListBatch, row: int, name: str) -> list:
    if name in ("item_id", "upstream_score"):
        return getattr(batch, name)[row, batch.cand_mask[row]].tolist()
    return getattr(batch, name)[row, batch.exposed[row] >= 0].tolist()


@pytest.mark.parametrize("chunk_rows", [1, 2, 3, 5, 1_000_000])
def test_avito_contextual_lists(tmp_path: Path, avito: dict[str, Path], chunk_rows: int) -> None:
    # chunk_rows 1..5 cut searches 101 and 102 across chunk boundaries
    out = tmp_path / "out"
    stats = convert_avito(avito["search_stream"], avito["search_info"], out, chunk_rows=chunk_rows)
    b = _read_dataset(out)
    assert read_schema(dataset_paths(out).train) == AVITO_SCHEMA
    assert b.request_id.tolist() == [101, 102, 105]
    assert b.user_id.tolist() == [7, 8, -1]
    assert b.ts.tolist() == [
        _unix("2015-05-10 18:11:01"), _unix("2015-05-12 09:00:00"), _unix("2015-04-25 00:00:30")
    ]  # fmt: skip
    assert b.user_dense[:, 0].tolist() == [1.0, 0.0, 0.0]
    # candidates in Position order (1, 7) and (1, 2, 7, 8); exposure = all, in that order
    assert _lists(b, 0, "item_id") == [1001, 1003]
    assert _lists(b, 1, "item_id") == [2001, 2002, 2007, 2008]
    assert _lists(b, 2, "item_id") == [5001]
    assert _lists(b, 0, "exposed") == [0, 1]
    assert _lists(b, 1, "exposed") == [0, 1, 2, 3]
    assert _lists(b, 0, "click") == [1.0, 0.0]
    assert _lists(b, 1, "click") == [0.0, 0.0, 0.0, 1.0]
    np.testing.assert_array_equal(
        _lists(b, 1, "upstream_score"), np.float32([0.1, 0.003, 0.0125, 0.2]).tolist()
    )
    np.testing.assert_array_equal(b.item_dense[1, :4, 1], np.float32([0.1, 0.003, 0.0125, 0.2]))
    assert b.like.sum() == 0 and b.long_view.sum() == 0
    # without AdsInfo: category/location from the search, log_price 0
    assert b.item_cat[0, :2].tolist() == [[20, 10], [20, 10]]
    assert b.item_cat[2, :1].tolist() == [[-1, 13]]
    assert (b.item_dense[..., 0] == 0).all()
    assert stats["searches"] == 3 and stats["ads"] == 7 and stats["clicks"] == 2
    assert stats["rows_read"] == len(STREAM_ROWS)
    assert stats["dropped"] == {"non_contextual": 5, "no_search_info": 1}
    assert stats["splits"] == {"train": 2, "valid": 0, "test": 1}
    test = read_logs(dataset_paths(out).test)
    assert test.request_id.tolist() == [102]  # the latest search


def test_avito_with_ads_info_and_all_object_types(tmp_path: Path, avito: dict[str, Path]) -> None:
    out = tmp_path / "out"
    stats = convert_avito(
        avito["search_stream"],
        avito["search_info"],
        out,
        ads_info=avito["ads_info"],
        chunk_rows=2,
        contextual_only=False,
    )
    b = _read_dataset(out)
    assert b.request_id.tolist() == [101, 102, 103, 105]
    assert _lists(b, 0, "item_id") == [1001, 1002, 1004, 1003]  # positions 1, 2, 6, 7
    assert _lists(b, 1, "item_id") == [2001, 2002, 2006, 2007, 2008]  # 1, 2, 6, 7, 8
    assert _lists(b, 2, "item_id") == [3001, 3002]
    assert _lists(b, 0, "exposed") == [0, 1, 2, 3]
    assert _lists(b, 0, "click") == [1.0, 0.0, 0.0, 0.0]  # empty IsClick -> 0
    np.testing.assert_array_equal(
        _lists(b, 0, "upstream_score"), np.float32([0.02, 0.0, 0.0, 0.05]).tolist()
    )
    # AdsInfo category/location; 1003 has no LocationID -> the search's; 2008 not in AdsInfo
    assert b.item_cat[0, :4].tolist() == [[601, 501], [602, 502], [604, 504], [603, 10]]
    assert b.item_cat[1, 4].tolist() == [21, 11]
    np.testing.assert_allclose(
        b.item_dense[1, :5, 0], np.log1p([99.5, 0.0, 5.0, 10.0, 0.0]), rtol=1e-6
    )
    assert b.item_dense[0, 1, 0] == pytest.approx(np.log1p(5.0))
    assert b.item_dense[0, 3, 0] == 0.0  # empty Price
    assert stats["ads"] == 13 - 1 and stats["searches"] == 4
    assert stats["dropped"] == {"no_search_info": 1}
    assert stats["ads_without_info"] == 4  # 2008, 3001, 3002, 5001


def test_avito_search_seen_again_after_its_list_is_dropped(tmp_path: Path) -> None:
    rows = [(1, 101, 11, 1, 3, "0.1", "0"), (2, 102, 21, 1, 3, "0.1", "1"),
            (3, 101, 12, 2, 3, "0.1", "1")]  # fmt: skip
    stream = _tsv(tmp_path / "s.tsv", STREAM_HEADER, rows)
    info = _tsv(tmp_path / "i.tsv", INFO_HEADER, INFO_ROWS[:2])
    stats = convert_avito(stream, info, tmp_path / "out", chunk_rows=1)
    b = _read_dataset(tmp_path / "out")
    assert _lists(b, 0, "item_id") == [11]
    assert stats["dropped"] == {"search_not_contiguous": 1}


def test_avito_missing_column(tmp_path: Path, avito: dict[str, Path]) -> None:
    bad = _tsv(tmp_path / "bad.tsv", STREAM_HEADER[:-1], [r[:-1] for r in STREAM_ROWS])
    with pytest.raises(LogSchemaError, match="'IsClick'"):
        convert_avito(bad, avito["search_info"], tmp_path / "out")
