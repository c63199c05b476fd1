"""Reading and writing log files and the item table (the format: model/log_format.py).

Writing unpads a ListBatch into Arrow list columns and refuses a batch that breaks the
contract; reading streams a file as ListBatches, each padded to its own largest m and K,
and validates as it reads (numpy + pyarrow only, no torch).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from contract.features import FeatureSchema
from contract.ids import item_problem, string_key, string_problem
from model.data import ListBatch
from model.log_format import (
    FEEDBACK,
    ITEM_ID_PREFIX,
    LOG_VERSION,
    PROPENSITY,
    USER_ID_PREFIX,
    VERSION_KEY,
    LogSchemaError,
    PathLike,
    check_columns,
    exposure_problem,
    item_arrow_schema,
    log_arrow_schema,
    log_columns,
    optional_columns,
    read_schema,
    schema_from_metadata,
)

# ---------------------------------------------------------------------------------------
# Writing


def list_array(offsets: np.ndarray, values: np.ndarray, typ: pa.DataType) -> pa.Array:
    return pa.ListArray.from_arrays(
        pa.array(offsets, pa.int32()), pa.array(values, typ.value_type), type=typ
    )


def _offsets(lengths: np.ndarray) -> np.ndarray:
    off = np.zeros(lengths.shape[0] + 1, np.int64)
    np.cumsum(lengths, out=off[1:])
    if off[-1] > np.iinfo(np.int32).max:
        raise ValueError("more than 2^31 list values in one row group; lower row_group_size")
    return off


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
    problem = exposure_problem(batch.exposed, cand.sum(1))
    if problem:
        what, row = problem
        raise ValueError(f"exposed: {what} (request_id={int(batch.request_id[row])})")
    if not np.isfinite(batch.upstream_score[cand]).all():
        raise ValueError("upstream_score: NaN or inf on a candidate")


def _ids(ids: np.ndarray, prefix: str, typ: pa.DataType) -> pa.Array:
    """Integer ids as `typ`: themselves, or (a string type) the strings prefix + id."""
    if pa.types.is_integer(typ):
        return pa.array(ids, typ)
    return pa.array(np.char.add(prefix, ids.astype(str)), typ)


def _log_record_batch(batch: ListBatch, schema: FeatureSchema, arrow: pa.Schema) -> pa.RecordBatch:
    """Unpad a ListBatch into one Arrow record batch: flat values + offsets, no row loop."""
    cand = batch.cand_mask.astype(bool)  # (B, M)
    shown = batch.exposed >= 0  # (B, K)
    c_off = _offsets(cand.sum(1))
    e_off = _offsets(shown.sum(1))
    cols: dict[str, pa.Array] = {
        "request_id": pa.array(batch.request_id, pa.int64()),
        "ts": pa.array(batch.ts, pa.int64()),
        "user_id": _ids(batch.user_id, USER_ID_PREFIX, arrow.field("user_id").type),
    }
    for f, name in enumerate(schema.user_dense):
        cols[f"user_{name}"] = pa.array(batch.user_dense[:, f], pa.float32())
    lint, lfloat = pa.list_(pa.int64()), pa.list_(pa.float32())
    item_type = arrow.field("item_ids").type
    cols["item_ids"] = pa.ListArray.from_arrays(
        pa.array(c_off, pa.int32()),
        _ids(batch.item_id[cand], ITEM_ID_PREFIX, item_type.value_type),
        type=item_type,
    )
    cols["upstream_scores"] = list_array(c_off, batch.upstream_score[cand], lfloat)
    for f, name in enumerate(schema.categorical_names):
        cols[f"cand_{name}"] = list_array(c_off, batch.item_cat[..., f][cand], lint)
    for f, name in enumerate(schema.item_dense):
        cols[f"cand_{name}"] = list_array(c_off, batch.item_dense[..., f][cand], lfloat)
    cols["exposed"] = list_array(e_off, batch.exposed[shown], pa.list_(pa.int32()))
    for name in FEEDBACK:
        cols[name] = list_array(e_off, getattr(batch, name)[shown], lfloat)
    if PROPENSITY in arrow.names:
        cols[PROPENSITY] = list_array(c_off, np.asarray(batch.propensity)[cand], lfloat)
    return pa.RecordBatch.from_arrays([cols[n] for n in arrow.names], schema=arrow)


def write_logs(
    batch: ListBatch,
    path: PathLike,
    schema: FeatureSchema,
    row_group_size: int = 16_384,
    string_ids: bool = False,
) -> None:
    """Write a padded ListBatch as a log file (one row per request, padding dropped).

    Padding must sit at the tail of each row (cand_mask / exposed >= 0 are prefixes);
    feedback on padded exposure slots is dropped. The logging_propensity column is written
    when every real candidate carries one (ListBatch.has_propensity). string_ids=True
    writes user id n as "u-<n>" and item id n as "sku-<n>" (string id columns). Raises
    ValueError on a batch that breaks the contract (so a bad batch never reaches disk)."""
    _check_batch(batch, schema)
    arrow = log_arrow_schema(schema, propensity=batch.has_propensity, string_ids=string_ids)
    with pq.ParquetWriter(path, arrow) as writer:
        for start in range(0, len(batch), row_group_size):
            part = batch.take(slice(start, start + row_group_size))
            writer.write_batch(
                _log_record_batch(part, schema, arrow), row_group_size=row_group_size
            )


# ---------------------------------------------------------------------------------------
# Reading (streamed)


def id_keys(
    values: pa.Array, items: bool, fail: Callable[[str, int], LogSchemaError]
) -> np.ndarray:
    """An id column's values (integers or strings) -> (N,) int64 keys (contract.ids);
    fail(problem, index of the value) for the first id that cannot be one (items: item ids,
    >= 0 when integers)."""
    if pa.types.is_integer(values.type):
        keys = values.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
        bad = np.flatnonzero(keys < 0) if items else np.zeros(0, np.int64)
        if bad.size:
            raise fail("negative item id (negative ids are padding)", int(bad[0]))
        return keys
    encoded = values.dictionary_encode()  # each distinct string keyed once
    words = encoded.dictionary.to_pylist()
    index = encoded.indices.to_numpy(zero_copy_only=False)
    check = item_problem if items else string_problem
    for at, word in enumerate(words):
        if (problem := check(word)) is not None:
            raise fail(f"id {word[:40]!r}: {problem}", int(np.flatnonzero(index == at)[0]))
    table = np.array([string_key(w) for w in words], np.int64)
    return table[index]


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

    def user_ids(self) -> np.ndarray:
        """(B,) int64 keys of the user_id column (integers or strings)."""
        arr = self.rb.column("user_id")
        if arr.null_count:
            raise LogSchemaError(f"{self.path}: column 'user_id': null values")
        return self.keys("user_id", arr, None)

    def lists(self, name: str, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
        """-> lengths (B,), flat values (N,) of a list column (dtype None: id keys)."""
        arr = self.rb.column(name)
        if arr.null_count:
            raise self.fail(name, "null list", int(np.flatnonzero(arr.is_null())[0]))
        off = arr.offsets.to_numpy().astype(np.int64)  # sliced arrays: offsets into .values
        values = arr.values.slice(int(off[0]), int(off[-1] - off[0]))
        if values.null_count:
            row = np.searchsorted(off, off[0] + np.flatnonzero(values.is_null())[0], "right") - 1
            raise self.fail(name, "null value in a list", int(row))
        lengths = np.diff(off)
        if dtype is None:
            return lengths, self.keys(name, values, np.repeat(np.arange(len(lengths)), lengths))
        return lengths, values.to_numpy(zero_copy_only=False).astype(dtype, copy=False)

    def keys(self, name: str, values: pa.Array, rows: np.ndarray | None) -> np.ndarray:
        """An id column's values -> (N,) int64 keys (id_keys); rows: each value's row (a
        list column), None for a scalar column (value i is row i)."""

        def fail(problem: str, at: int) -> LogSchemaError:
            return self.fail(name, problem, at if rows is None else int(rows[at]))

        return id_keys(values, name != "user_id", fail)

    def same_length(self, name: str, lengths: np.ndarray, ref: np.ndarray, ref_name: str) -> None:
        bad = np.flatnonzero(lengths != ref)
        if bad.size:
            raise self.fail(name, f"list length differs from {ref_name}", int(bad[0]))

    def read(self, schema: FeatureSchema) -> ListBatch:
        B = self.rb.num_rows
        m, item_id = self.lists("item_ids", None)
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
        problem = exposure_problem(exposed, m)
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
            user_id=self.user_ids(),
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
    expected = log_columns(schema)
    columns = [n for n, _ in expected]
    for path in paths:
        pf = pq.ParquetFile(path)
        meta = pf.schema_arrow.metadata or {}
        if meta.get(VERSION_KEY, LOG_VERSION) != LOG_VERSION:
            schema_from_metadata(meta, path)  # raises with the version message
        check_columns(pf.schema_arrow, expected, path)
        optional = optional_columns(pf.schema_arrow, path)
        for rb in pf.iter_batches(batch_size=batch_size, columns=columns + optional):
            yield _BatchReader(rb, path).read(schema)


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
        schema_from_metadata(meta, group.path)  # raises with the version message
    expected = log_columns(schema)
    check_columns(pf.schema_arrow, expected, group.path)
    optional = optional_columns(pf.schema_arrow, group.path)
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
    string_ids: bool = False,
) -> None:
    """Write the item table: item_id (N,), item_cat (N, Fc), item_dense (N, Fd);
    string_ids=True writes item id n as "sku-<n>" (as write_logs does)."""
    n = item_id.shape[0]
    fc, fd = len(schema.categorical_names), len(schema.item_dense)
    if item_cat.shape != (n, fc) or item_dense.shape != (n, fd):
        raise ValueError(
            f"item_cat {item_cat.shape} / item_dense {item_dense.shape}, "
            f"expected ({n}, {fc}) / ({n}, {fd})"
        )
    arrow = item_arrow_schema(schema, string_ids)
    arrays = [_ids(item_id, ITEM_ID_PREFIX, arrow.field("item_id").type)]
    arrays += [pa.array(item_cat[:, f], pa.int64()) for f in range(fc)]
    arrays += [pa.array(item_dense[:, f], pa.float32()) for f in range(fd)]
    pq.write_table(pa.Table.from_arrays(arrays, schema=arrow), path)


def read_items(path: PathLike, schema: FeatureSchema) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> item_id (N,) int64 keys (contract.ids: an integer id is itself, a string one
    its key), item_cat (N, Fc) int64, item_dense (N, Fd) float32."""
    arrow = item_arrow_schema(schema)
    pf = pq.ParquetFile(path)
    check_columns(pf.schema_arrow, [(f.name, f.type) for f in arrow], path)
    table = pf.read(columns=arrow.names)

    def col(name: str, dtype: Any) -> np.ndarray:
        c = table.column(name)
        if c.null_count:
            raise LogSchemaError(f"{path}: column {name!r}: null values")
        return c.to_numpy().astype(dtype, copy=False)

    n = table.num_rows
    cat = [col(name, np.int64) for name in schema.categorical_names]
    dense = [col(name, np.float32) for name in schema.item_dense]
    ids = table.column("item_id")
    if ids.null_count:
        raise LogSchemaError(f"{path}: column 'item_id': null values")

    def fail(problem: str, row: int) -> LogSchemaError:
        return LogSchemaError(f"{path}: column 'item_id': {problem} (row {row})")

    return (
        id_keys(ids.combine_chunks(), True, fail),
        np.stack(cat, axis=1) if cat else np.zeros((n, 0), np.int64),
        np.stack(dense, axis=1) if dense else np.zeros((n, 0), np.float32),
    )
