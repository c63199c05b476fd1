"""Logged requests on disk: the Parquet log format, its streamed reader, the time split
and the Avito Context Ad Clicks converter (numpy + pyarrow only, no torch).

The log format (one row per request) is the project's public data contract. For a
FeatureSchema ``schema`` a log file has exactly these columns (extra columns are ignored
by the reader):

| column            | Arrow type    | per row | meaning                                     |
| ----------------- | ------------- | ------- | ------------------------------------------- |
| request_id        | int64         | scalar  | request id                                  |
| ts                | int64         | scalar  | request time (logs are split by it)         |
| user_id           | int64         | scalar  | raw user id (hashed later, features.py)     |
| user_<name>       | float32       | scalar  | one per name in schema.user_dense           |
| item_ids          | list<int64>   | m       | candidates, upstream order (j = position j) |
| upstream_scores   | list<float32> | m       | upstream ranker score; NaN/inf rejected     |
| cand_<name>       | list<int64>   | m       | one per schema.categorical_names            |
| cand_<name>       | list<float32> | m       | one per schema.item_dense                   |
| exposed           | list<int32>   | K <= m  | candidate indices, exposed order, distinct  |
| click             | list<float32> | K       | feedback per exposed slot                   |
| like              | list<float32> | K       | feedback per exposed slot                   |
| long_view         | list<float32> | K       | feedback per exposed slot                   |

Optional column (written when the batch carries it, read when the file has it):

| column             | Arrow type    | per row | meaning                                    |
| ------------------ | ------------- | ------- | ------------------------------------------ |
| logging_propensity | list<float32> | m       | P(the logging policy exposes candidate j)  |

m and K vary per row. No nulls anywhere. File key-value metadata:
``b"gref.schema"`` = JSON of ``schema.to_dict()``, ``b"gref.log_version"`` = ``b"1"``.
The reader accepts any integer width for integer columns, any float width for float
columns and large_list for list (it casts); anything else is a ``LogSchemaError``.

Item table (``items.parquet``): ``item_id`` int64, one int64 column per categorical name,
one float32 column per dense name (bare names, no ``cand_`` prefix); same metadata.

A dataset directory (``write_dataset`` / ``dataset_paths``) holds ``train.parquet``,
``valid.parquet``, ``test.parquet`` (time split), optionally ``items.parquet``, and
``schema.json`` (the FeatureSchema).

In memory a log is a ``ListBatch`` (model/data.py): padded per batch to the batch's
largest m and K (item_id = -1 / cand_mask False, exposed = -1, zeros elsewhere).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from contract.features import FeatureSchema
from model.data import ListBatch

log = logging.getLogger(__name__)

LOG_VERSION = b"1"
SCHEMA_KEY = b"gref.schema"
VERSION_KEY = b"gref.log_version"
FEEDBACK = ("click", "like", "long_view")
PROPENSITY = "logging_propensity"  # the optional column (ListBatch.propensity)

PathLike = str | os.PathLike[str]


class LogSchemaError(ValueError):
    """A log or item file (or an Avito input) does not follow the contract."""


# ---------------------------------------------------------------------------------------
# Arrow schemas


def _log_columns(schema: FeatureSchema) -> list[tuple[str, pa.DataType]]:
    cols: list[tuple[str, pa.DataType]] = [
        ("request_id", pa.int64()),
        ("ts", pa.int64()),
        ("user_id", pa.int64()),
    ]
    cols += [(f"user_{n}", pa.float32()) for n in schema.user_dense]
    cols += [("item_ids", pa.list_(pa.int64())), ("upstream_scores", pa.list_(pa.float32()))]
    cols += [(f"cand_{n}", pa.list_(pa.int64())) for n in schema.categorical_names]
    cols += [(f"cand_{n}", pa.list_(pa.float32())) for n in schema.item_dense]
    cols += [("exposed", pa.list_(pa.int32()))]
    cols += [(n, pa.list_(pa.float32())) for n in FEEDBACK]
    names = [n for n, _ in cols]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"feature names collide in the log columns: {dup}")
    return cols


def _metadata(schema: FeatureSchema) -> dict[bytes, bytes]:
    return {
        SCHEMA_KEY: json.dumps(schema.to_dict(), sort_keys=True).encode(),
        VERSION_KEY: LOG_VERSION,
    }


def log_arrow_schema(schema: FeatureSchema, propensity: bool = False) -> pa.Schema:
    """The Arrow schema of a log file for ``schema`` (with its metadata); propensity=True
    adds the optional logging_propensity column."""
    cols = _log_columns(schema) + ([(PROPENSITY, pa.list_(pa.float32()))] if propensity else [])
    fields = [pa.field(n, t, nullable=False) for n, t in cols]
    return pa.schema(fields, metadata=_metadata(schema))


def item_arrow_schema(schema: FeatureSchema) -> pa.Schema:
    """The Arrow schema of an item table for ``schema`` (with its metadata)."""
    cols = [("item_id", pa.int64())]
    cols += [(n, pa.int64()) for n in schema.categorical_names]
    cols += [(n, pa.float32()) for n in schema.item_dense]
    return pa.schema([pa.field(n, t, nullable=False) for n, t in cols], metadata=_metadata(schema))


def _schema_from_metadata(meta: dict[bytes, bytes] | None, path: PathLike) -> FeatureSchema:
    meta = meta or {}
    if SCHEMA_KEY not in meta:
        raise LogSchemaError(f"{path}: no {SCHEMA_KEY.decode()} metadata; pass schema= explicitly")
    version = meta.get(VERSION_KEY, LOG_VERSION)
    if version != LOG_VERSION:
        raise LogSchemaError(
            f"{path}: {VERSION_KEY.decode()} is {version.decode()!r}, "
            f"this reader understands {LOG_VERSION.decode()!r}"
        )
    try:
        return FeatureSchema.from_dict(json.loads(meta[SCHEMA_KEY]))
    except (ValueError, KeyError, TypeError) as e:
        raise LogSchemaError(f"{path}: unreadable {SCHEMA_KEY.decode()} metadata: {e}") from e


def read_schema(path: PathLike) -> FeatureSchema:
    """The FeatureSchema stored in a log or item file's metadata."""
    return _schema_from_metadata(pq.read_schema(path).metadata, path)


def _type_ok(actual: pa.DataType, expected: pa.DataType) -> bool:
    """Same shape (scalar / list) and same kind (integer / float) of values."""
    if pa.types.is_list(expected):
        if not (pa.types.is_list(actual) or pa.types.is_large_list(actual)):
            return False
        actual, expected = actual.value_type, expected.value_type
    if pa.types.is_integer(expected):
        return pa.types.is_integer(actual)
    return pa.types.is_floating(actual)


def _check_columns(
    file_schema: pa.Schema, expected: list[tuple[str, pa.DataType]], path: PathLike
) -> None:
    present = set(file_schema.names)
    for name, typ in expected:
        if name not in present:
            raise LogSchemaError(f"{path}: column {name!r}: missing")
        actual = file_schema.field(name).type
        if not _type_ok(actual, typ):
            raise LogSchemaError(f"{path}: column {name!r}: wrong type {actual}, expected {typ}")


# ---------------------------------------------------------------------------------------
# Writing


def _list_array(offsets: np.ndarray, values: np.ndarray, typ: pa.DataType) -> pa.Array:
    return pa.ListArray.from_arrays(
        pa.array(offsets, pa.int32()), pa.array(values, typ.value_type), type=typ
    )


def _offsets(lengths: np.ndarray) -> np.ndarray:
    off = np.zeros(lengths.shape[0] + 1, np.int64)
    np.cumsum(lengths, out=off[1:])
    if off[-1] > np.iinfo(np.int32).max:
        raise ValueError("more than 2^31 list values in one row group; lower row_group_size")
    return off


def _exposure_problem(exposed: np.ndarray, m: np.ndarray) -> tuple[str, int] | None:
    """exposed (B, K) with -1 padding, m (B,) candidate counts -> (problem, row) or None."""
    valid = exposed >= 0
    bad = valid & (exposed >= m[:, None])
    if bad.any():
        return "index out of range of the candidates", int(np.flatnonzero(bad.any(1))[0])
    srt = np.sort(exposed, axis=1)  # -1 padding sorts first and is skipped below
    rep = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
    if rep.any():
        return "repeated index", int(np.flatnonzero(rep.any(1))[0])
    return None


def _is_prefix(mask: np.ndarray) -> bool:
    """Every row of a (B, W) mask is True then False (padding only at the tail)."""
    return not bool((mask[:, 1:] & ~mask[:, :-1]).any())


def _check_batch(batch: ListBatch, schema: FeatureSchema) -> None:
    B = len(batch)
    fc, fd, fu = len(schema.categorical_names), len(schema.item_dense), len(schema.user_dense)
    if batch.item_cat.shape[2:] != (fc,) or batch.item_dense.shape[2:] != (fd,):
        raise ValueError(
            f"item features {batch.item_cat.shape}/{batch.item_dense.shape} do not match the "
            f"schema ({fc} categorical, {fd} dense)"
        )
    if batch.user_dense.shape != (B, fu):
        raise ValueError(f"user_dense {batch.user_dense.shape} does not match ({B}, {fu})")
    cand = batch.cand_mask.astype(bool)
    if not _is_prefix(cand) or not _is_prefix(batch.exposed >= 0):
        raise ValueError("padding must be at the tail: cand_mask and exposed >= 0 are prefixes")
    if ((batch.item_id >= 0) != cand).any():
        raise ValueError("item_id must be >= 0 exactly where cand_mask is True")
    problem = _exposure_problem(batch.exposed, cand.sum(1))
    if problem:
        what, row = problem
        raise ValueError(f"exposed: {what} (request_id={int(batch.request_id[row])})")
    if not np.isfinite(batch.upstream_score[cand]).all():
        raise ValueError("upstream_score: NaN or inf on a candidate")


def _log_record_batch(batch: ListBatch, schema: FeatureSchema, arrow: pa.Schema) -> pa.RecordBatch:
    """Unpad a ListBatch into one Arrow record batch: flat values + offsets, no row loop."""
    cand = batch.cand_mask.astype(bool)  # (B, M)
    shown = batch.exposed >= 0  # (B, K)
    c_off = _offsets(cand.sum(1))
    e_off = _offsets(shown.sum(1))
    cols: dict[str, pa.Array] = {
        "request_id": pa.array(batch.request_id, pa.int64()),
        "ts": pa.array(batch.ts, pa.int64()),
        "user_id": pa.array(batch.user_id, pa.int64()),
    }
    for f, name in enumerate(schema.user_dense):
        cols[f"user_{name}"] = pa.array(batch.user_dense[:, f], pa.float32())
    lint, lfloat = pa.list_(pa.int64()), pa.list_(pa.float32())
    cols["item_ids"] = _list_array(c_off, batch.item_id[cand], lint)
    cols["upstream_scores"] = _list_array(c_off, batch.upstream_score[cand], lfloat)
    for f, name in enumerate(schema.categorical_names):
        cols[f"cand_{name}"] = _list_array(c_off, batch.item_cat[..., f][cand], lint)
    for f, name in enumerate(schema.item_dense):
        cols[f"cand_{name}"] = _list_array(c_off, batch.item_dense[..., f][cand], lfloat)
    cols["exposed"] = _list_array(e_off, batch.exposed[shown], pa.list_(pa.int32()))
    for name in FEEDBACK:
        cols[name] = _list_array(e_off, getattr(batch, name)[shown], lfloat)
    if PROPENSITY in arrow.names:
        cols[PROPENSITY] = _list_array(c_off, np.asarray(batch.propensity)[cand], lfloat)
    return pa.RecordBatch.from_arrays([cols[n] for n in arrow.names], schema=arrow)


def write_logs(
    batch: ListBatch, path: PathLike, schema: FeatureSchema, row_group_size: int = 16_384
) -> None:
    """Write a padded ListBatch as a log file (one row per request, padding dropped).

    Padding must sit at the tail of each row (cand_mask / exposed >= 0 are prefixes);
    feedback on padded exposure slots is dropped. The logging_propensity column is written
    when every real candidate carries one (ListBatch.has_propensity). Raises ValueError on a
    batch that breaks the contract (so a bad batch never reaches disk)."""
    _check_batch(batch, schema)
    arrow = log_arrow_schema(schema, propensity=batch.has_propensity)
    with pq.ParquetWriter(path, arrow) as writer:
        for start in range(0, len(batch), row_group_size):
            part = batch.take(slice(start, start + row_group_size))
            writer.write_batch(
                _log_record_batch(part, schema, arrow), row_group_size=row_group_size
            )


# ---------------------------------------------------------------------------------------
# Reading (streamed)


@dataclass(frozen=True)
class _Lists:
    """One list column of a record batch, unpacked: lengths (B,), flat values (N,),
    and where each flat value lands in the padded (B, W) array."""

    lengths: np.ndarray  # (B,) int64
    rows: np.ndarray  # (N,) int64
    cols: np.ndarray  # (N,) int64
    width: int

    @classmethod
    def of(cls, lengths: np.ndarray) -> _Lists:
        B = lengths.shape[0]
        rows = np.repeat(np.arange(B), lengths)
        starts = np.cumsum(lengths) - lengths  # (B,) first flat index of each row
        cols = np.arange(rows.shape[0]) - np.repeat(starts, lengths)
        return cls(lengths, rows, cols, int(lengths.max()) if B else 0)

    def pad(self, flat: np.ndarray, fill: float, dtype: Any) -> np.ndarray:
        out = np.full((self.lengths.shape[0], self.width), fill, dtype)
        out[self.rows, self.cols] = flat
        return out


class _BatchReader:
    """Turns one Arrow record batch of a log file into a validated ListBatch."""

    def __init__(self, rb: pa.RecordBatch, path: PathLike) -> None:
        self.rb, self.path = rb, path
        self.request_id = self.scalar("request_id", np.int64)

    def fail(self, column: str, problem: str, row: int | None = None) -> LogSchemaError:
        where = "" if row is None else f" (request_id={int(self.request_id[row])})"
        return LogSchemaError(f"{self.path}: column {column!r}: {problem}{where}")

    def scalar(self, name: str, dtype: Any) -> np.ndarray:
        arr = self.rb.column(name)
        if arr.null_count:
            raise LogSchemaError(f"{self.path}: column {name!r}: null values")
        return arr.to_numpy(zero_copy_only=False).astype(dtype, copy=False)

    def lists(self, name: str, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
        """-> lengths (B,), flat values (N,) of a list column."""
        arr = self.rb.column(name)
        if arr.null_count:
            raise self.fail(name, "null list", int(np.flatnonzero(arr.is_null())[0]))
        off = arr.offsets.to_numpy().astype(np.int64)  # sliced arrays: offsets into .values
        values = arr.values.slice(int(off[0]), int(off[-1] - off[0]))
        if values.null_count:
            row = np.searchsorted(off, off[0] + np.flatnonzero(values.is_null())[0], "right") - 1
            raise self.fail(name, "null value in a list", int(row))
        flat = values.to_numpy(zero_copy_only=False).astype(dtype, copy=False)
        return np.diff(off), flat

    def same_length(self, name: str, lengths: np.ndarray, ref: np.ndarray, ref_name: str) -> None:
        bad = np.flatnonzero(lengths != ref)
        if bad.size:
            raise self.fail(name, f"list length differs from {ref_name}", int(bad[0]))

    def read(self, schema: FeatureSchema) -> ListBatch:
        B = self.rb.num_rows
        m, item_id = self.lists("item_ids", np.int64)
        cand = _Lists.of(m)
        s_len, score = self.lists("upstream_scores", np.float32)
        self.same_length("upstream_scores", s_len, m, "item_ids")
        if not np.isfinite(score).all():
            row = cand.rows[np.flatnonzero(~np.isfinite(score))[0]]
            raise self.fail("upstream_scores", "NaN or inf score", int(row))

        item_cat = np.zeros((B, cand.width, len(schema.categorical_names)), np.int64)
        item_dense = np.zeros((B, cand.width, len(schema.item_dense)), np.float32)
        for f, name in enumerate(schema.categorical_names):
            n, flat = self.lists(f"cand_{name}", np.int64)
            self.same_length(f"cand_{name}", n, m, "item_ids")
            item_cat[cand.rows, cand.cols, f] = flat
        for f, name in enumerate(schema.item_dense):
            n, flat = self.lists(f"cand_{name}", np.float32)
            self.same_length(f"cand_{name}", n, m, "item_ids")
            item_dense[cand.rows, cand.cols, f] = flat

        k, exposed_flat = self.lists("exposed", np.int64)
        shown = _Lists.of(k)
        exposed = shown.pad(exposed_flat, -1, np.int64)  # (B, K)
        if (exposed_flat < 0).any():
            row = shown.rows[np.flatnonzero(exposed_flat < 0)[0]]
            raise self.fail("exposed", "negative index", int(row))
        problem = _exposure_problem(exposed, m)
        if problem:
            raise self.fail("exposed", *problem)
        feedback = {}
        for name in FEEDBACK:
            n, flat = self.lists(name, np.float32)
            self.same_length(name, n, k, "exposed")
            feedback[name] = shown.pad(flat, 0.0, np.float32)

        user_dense = np.zeros((B, len(schema.user_dense)), np.float32)
        for f, name in enumerate(schema.user_dense):
            user_dense[:, f] = self.scalar(f"user_{name}", np.float32)
        propensity = None
        if PROPENSITY in self.rb.schema.names:
            n, flat = self.lists(PROPENSITY, np.float32)
            self.same_length(PROPENSITY, n, m, "item_ids")
            if not ((flat >= 0) & (flat <= 1)).all():
                row = cand.rows[np.flatnonzero(~((flat >= 0) & (flat <= 1)))[0]]
                raise self.fail(PROPENSITY, "not a probability in [0, 1]", int(row))
            propensity = cand.pad(flat, np.nan, np.float32)
        return ListBatch(
            request_id=self.request_id,
            ts=self.scalar("ts", np.int64),
            user_id=self.scalar("user_id", np.int64),
            user_dense=user_dense,
            item_id=cand.pad(item_id, -1, np.int64),
            item_cat=item_cat,
            item_dense=item_dense,
            upstream_score=cand.pad(score, 0.0, np.float32),
            cand_mask=cand.pad(np.ones(item_id.shape[0], bool), False, bool),
            exposed=exposed,
            **feedback,
            propensity=propensity,
        )


def _as_paths(path_or_paths: PathLike | Sequence[PathLike]) -> list[PathLike]:
    if isinstance(path_or_paths, str | os.PathLike):
        return [path_or_paths]
    return list(path_or_paths)


def _resolve_schema(paths: list[PathLike], schema: FeatureSchema | None) -> FeatureSchema:
    if schema is not None:
        return schema
    if not paths:
        raise ValueError("no log files given")
    return read_schema(paths[0])


def iter_logs(
    path_or_paths: PathLike | Sequence[PathLike],
    schema: FeatureSchema | None = None,
    batch_size: int = 8192,
) -> Iterator[ListBatch]:
    """Stream log files as ListBatches of at most batch_size requests, each padded to its
    own largest m and K. Memory is bounded by batch_size, not by file size.

    schema=None takes it from the (first) file's metadata. Validates as it reads and raises
    LogSchemaError naming the file, the column and the problem."""
    paths = _as_paths(path_or_paths)
    schema = _resolve_schema(paths, schema)
    expected = _log_columns(schema)
    columns = [n for n, _ in expected]
    for path in paths:
        pf = pq.ParquetFile(path)
        meta = pf.schema_arrow.metadata or {}
        if meta.get(VERSION_KEY, LOG_VERSION) != LOG_VERSION:
            _schema_from_metadata(meta, path)  # raises with the version message
        _check_columns(pf.schema_arrow, expected, path)
        optional = _optional_columns(pf.schema_arrow, path)
        for rb in pf.iter_batches(batch_size=batch_size, columns=columns + optional):
            yield _BatchReader(rb, path).read(schema)


def _optional_columns(file_schema: pa.Schema, path: PathLike) -> list[str]:
    """The optional columns a file has ([] or [logging_propensity]), type-checked."""
    if PROPENSITY not in file_schema.names:
        return []
    _check_columns(file_schema, [(PROPENSITY, pa.list_(pa.float32()))], path)
    return [PROPENSITY]


@dataclass(frozen=True)
class RowGroup:
    """One row group of a log file, numbered across the files of a log in order: `first` is
    the log-wide index of its first request (the files' rows concatenated)."""

    path: PathLike
    index: int  # within its file
    first: int
    rows: int


def row_groups(path_or_paths: PathLike | Sequence[PathLike]) -> list[RowGroup]:
    """The row groups of one or more log files, from their footers (no data is read)."""
    groups, first = [], 0
    for path in _as_paths(path_or_paths):
        meta = pq.ParquetFile(path).metadata
        for i in range(meta.num_row_groups):
            rows = meta.row_group(i).num_rows
            groups.append(RowGroup(path, i, first, rows))
            first += rows
    return groups


def read_row_group(group: RowGroup, schema: FeatureSchema) -> ListBatch:
    """The requests of one row group, validated as iter_logs validates them."""
    pf = pq.ParquetFile(group.path)
    meta = pf.schema_arrow.metadata or {}
    if meta.get(VERSION_KEY, LOG_VERSION) != LOG_VERSION:
        _schema_from_metadata(meta, group.path)  # raises with the version message
    expected = _log_columns(schema)
    _check_columns(pf.schema_arrow, expected, group.path)
    optional = _optional_columns(pf.schema_arrow, group.path)
    table = pf.read_row_group(group.index, columns=[n for n, _ in expected] + optional)
    (rb,) = table.combine_chunks().to_batches(max_chunksize=max(table.num_rows, 1)) or [
        pa.RecordBatch.from_pylist([], schema=table.schema)
    ]
    return _BatchReader(rb, group.path).read(schema)


def empty_batch(schema: FeatureSchema) -> ListBatch:
    """A ListBatch with no requests (M = K = 0) for ``schema``."""
    i64, f32 = np.zeros(0, np.int64), np.zeros(0, np.float32)
    return ListBatch(
        request_id=i64,
        ts=i64,
        user_id=i64,
        user_dense=np.zeros((0, len(schema.user_dense)), np.float32),
        item_id=np.zeros((0, 0), np.int64),
        item_cat=np.zeros((0, 0, len(schema.categorical_names)), np.int64),
        item_dense=np.zeros((0, 0, len(schema.item_dense)), np.float32),
        upstream_score=f32.reshape(0, 0),
        cand_mask=np.zeros((0, 0), bool),
        exposed=np.zeros((0, 0), np.int64),
        click=f32.reshape(0, 0),
        like=f32.reshape(0, 0),
        long_view=f32.reshape(0, 0),
    )


def read_logs(
    path_or_paths: PathLike | Sequence[PathLike], schema: FeatureSchema | None = None
) -> ListBatch:
    """All of one or more log files as one ListBatch (concatenation of iter_logs)."""
    paths = _as_paths(path_or_paths)
    schema = _resolve_schema(paths, schema)
    batches = list(iter_logs(paths, schema))
    return ListBatch.concat(batches) if batches else empty_batch(schema)


# ---------------------------------------------------------------------------------------
# Item table


def write_items(
    path: PathLike,
    item_id: np.ndarray,
    item_cat: np.ndarray,
    item_dense: np.ndarray,
    schema: FeatureSchema,
) -> None:
    """Write the item table: item_id (N,), item_cat (N, Fc), item_dense (N, Fd)."""
    n = item_id.shape[0]
    fc, fd = len(schema.categorical_names), len(schema.item_dense)
    if item_cat.shape != (n, fc) or item_dense.shape != (n, fd):
        raise ValueError(
            f"item_cat {item_cat.shape} / item_dense {item_dense.shape}, "
            f"expected ({n}, {fc}) / ({n}, {fd})"
        )
    arrow = item_arrow_schema(schema)
    arrays = [pa.array(item_id, pa.int64())]
    arrays += [pa.array(item_cat[:, f], pa.int64()) for f in range(fc)]
    arrays += [pa.array(item_dense[:, f], pa.float32()) for f in range(fd)]
    pq.write_table(pa.Table.from_arrays(arrays, schema=arrow), path)


def read_items(path: PathLike, schema: FeatureSchema) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> item_id (N,) int64, item_cat (N, Fc) int64, item_dense (N, Fd) float32."""
    arrow = item_arrow_schema(schema)
    pf = pq.ParquetFile(path)
    _check_columns(pf.schema_arrow, [(f.name, f.type) for f in arrow], path)
    table = pf.read(columns=arrow.names)

    def col(name: str, dtype: Any) -> np.ndarray:
        c = table.column(name)
        if c.null_count:
            raise LogSchemaError(f"{path}: column {name!r}: null values")
        return c.to_numpy().astype(dtype, copy=False)

    n = table.num_rows
    cat = [col(name, np.int64) for name in schema.categorical_names]
    dense = [col(name, np.float32) for name in schema.item_dense]
    return (
        col("item_id", np.int64),
        np.stack(cat, axis=1) if cat else np.zeros((n, 0), np.int64),
        np.stack(dense, axis=1) if dense else np.zeros((n, 0), np.float32),
    )


# ---------------------------------------------------------------------------------------
# Time split and dataset directories

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
) -> DatasetPaths:
    """Split an in-memory batch by time and write a dataset directory.

    items = (item_id, item_cat, item_dense) as for write_items, or None."""
    paths = dataset_paths(out_dir)
    paths.root.mkdir(parents=True, exist_ok=True)
    for name, part in zip(SPLITS, split_by_time(batch, fractions), strict=True):
        write_logs(part, getattr(paths, name), schema)
    if items is not None:
        write_items(paths.items, *items, schema)
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


# ---------------------------------------------------------------------------------------
# Avito Context Ad Clicks

# The Avito logs mapped onto our schema. Buckets: ~36M ads and ~4M users hashed (shared
# embeddings on collision are fine for ads seen a handful of times); ~70 categories and
# ~4k locations, so those buckets are nearly collision-free.
AVITO_SCHEMA = FeatureSchema(
    item_id_buckets=1 << 20,
    user_id_buckets=1 << 18,
    item_categorical=(("category", 512), ("location", 8192)),
    item_dense=("log_price", "hist_ctr"),
    user_dense=("is_logged_on",),
)
CONTEXTUAL = 3  # ObjectType: 1 regular, 2 highlighted, 3 contextual (the only ones clicked)
MISSING = -1  # raw categorical value for an id the Avito files leave empty
NO_DATE = np.iinfo(np.int64).min  # SearchDate left empty: such searches are dropped

_STREAM_COLUMNS = {
    "SearchID": pa.int64(),
    "AdID": pa.int64(),
    "Position": pa.int64(),
    "ObjectType": pa.int64(),
    "HistCTR": pa.float64(),
    "IsClick": pa.float64(),
}
_INFO_COLUMNS = {
    "SearchID": pa.int64(),
    "SearchDate": pa.timestamp("ms"),  # "2015-05-10 18:11:01.0"
    "UserID": pa.int64(),
    "IsUserLoggedOn": pa.float64(),
    "SearchLocationID": pa.int64(),
    "SearchCategoryID": pa.int64(),
}
_ADS_COLUMNS = {
    "AdID": pa.int64(),
    "LocationID": pa.int64(),
    "CategoryID": pa.int64(),
    "Price": pa.float64(),
}


class _TsvReader:
    """Streams the needed columns of an Avito TSV file as Arrow record batches.

    Avito's files are plain TSV: no quoting (titles and queries hold bare quotes), empty
    field = missing. Rows that do not parse are skipped and counted."""

    def __init__(self, path: PathLike, columns: dict[str, pa.DataType], block_size: int) -> None:
        self.path = path
        with open(path, encoding="utf-8", errors="replace") as f:
            header = f.readline().rstrip("\r\n").split("\t")
        for name in columns:
            if name not in header:
                raise LogSchemaError(f"{path}: column {name!r}: missing from the header")
        self.bad_rows = 0
        try:
            self.reader = pacsv.open_csv(
                path,
                read_options=pacsv.ReadOptions(block_size=block_size),
                parse_options=pacsv.ParseOptions(
                    delimiter="\t", quote_char=False, invalid_row_handler=self._skip
                ),
                convert_options=pacsv.ConvertOptions(
                    column_types=columns, include_columns=list(columns)
                ),
            )
        except pa.ArrowInvalid as e:
            raise LogSchemaError(f"{path}: {e}") from e

    def _skip(self, row: Any) -> str:
        self.bad_rows += 1
        return "skip"

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        try:
            yield from self.reader
        except pa.ArrowInvalid as e:
            raise LogSchemaError(f"{self.path}: {e}") from e


def _np(arr: pa.Array | pa.ChunkedArray, fill: Any, dtype: Any) -> np.ndarray:
    """Arrow column -> numpy, nulls replaced by fill."""
    return arr.fill_null(fill).to_numpy().astype(dtype, copy=False)


def _read_table_columns(
    path: PathLike, columns: dict[str, pa.DataType], fills: dict[str, Any], block_size: int
) -> tuple[dict[str, np.ndarray], int]:
    """Stream a whole TSV, keeping only `columns` as numpy arrays (nulls -> fills)."""
    reader = _TsvReader(path, columns, block_size)
    dtypes = {n: np.float64 if pa.types.is_floating(t) else np.int64 for n, t in columns.items()}
    parts: dict[str, list[np.ndarray]] = {n: [] for n in columns}
    for rb in reader:
        for name in columns:
            col = rb.column(name)
            if pa.types.is_timestamp(col.type):
                col = col.cast(pa.int64())  # ms since epoch, naive times taken as UTC
            parts[name].append(_np(col, fills[name], dtypes[name]))
    out = {n: np.concatenate(p) if p else np.zeros(0, dtypes[n]) for n, p in parts.items()}
    return out, reader.bad_rows


@dataclass
class _Lookup:
    """A table keyed by a sorted unique int64 key, joined by searchsorted (no dict)."""

    key: np.ndarray  # (N,) sorted unique
    columns: dict[str, np.ndarray]

    @classmethod
    def build(cls, columns: dict[str, np.ndarray], key: str) -> tuple[_Lookup, int]:
        keys, first = np.unique(columns[key], return_index=True)  # duplicates: first wins
        dups = columns[key].shape[0] - keys.shape[0]
        return cls(keys, {n: c[first] for n, c in columns.items() if n != key}), dups

    def find(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """-> index into the table (N,), found mask (N,)."""
        idx = np.searchsorted(self.key, ids)
        idx = np.minimum(idx, max(self.key.shape[0] - 1, 0))
        found = (self.key[idx] == ids) if self.key.shape[0] else np.zeros(ids.shape, bool)
        return idx, found


@dataclass
class _AvitoStats:
    rows_read: int = 0
    searches: int = 0
    ads: int = 0
    clicks: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # why -> SearchStream rows
    ads_without_info: int = 0
    search_info_duplicates: int = 0
    ads_info_duplicates: int = 0

    def drop(self, why: str, n: int | np.integer) -> None:
        self.dropped[why] = self.dropped.get(why, 0) + int(n)


def _block_size(chunk_rows: int) -> int:
    # ~40 bytes per SearchStream row; bounded so tiny chunk_rows still read sane blocks
    return int(min(max(chunk_rows * 40, 1 << 16), 1 << 28))


class _AvitoConverter:
    """SearchStream rows (numpy chunks) -> log record batches, one list per SearchID."""

    def __init__(
        self,
        info: _Lookup,
        ads: _Lookup | None,
        contextual_only: bool,
        writer: pq.ParquetWriter,
        stats: _AvitoStats,
    ) -> None:
        self.info, self.ads, self.contextual_only = info, ads, contextual_only
        self.writer, self.stats = writer, stats
        self.emitted = np.zeros(info.key.shape[0], bool)  # (N_searches,) a list was written
        self.arrow = log_arrow_schema(AVITO_SCHEMA)

    def filter(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Drop rows we cannot or do not want to use; adds the SearchInfo row index."""
        keep = rows["valid"]
        self.stats.drop("missing_search_ad_or_position", (~keep).sum())
        if self.contextual_only:
            ctx = rows["ObjectType"] == CONTEXTUAL
            self.stats.drop("non_contextual", (keep & ~ctx).sum())
            keep &= ctx
        idx, found = self.info.find(rows["SearchID"])
        self.stats.drop("no_search_info", (keep & ~found).sum())
        keep &= found
        dated = self.info.columns["SearchDate"][idx] != NO_DATE
        self.stats.drop("search_without_date", (keep & ~dated).sum())
        keep &= dated
        rows = {n: a[keep] for n, a in rows.items()}
        rows["info_idx"] = idx[keep]
        return rows

    def emit(self, rows: dict[str, np.ndarray]) -> None:
        """Write every SearchID in rows as one request (rows already filtered)."""
        # A SearchID seen again after its list was written (file not grouped by SearchID)
        late = self.emitted[rows["info_idx"]]
        if late.any():
            self.stats.drop("search_not_contiguous", late.sum())
            rows = {n: a[~late] for n, a in rows.items()}
        if rows["SearchID"].shape[0] == 0:
            return
        order = np.lexsort((rows["row"], rows["Position"], rows["SearchID"]))
        r = {n: a[order] for n, a in rows.items()}  # (N,) sorted by search, position
        sid = r["SearchID"]
        first = np.flatnonzero(np.r_[True, sid[1:] != sid[:-1]])  # (S,) group starts
        lengths = np.diff(np.r_[first, sid.shape[0]])
        self.emitted[r["info_idx"][first]] = True
        info = {n: c[r["info_idx"][first]] for n, c in self.info.columns.items()}  # (S,)
        category = self.info.columns["SearchCategoryID"][r["info_idx"]]  # (N,)
        location = self.info.columns["SearchLocationID"][r["info_idx"]]
        log_price = np.zeros(sid.shape[0], np.float32)
        if self.ads is not None:
            aidx, found = self.ads.find(r["AdID"])
            self.stats.ads_without_info += int((~found).sum())
            ad_cat = np.where(found, self.ads.columns["CategoryID"][aidx], MISSING)
            ad_loc = np.where(found, self.ads.columns["LocationID"][aidx], MISSING)
            category = np.where(ad_cat != MISSING, ad_cat, category)  # fall back to the search
            location = np.where(ad_loc != MISSING, ad_loc, location)
            price = np.where(found, self.ads.columns["Price"][aidx], np.nan)
            ok = np.isfinite(price) & (price >= 0)
            log_price = np.where(ok, np.log1p(np.where(ok, price, 0.0)), 0.0).astype(np.float32)

        ctr = r["HistCTR"].astype(np.float32)
        off = np.zeros(first.shape[0] + 1, np.int64)
        np.cumsum(lengths, out=off[1:])
        slot = np.arange(sid.shape[0]) - np.repeat(off[:-1], lengths)  # (N,) 0..m-1 per list
        lint, lfloat = pa.list_(pa.int64()), pa.list_(pa.float32())
        zeros = np.zeros(sid.shape[0], np.float32)
        cols = {
            "request_id": pa.array(sid[first], pa.int64()),
            "ts": pa.array(info["SearchDate"] // 1000, pa.int64()),  # ms -> s
            "user_id": pa.array(info["UserID"], pa.int64()),
            "user_is_logged_on": pa.array(info["IsUserLoggedOn"].astype(np.float32)),
            "item_ids": _list_array(off, r["AdID"], lint),
            "upstream_scores": _list_array(off, ctr, lfloat),
            "cand_category": _list_array(off, category, lint),
            "cand_location": _list_array(off, location, lint),
            "cand_log_price": _list_array(off, log_price, lfloat),
            "cand_hist_ctr": _list_array(off, ctr, lfloat),
            # Avito shows every ad of a search in position order: exposure = candidates
            "exposed": _list_array(off, slot, pa.list_(pa.int32())),
            "click": _list_array(off, r["IsClick"].astype(np.float32), lfloat),
            "like": _list_array(off, zeros, lfloat),
            "long_view": _list_array(off, zeros, lfloat),
        }
        self.writer.write_batch(
            pa.RecordBatch.from_arrays([cols[n] for n in self.arrow.names], schema=self.arrow)
        )
        self.stats.searches += int(first.shape[0])
        self.stats.ads += int(sid.shape[0])
        self.stats.clicks += int((r["IsClick"] > 0).sum())


def _stream_rows(table: pa.Table, row0: int) -> dict[str, np.ndarray]:
    """A chunk of SearchStream as numpy (nulls filled; `valid` marks rows with ids)."""
    valid = np.ones(table.num_rows, bool)
    for name in ("SearchID", "AdID", "Position"):
        valid &= ~table.column(name).is_null().to_numpy(zero_copy_only=False)
    return {
        "SearchID": _np(table.column("SearchID"), -1, np.int64),
        "AdID": _np(table.column("AdID"), -1, np.int64),
        "Position": _np(table.column("Position"), 0, np.int64),
        "ObjectType": _np(table.column("ObjectType"), 0, np.int64),
        "HistCTR": _np(table.column("HistCTR"), 0.0, np.float64),
        "IsClick": _np(table.column("IsClick"), 0.0, np.float64),
        "row": np.arange(row0, row0 + table.num_rows, dtype=np.int64),  # file order tiebreak
        "valid": valid,
    }


def convert_avito(
    search_stream: PathLike,
    search_info: PathLike,
    out_dir: PathLike,
    ads_info: PathLike | None = None,
    chunk_rows: int = 1_000_000,
    contextual_only: bool = True,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
) -> dict[str, Any]:
    """Convert the Kaggle Avito Context Ad Clicks TSVs into a dataset directory.

    One request per SearchID: candidates = its ads ordered by Position (1, 2, 6, 7, 8 ->
    candidate 0..4), exposed = all of them in that order, click = IsClick (0 where empty),
    upstream score = cand hist_ctr = HistCTR (0 where empty), ts = SearchDate (Unix
    seconds), user_id = UserID, user is_logged_on = IsUserLoggedOn. category / location
    come from AdsInfo when given (and not empty for the ad), else from the search's
    SearchCategoryID / SearchLocationID; log_price = log1p(Price) (0 without AdsInfo).
    contextual_only keeps ObjectType 3 ads only (the only ones with clicks and HistCTR).
    Empty ids are MISSING (-1). Schema: AVITO_SCHEMA.

    Memory: SearchInfo (and AdsInfo) are held as sorted numpy columns, ~40 bytes a row;
    SearchStream is streamed chunk_rows rows at a time, the SearchID at a chunk's tail
    carried into the next chunk. Rows are written to a temporary log, which is then split
    by time (split_log_file) into train / valid / test. -> stats."""
    if chunk_rows < 1:
        raise ValueError("chunk_rows must be >= 1")
    paths = dataset_paths(out_dir)
    paths.root.mkdir(parents=True, exist_ok=True)
    stats = _AvitoStats()
    block = _block_size(chunk_rows)

    fills = dict.fromkeys(_INFO_COLUMNS, MISSING) | {"IsUserLoggedOn": 0, "SearchDate": NO_DATE}
    info_cols, bad = _read_table_columns(search_info, _INFO_COLUMNS, fills, block)
    stats.drop("search_info_unparsable", bad)
    info, stats.search_info_duplicates = _Lookup.build(info_cols, "SearchID")
    info.columns["IsUserLoggedOn"] = info.columns["IsUserLoggedOn"].astype(np.float32)
    ads = None
    if ads_info is not None:
        fills = dict.fromkeys(_ADS_COLUMNS, MISSING) | {"Price": np.nan}
        ads_cols, bad = _read_table_columns(ads_info, _ADS_COLUMNS, fills, block)
        stats.drop("ads_info_unparsable", bad)
        ads, stats.ads_info_duplicates = _Lookup.build(ads_cols, "AdID")
    n_ads = "no" if ads is None else ads.key.shape[0]
    log.info("avito: %d searches, %s ads in the side tables", info.key.shape[0], n_ads)

    tmp = paths.root / "_avito_all.parquet"
    reader = _TsvReader(search_stream, _STREAM_COLUMNS, block)
    try:
        with pq.ParquetWriter(tmp, log_arrow_schema(AVITO_SCHEMA)) as writer:
            conv = _AvitoConverter(info, ads, contextual_only, writer, stats)
            carry: dict[str, np.ndarray] | None = None
            pending: pa.Table | None = None
            row0 = 0

            def process(table: pa.Table, final: bool) -> None:
                nonlocal carry, row0
                rows = conv.filter(_stream_rows(table, row0))
                row0 += table.num_rows
                stats.rows_read += table.num_rows
                if carry is not None:
                    rows = {n: np.concatenate([carry[n], a]) for n, a in rows.items()}
                    carry = None
                if not final and rows["SearchID"].shape[0]:
                    # the last SearchID may go on in the next chunk: hold its rows back
                    hold = rows["SearchID"] == rows["SearchID"][-1]
                    carry = {n: a[hold] for n, a in rows.items()}
                    rows = {n: a[~hold] for n, a in rows.items()}
                conv.emit(rows)

            for rb in reader:
                t = pa.Table.from_batches([rb])
                pending = t if pending is None else pa.concat_tables([pending, t])
                while pending.num_rows >= chunk_rows:
                    process(pending.slice(0, chunk_rows), final=False)
                    pending = pending.slice(chunk_rows)
            if pending is not None and pending.num_rows:
                process(pending, final=True)
            elif carry is not None:
                conv.emit(carry)
        stats.drop("search_stream_unparsable", reader.bad_rows)
        splits = split_log_file(tmp, paths.root, fractions)
    finally:
        tmp.unlink(missing_ok=True)

    out = {
        "searches": stats.searches,
        "ads": stats.ads,
        "clicks": stats.clicks,
        "rows_read": stats.rows_read,
        "dropped": {k: v for k, v in stats.dropped.items() if v},
        "search_info_duplicates": stats.search_info_duplicates,
        "splits": splits,
        "contextual_only": contextual_only,
    }
    if ads is not None:
        out["ads_without_info"] = stats.ads_without_info
        out["ads_info_duplicates"] = stats.ads_info_duplicates
    log.info("avito conversion: %s", out)
    return out
