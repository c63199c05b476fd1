"""The Redis fixture gives a real, working server (the integration tests depend on it)."""

from __future__ import annotations

import pytest
import redis

pytestmark = pytest.mark.integration


def test_session_redis_round_trip(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    payload = bytes(range(256))  # binary-safe: embeddings are raw bytes
    client.set("gref-test:emb:v0:1", payload)
    client.set("gref-test:emb:v0:2", b"x")
    assert client.mget(["gref-test:emb:v0:1", "gref-test:emb:v0:2", "gref-test:missing"]) == [
        payload,
        b"x",
        None,
    ]
    assert client.info("server")["redis_version"]


def test_private_redis_stops_and_restarts(redis_process) -> None:  # type: ignore[no-untyped-def]
    client = redis.Redis.from_url(redis_process.url, socket_timeout=0.5)
    assert client.ping()
    redis_process.stop()
    assert not redis_process.ping()
    with pytest.raises(redis.exceptions.ConnectionError):
        client.ping()
    redis_process.start()
    # the same port answers again and the client reconnects by itself
    assert client.ping()
