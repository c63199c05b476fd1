"""The Avito converter (model/avito.py), on a tiny fixture in Avito's exact TSV layout."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from model.avito import AVITO_SCHEMA, convert_avito
from model.data import ListBatch
from model.dataset import dataset_paths
from model.log_format import LogSchemaError, read_schema
from model.log_io import read_logs

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
