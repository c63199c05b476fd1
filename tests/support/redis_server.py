"""The throwaway redis-server of the tests: the helper lives in loadtest/redis_server.py (the
load test starts one too); re-exported here for the tests' imports."""

from __future__ import annotations

from loadtest.redis_server import (
    RedisProcess,
    find_redis_server,
    free_cluster_port,
    free_port,
)

__all__ = ["RedisProcess", "find_redis_server", "free_cluster_port", "free_port"]
