"""The Parquet log format, the project's public data contract: its columns, its Arrow
schemas and the checks its reader and writer share (numpy + pyarrow only, no torch).

For a FeatureSchema ``schema`` a log file (one row per request) has exactly these columns
(extra columns are ignored by the reader):

| column            | Arrow type    | per row | meaning                                     |
| ----------------- | ------------- | ------- | ------------------------------------------- |
| request_id        | int64         | scalar  | request id                                  |
| ts                | int64         | scalar  | request time (logs are split by it)         |
| user_id           | int64/string  | scalar  | raw user id (hashed later, features.py)     |
| user_<name>       | float32       | scalar  | one per name in schema.user_dense           |
| item_ids          | list<int64>   | m       | candidates, upstream order (j = position j) |
|                   | list<string>  |         | (or string ids: see below)                  |
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

Ids (``user_id``, ``item_ids``, the item table's ``item_id``) are integers or strings, each
column one or the other: an integer item id is >= 0; a string id is 1..128 printable ASCII
characters without spaces. The reader maps every id to its 64-bit key (contract/ids.py: an
integer, or a string that spells one canonically, is itself; any other string is hashed to
a negative key), the key the model hashes and the service serves by, so ``"sku-12"`` in a
log and in a request are the same item. ``write_logs(..., string_ids=True)`` writes the ids
of a batch as ``u-<n>`` and ``sku-<n>`` strings (the simulator's ``--string-ids``).

m and K vary per row. No nulls anywhere. File key-value metadata:
``b"gref.schema"`` = JSON of ``schema.to_dict()``, ``b"gref.log_version"`` = ``b"1"``.
The reader accepts any integer width for integer columns, any float width for float
columns and large_list for list (it casts); anything else is a ``LogSchemaError``.

Item table (``items.parquet``): ``item_id`` int64 (or string), one int64 column per
categorical name, one float32 column per dense name (bare names, no ``cand_`` prefix);
same metadata.

Reading and writing: model/log_io.py. Dataset directories and the time split:
model/dataset.py. The Avito converter: model/avito.py. In memory a log is a ``ListBatch``
(model/data.py): padded per batch to the batch's largest m and K (item_id = -1 /
cand_mask False, exposed = -1, zeros elsewhere).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from contract.features import FeatureSchema

LOG_VERSION = b"1"
SCHEMA_KEY = b"gref.schema"
VERSION_KEY = b"gref.log_version"
FEEDBACK = ("click", "like", "long_view")
PROPENSITY = "logging_propensity"  # the optional column (ListBatch.propensity)
# id columns: integers or strings (the schemas below give the integer form)
ID_COLUMNS = frozenset({"user_id", "item_ids", "item_id"})
# the string ids write_logs / write_items write for integer ids n (string_ids=True)
USER_ID_PREFIX, ITEM_ID_PREFIX = "u-", "sku-"

PathLike = str | os.PathLike[str]


class LogSchemaError(ValueError):
    """A log or item file (or an Avito input) does not follow the contract."""


# ---------------------------------------------------------------------------------------
# Arrow schemas


def log_columns(schema: FeatureSchema) -> list[tuple[str, pa.DataType]]:
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


def _string_ids(cols: list[tuple[str, pa.DataType]]) -> list[tuple[str, pa.DataType]]:
    """The id columns as strings (list<string> for a list column)."""

    def as_string(t: pa.DataType) -> pa.DataType:
        return pa.list_(pa.string()) if pa.types.is_list(t) else pa.string()

    return [(n, as_string(t) if n in ID_COLUMNS else t) for n, t in cols]


def log_arrow_schema(
    schema: FeatureSchema, propensity: bool = False, string_ids: bool = False
) -> pa.Schema:
    """The Arrow schema of a log file for ``schema`` (with its metadata); propensity=True
    adds the optional logging_propensity column, string_ids=True makes the ids strings."""
    cols = log_columns(schema) + ([(PROPENSITY, pa.list_(pa.float32()))] if propensity else [])
    cols = _string_ids(cols) if string_ids else cols
    fields = [pa.field(n, t, nullable=False) for n, t in cols]
    return pa.schema(fields, metadata=_metadata(schema))


def item_arrow_schema(schema: FeatureSchema, string_ids: bool = False) -> pa.Schema:
    """The Arrow schema of an item table for ``schema`` (with its metadata)."""
    cols = [("item_id", pa.string() if string_ids else pa.int64())]
    cols += [(n, pa.int64()) for n in schema.categorical_names]
    cols += [(n, pa.float32()) for n in schema.item_dense]
    return pa.schema([pa.field(n, t, nullable=False) for n, t in cols], metadata=_metadata(schema))


def schema_from_metadata(meta: dict[bytes, bytes] | None, path: PathLike) -> FeatureSchema:
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
    return schema_from_metadata(pq.read_schema(path).metadata, path)


def _type_ok(actual: pa.DataType, expected: pa.DataType, is_id: bool = False) -> bool:
    """Same shape (scalar / list) and same kind (integer / float) of values; an id column
    (is_id) may hold strings instead of integers."""
    if pa.types.is_list(expected):
        if not (pa.types.is_list(actual) or pa.types.is_large_list(actual)):
            return False
        actual, expected = actual.value_type, expected.value_type
    if is_id and (pa.types.is_string(actual) or pa.types.is_large_string(actual)):
        return True
    if pa.types.is_integer(expected):
        return pa.types.is_integer(actual)
    return pa.types.is_floating(actual)


def check_columns(
    file_schema: pa.Schema, expected: list[tuple[str, pa.DataType]], path: PathLike
) -> None:
    present = set(file_schema.names)
    for name, typ in expected:
        if name not in present:
            raise LogSchemaError(f"{path}: column {name!r}: missing")
        actual = file_schema.field(name).type
        if not _type_ok(actual, typ, name in ID_COLUMNS):
            also = " (or strings)" if name in ID_COLUMNS else ""
            raise LogSchemaError(
                f"{path}: column {name!r}: wrong type {actual}, expected {typ}{also}"
            )


# ---------------------------------------------------------------------------------------
# Checks the reader and the writer share


def exposure_problem(exposed: np.ndarray, m: np.ndarray) -> tuple[str, int] | None:
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


def optional_columns(file_schema: pa.Schema, path: PathLike) -> list[str]:
    """The optional columns a file has ([] or [logging_propensity]), type-checked."""
    if PROPENSITY not in file_schema.names:
        return []
    check_columns(file_schema, [(PROPENSITY, pa.list_(pa.float32()))], path)
    return [PROPENSITY]
