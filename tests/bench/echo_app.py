"""The framework's floor for tests/bench/bench_http.py: POST /v1/rerank parses the body the
way the service does (RequestReader.read_json: the fast path, or the pydantic-checked one,
with the bundle's feature schema and the service's default limits) and answers a response
of the service's shape (the first k candidates, upstream scores) serialized the same way
(orjson). No engine, no cache, no metrics: what is left is uvicorn + FastAPI (configured
as the service configures it: service/routing.py) + the parse + orjson, the cost every
request pays before the model does anything.

    GREF_ECHO_BUNDLE=artifacts python -m uvicorn tests.bench.echo_app:app --port 8001
"""

from __future__ import annotations

import os
from pathlib import Path

import orjson
from fastapi import Request
from fastapi.responses import Response

from contract.bundle import read_manifest
from contract.features import FeatureSchema
from service.api import ApiError, Limits
from service.app import SERVER_TIMING, header, new_request_id
from service.request_reader import RequestReader
from service.routing import DirectRoute, make_app
from service.settings import Settings, resolve_bundle_dir

_JSON = "application/json"
_ZERO_TIMINGS = {"queue_ms": 0.0, "cache_ms": 0.0, "encode_ms": 0.0, "decode_ms": 0.0,
                 "total_ms": 0.0}  # fmt: skip

_bundle = resolve_bundle_dir(Path(os.environ.get("GREF_ECHO_BUNDLE", "artifacts")))
_cfg = read_manifest(_bundle)["model_config"]
_defaults = Settings.model_fields
READER = RequestReader(
    FeatureSchema.from_dict(_cfg["schema"]),
    Limits(max_candidates=int(_cfg["max_candidates"]), max_k=int(_defaults["max_k"].default)),
)

# the service's framework configuration (service/routing.py): the floor stays its floor
app = make_app(title="gref-serve echo (benchmark floor)")


async def rerank(request: Request) -> Response:
    """The first k candidates, in a body of RerankOut's shape, with the service's headers
    (X-Request-ID, from the header or generated as the service does; Server-Timing)."""
    request_id = header(request, b"x-request-id") or new_request_id()
    try:
        p = READER.read_json(await request.body())
    except ApiError as e:
        return Response(orjson.dumps(e.body()), status_code=e.status, media_type=_JSON,
                        headers={"X-Request-ID": request_id})  # fmt: skip
    body = {
        "request_id": p.request_id or request_id,
        "model_version": "echo",
        "items": [  # float32 scores, as the service writes them
            {"item_id": i, "score": s}
            for i, s in zip(p.answer_ids(slice(0, p.k)), p.upstream_score[: p.k], strict=True)
        ],
        "degraded": False,
        "reason": None,
        "passes": 0,
        "timings": _ZERO_TIMINGS,
    }
    headers = {"X-Request-ID": p.request_id or request_id,
               "Server-Timing": SERVER_TIMING % (0.0, 0.0, 0.0, 0.0, 0.0)}  # fmt: skip
    return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), media_type=_JSON,
                    headers=headers)  # fmt: skip


app.router.add_api_route("/v1/rerank", rerank, methods=["POST"], route_class_override=DirectRoute)


@app.get("/readyz")
async def readyz() -> dict[str, bool]:
    """Always ready (nothing to load)."""
    return {"ready": True}
