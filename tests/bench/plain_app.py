"""The plain floor for tests/bench/bench_http.py: the least a Python HTTP service does per
rerank request. A stock FastAPI app whose POST /v1/rerank parses the body with
`json.loads` and answers the first k candidates in a body of the service's shape; no
model, no validation, no metrics, no request id. Whatever the service spends above this
is its own.

    python -m uvicorn tests.bench.plain_app:app --port 8002
"""

from __future__ import annotations

import json

from fastapi import FastAPI, Request
from fastapi.responses import Response

app = FastAPI(title="plain floor (benchmark reference)")


@app.post("/v1/rerank")
async def rerank(request: Request) -> Response:
    """The first k candidates with their upstream scores."""
    body = json.loads(await request.body())
    k = int(body.get("k", 10))
    items = [{"item_id": c["item_id"], "score": c["score"]} for c in body["candidates"][:k]]
    out = {"request_id": body.get("request_id", ""), "model_version": "plain", "items": items,
           "degraded": False, "reason": None, "passes": 0}  # fmt: skip
    return Response(json.dumps(out), media_type="application/json")


@app.get("/readyz")
async def readyz() -> dict[str, bool]:
    """Always ready (nothing to load)."""
    return {"ready": True}
