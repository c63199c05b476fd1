"""The framework's floor for tests/bench/bench_http.py: POST /v1/rerank parses the body with
the service's own model (RerankIn.model_validate_json on the raw bytes) and answers a
response of the service's shape (the first k candidates, upstream scores) serialized the
same way (orjson). No engine, no cache, no metrics: what is left is uvicorn + FastAPI +
pydantic + orjson, the cost every request pays before the model does anything.

    python -m uvicorn tests.bench.echo_app:app --port 8001 --no-access-log
"""

from __future__ import annotations

import uuid

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response

from service.api import RerankIn

_JSON = "application/json"
_ZERO_TIMINGS = {"queue_ms": 0.0, "cache_ms": 0.0, "encode_ms": 0.0, "decode_ms": 0.0,
                 "total_ms": 0.0}  # fmt: skip

app = FastAPI(title="gref-serve echo (benchmark floor)")


@app.post("/v1/rerank")
async def rerank(request: Request) -> Response:
    """The first k candidates, in a body of RerankOut's shape."""
    req = RerankIn.model_validate_json(await request.body())
    body = {
        "request_id": req.request_id or uuid.uuid4().hex,
        "model_version": "echo",
        "items": [{"item_id": c.item_id, "score": c.score} for c in req.candidates[: req.k]],
        "degraded": False,
        "reason": None,
        "passes": 0,
        "timings": _ZERO_TIMINGS,
    }
    return Response(orjson.dumps(body), media_type=_JSON)


@app.get("/readyz")
async def readyz() -> dict[str, bool]:
    """Always ready (nothing to load)."""
    return {"ready": True}
