"""Item and user ids: integers or strings, each mapped once to a 64-bit key (pure Python and
numpy, no torch). The same function runs on logs (model/log_io.py), on the item table
(export) and on requests (service/api.py), so a string id lands on the same key, the same
cache entries and the same embedding bucket offline and online.

The rule (`id_key`, named ``ID_KEY_NAME`` in every bundle manifest):

- An integer is its own key. So is a string that is the canonical decimal form of an
  int64 (``"123"``, ``"-7"``; not ``"0123"``, ``"+1"``, ``"1.0"``): JavaScript callers
  and CSV-born logs send integer ids as strings, and they must meet the same item.
- Any other string ``s`` is keyed by ``-2 - (blake2b(utf8(s), digest 8 bytes) as a
  little-endian unsigned integer mod (2**63 - 1))``, a key in [-2**63, -2]: negative, so
  never an item's integer id (those are >= 0), and never -1, the padding of model/data.py.

A string id is 1..``MAX_ID_LENGTH`` printable ASCII characters without spaces (it travels
in logs, Redis keys and log lines as is). Two ids are the same item when their keys are
equal ("123" and 123 are one id; two strings meet by a hash collision with probability
about n**2 / 2**64 for n distinct strings, negligible for any catalog). The key is what
the L1 cache, the bundle's item table and the Redis key ``{prefix}:emb:{version}:{key}``
hold; ``python -m contract.ids ID...`` prints the key of each id given.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable
from functools import lru_cache
from hashlib import blake2b

import numpy as np

ID_KEY_NAME = "int-or-blake2b63-v1"  # the rule above; a bundle names it in its manifest
MAX_ID_LENGTH = 128
# printable ASCII without spaces: what a string id may hold (the OpenAPI schema states it)
ID_PATTERN = r"^[\x21-\x7e]+$"
PAD_KEY = -1  # model/data.py's padding; no id has it
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1

_PRINTABLE = re.compile(r"[\x21-\x7e]+").fullmatch
_CANONICAL = re.compile(r"-?(?:0|[1-9][0-9]{0,18})").fullmatch
_SPAN = (1 << 63) - 1  # string keys take [-2**63, -2]: -2 - [0, 2**63 - 2]
ID_MESSAGE = f"a string id is 1..{MAX_ID_LENGTH} printable ASCII characters without spaces"


def string_problem(text: str) -> str | None:
    """Why `text` cannot be a string id (None: it can)."""
    if len(text) > MAX_ID_LENGTH:
        return f"{len(text)} characters, at most {MAX_ID_LENGTH}"
    return None if _PRINTABLE(text) else ID_MESSAGE


def hashed_key(text: str) -> int:
    """The key of a string id that is not the canonical decimal of an int64."""
    h = int.from_bytes(blake2b(text.encode(), digest_size=8).digest(), "little")
    return -2 - h % _SPAN


def integer_of(text: str) -> int | None:
    """The int64 a string spells in canonical decimal form, or None."""
    if _CANONICAL(text):
        value = int(text)
        if INT64_MIN <= value <= INT64_MAX:
            return value
    return None


@lru_cache(maxsize=1 << 16)
def string_key(text: str) -> int:
    """The key of a valid string id (see the module's rule); the caller checked it with
    string_problem. Memoised: a catalog's ids repeat from request to request."""
    value = integer_of(text)
    return hashed_key(text) if value is None else value


def item_problem(value: int | str) -> str | None:
    """Why `value` cannot be an item id (None: it can): a string that is no id, or an
    integer (or its canonical string) below 0 (negative integers are padding)."""
    if isinstance(value, str):
        problem = string_problem(value)
        if problem is not None:
            return problem
        number = integer_of(value)
        value = 0 if number is None else number
    if not INT64_MIN <= value <= INT64_MAX:
        return "out of the int64 range"
    return "must be >= 0 (negative ids are padding)" if value < 0 else None


def id_key(value: int | str) -> int:
    """The 64-bit key of an id (an integer, or a valid string id)."""
    return string_key(value) if isinstance(value, str) else int(value)


def id_keys(values: Iterable[int | str]) -> np.ndarray:
    """(n,) int64 keys of ids. ValueError naming the first string that cannot be an id."""
    out = []
    for value in values:
        if isinstance(value, str) and (problem := string_problem(value)) is not None:
            raise ValueError(f"id {value[:40]!r}: {problem}")
        out.append(id_key(value))
    return np.array(out, np.int64)


def main(argv: list[str]) -> int:
    """python -m contract.ids ID... : each id and its key (what a Redis key holds)."""
    for text in argv:
        problem = string_problem(text)
        if problem is not None:
            sys.stderr.write(f"{text!r}: {problem}\n")
            return 2
        sys.stdout.write(f"{text}\t{string_key(text)}\n")
    return 0


if __name__ == "__main__":  # pragma: no cover - the CLI
    raise SystemExit(main(sys.argv[1:]))
