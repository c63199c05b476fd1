"""contract.ids: the one id -> key rule of logs, the item table, Redis keys and requests.
Its values are pinned: a change re-keys every published embedding and every string id."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from contract.features import hash_id, hash_ids
from contract.ids import (
    ID_KEY_NAME,
    PAD_KEY,
    hashed_key,
    id_key,
    id_keys,
    item_problem,
    main,
    string_problem,
)
from model.log_format import LogSchemaError
from model.log_io import id_keys as column_keys

# id -> key, fixed for ID_KEY_NAME: what a publisher outside this project must compute
PINNED = {
    "sku-1": -7382568845694773712,
    "sku-1234": -3122805835584685751,
    "u-77": -579130853252651201,
    "a": -3405396810240292930,
    "0123": -64065228525786373,  # not canonical: a string
    "9223372036854775808": -4786455646563877005,  # beyond int64: a string
    "123": 123,  # canonical decimal: the integer
    "-7": -7,
    "9223372036854775807": (1 << 63) - 1,
}


def test_keys_are_pinned() -> None:
    assert ID_KEY_NAME == "int-or-blake2b63-v1"
    assert {text: id_key(text) for text in PINNED} == PINNED
    assert id_keys(list(PINNED)).tolist() == list(PINNED.values())
    assert id_key(123) == 123 and id_key(0) == 0


def test_string_keys_are_negative_and_never_padding() -> None:
    rng = np.random.default_rng(0)
    texts = [f"sku-{n}" for n in rng.integers(0, 1 << 40, 2000)] + ["!", "~" * 128]
    keys = np.array([hashed_key(t) for t in texts])
    assert (keys <= -2).all() and (keys >= -(1 << 63)).all()
    assert PAD_KEY == -1 and len(set(keys.tolist())) == len(set(texts))


def test_what_a_string_id_may_be() -> None:
    assert string_problem("sku-1") is None and string_problem("~" * 128) is None
    assert string_problem("") is not None
    assert string_problem("a" * 129) == "129 characters, at most 128"
    for bad in ("a b", "tab\t", "line\n", "é", "\x00"):
        assert string_problem(bad) is not None, bad
    assert item_problem("-7") == "must be >= 0 (negative ids are padding)"
    assert item_problem(-1) == "must be >= 0 (negative ids are padding)"
    assert item_problem(1 << 63) == "out of the int64 range"
    assert item_problem("sku-1") is None and item_problem("12") is None
    with pytest.raises(ValueError, match="'a b'"):
        id_keys(["a b"])


def test_keys_hash_to_buckets_alike_in_python_and_numpy() -> None:
    keys = [id_key(t) for t in PINNED]
    want = hash_ids(np.array(keys, np.int64), 1000, 7).tolist()
    assert [hash_id(k, 1000, 7) for k in keys] == want
    assert min(want) >= 1  # bucket 0 stays padding's


def test_log_columns_key_alike_as_integers_and_strings() -> None:
    def fail(problem: str, at: int) -> LogSchemaError:
        return LogSchemaError(f"{problem} at {at}")

    strings = pa.array(["sku-1", "123", "sku-1"])
    assert column_keys(strings, True, fail).tolist() == [PINNED["sku-1"], 123, PINNED["sku-1"]]
    assert column_keys(pa.array([5, 123]), True, fail).tolist() == [5, 123]
    with pytest.raises(LogSchemaError, match=r"negative item id.* at 1"):
        column_keys(pa.array([5, -3]), True, fail)
    with pytest.raises(LogSchemaError, match=r"'-3': must be >= 0.* at 2"):
        column_keys(pa.array(["a", "b", "-3"]), True, fail)
    assert column_keys(pa.array(["-3"]), False, fail).tolist() == [-3]  # a user id may be


def test_the_cli_prints_keys(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sku-1", "123"]) == 0
    assert capsys.readouterr().out == f"sku-1\t{PINNED['sku-1']}\n123\t123\n"
    assert main(["a b"]) == 2
