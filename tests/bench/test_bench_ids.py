"""`pytest -m bench -s tests/bench/test_bench_ids.py`: a short run of
tests/bench/bench_ids.py (the service on integer and on string ids, and this checkout as
its own reference). Prints its table; asserts only correctness: every row answered, no
errors, the string bodies are the integer ones with string ids."""

from __future__ import annotations

import json

import pytest

from tests.bench.bench_ids import ROOT, run, string_bodies


def test_string_bodies_change_only_the_ids() -> None:
    body = {"user": {"id": 7, "features": {}}, "candidates": [
        {"item_id": 3, "score": 1.5, "features": {"quality": 0.5}}], "k": 1}  # fmt: skip
    (out,) = string_bodies([json.dumps(body).encode()])
    want = {**body, "user": {"id": "u-7", "features": {}},
            "candidates": [{**body["candidates"][0], "item_id": "sku-3"}]}  # fmt: skip
    assert json.loads(out) == want


@pytest.mark.bench
def test_ids_benchmark_short() -> None:
    text, rows = run(ref_root=ROOT, duration_s=2.0, warmup_s=1.0, rounds=1)
    print()
    print(text)
    assert set(rows) == {"service/int", "service/string", "ref/int"}
    for name, r in rows.items():
        assert len(r.latencies) > 0, f"{name}: no request answered"
        assert r.errors == 0, f"{name}: {r.errors} errors, first: {r.error_sample}"
    assert "string / int on the service" in text and "service / ref" in text
