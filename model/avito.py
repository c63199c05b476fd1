"""The Avito Context Ad Clicks converter: Kaggle's TSVs -> a dataset directory in the log
format (numpy + pyarrow only, no torch).

SearchStream grouped by SearchID is one request (<= 5 ads at positions 1, 2, 6, 7, 8);
SearchInfo and AdsInfo are joined on their ids; IsClick of the contextual ads is the click.
``convert_avito`` says column by column how the files map onto the schema (AVITO_SCHEMA).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from contract.features import FeatureSchema
from model.dataset import dataset_paths, split_log_file
from model.log_format import LogSchemaError, PathLike, log_arrow_schema
from model.log_io import list_array

log = logging.getLogger(__name__)


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
            "item_ids": list_array(off, r["AdID"], lint),
            "upstream_scores": list_array(off, ctr, lfloat),
            "cand_category": list_array(off, category, lint),
            "cand_location": list_array(off, location, lint),
            "cand_log_price": list_array(off, log_price, lfloat),
            "cand_hist_ctr": list_array(off, ctr, lfloat),
            # Avito shows every ad of a search in position order: exposure = candidates
            "exposed": list_array(off, slot, pa.list_(pa.int32())),
            "click": list_array(off, r["IsClick"].astype(np.float32), lfloat),
            "like": list_array(off, zeros, lfloat),
            "long_view": list_array(off, zeros, lfloat),
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
