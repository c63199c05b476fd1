"""Fixtures every test folder may use, registered in tests/conftest.py: the tiny exported
bundle (built once per run), a one-node Redis Cluster, and the simulator tests' small
world and its logs (generated once per run)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import redis

from tests.support.redis_server import find_redis_server, free_cluster_port

if TYPE_CHECKING:
    from model.data import ListBatch
    from model.network import GenReranker
    from model.world import World


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, GenReranker]:
    """A tiny random model exported with --items and --fp16: (bundle dir, torch model).
    Built on first use only (torch and the exporter are imported then)."""
    from tests.support.bundle import build_tiny_bundle

    return build_tiny_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture
def cluster_node(tmp_path: Path) -> Iterator[str]:
    """A one-node Redis Cluster owning every slot: the cluster protocol (MOVED, CROSSSLOT)
    without three masters."""
    binary = find_redis_server()
    if binary is None:
        pytest.fail("no redis-server")
    port = free_cluster_port()
    proc = subprocess.Popen(
        [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path), "--cluster-enabled", "yes",
         "--cluster-config-file", str(tmp_path / "nodes.conf")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        plain = redis.Redis(port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                plain.execute_command("CLUSTER", "ADDSLOTS", *range(16384))  # Redis 6: no RANGE
                break
            except redis.ConnectionError:
                assert proc.poll() is None, f"cluster node exited ({proc.returncode})"
                assert time.monotonic() < deadline, "cluster node did not start"
                time.sleep(0.05)
        while b"cluster_state:ok" not in plain.execute_command("CLUSTER", "INFO"):
            assert time.monotonic() < deadline, "cluster not ok"
            time.sleep(0.05)
        plain.close()
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="session")
def world() -> World:
    """tests.support.simulated.SMALL generated with seed 7."""
    from model.world import World
    from tests.support.simulated import SMALL

    return World.generate(SMALL, seed=7)


@pytest.fixture(scope="session")
def logs() -> tuple[World, ListBatch]:
    """1,500 simulated requests of SMALL, seed 7, and their world."""
    from model.simulated_logs import generate_logs
    from tests.support.simulated import SMALL

    return generate_logs(SMALL, seed=7, n_requests=1_500, chunk=600, progress=False)
