"""The processes a load run starts, where they run, and what they cost: a child process with
its log (`Child`), a uvicorn server on a free loopback port that is ready when /readyz
answers 200 (`Server`), the placement of the server and the load generator on the cores,
and CPU and memory read from /proc.

Shared by the load test (loadtest/run.py) and the HTTP benchmarks (tests/bench): both pin
the service to one core and the load to the others, before exec, so every thread the
process starts inherits the mask (as `taskset -c` does).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from loadtest.redis_server import free_port, pin_to

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"


class LoadTestError(RuntimeError):
    """The run cannot go on (a process did not start, a bad --url, ...)."""


def python_env() -> dict[str, str]:
    """This process's environment with the repository on PYTHONPATH (children run from it)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


# ---------------------------------------------------------------- placement


@dataclass(frozen=True)
class Placement:
    """Which cores each process started here may use (None: any)."""

    service: set[int] | None
    load: set[int] | None  # the load generator (and, in the load test, redis-server)
    text: str  # for the report


def placement(
    pin: bool,
    cpus: list[int] | None = None,
    load_cores: int | None = None,
    service: str = "service",
    load: str = "locust and redis-server",
) -> Placement:
    """The service on the first of `cpus` (default: this process's affinity), the load on
    the rest (at most `load_cores` of them); unpinned when asked, on one core, or where the
    platform cannot set an affinity. `service` and `load` name them in the text."""
    if cpus is None:
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not pin:
        return Placement(None, None, "not pinned (--no-pin): the scheduler's choice")
    if len(cpus) < 2 or not hasattr(os, "sched_setaffinity"):
        return Placement(None, None, f"not pinned: one core or no affinity control (cpus "
                         f"{cpus or 'unknown'}); load generator and service share")  # fmt: skip
    rest = cpus[1:] if load_cores is None else cpus[1 : 1 + load_cores]
    return Placement({cpus[0]}, set(rest), f"{service} on cpu {cpus[0]}; {load} on cpu "
                     f"{','.join(map(str, rest))}")  # fmt: skip


# ---------------------------------------------------------------- processes


class Child:
    """A process started here: its own session (Ctrl-C reaches us, and we stop it in
    order), output to a log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path,
                 cpus: set[int] | None = None) -> None:  # fmt: skip
        """cpus: its affinity, set before exec (every thread it starts inherits it)."""
        self.name, self.log_path = name, log_path
        with log_path.open("wb") as out:
            self.proc = subprocess.Popen(
                argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=pin_to(cpus),
            )  # fmt: skip

    def tail(self, n: int = 20) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def check_alive(self) -> None:
        """LoadTestError with the log's tail when the process has exited."""
        if self.proc.poll() is not None:
            raise LoadTestError(f"{self.name} exited ({self.proc.returncode}):\n{self.tail()}")

    def stop(self, sig: int = signal.SIGINT, grace_s: float = 15.0) -> None:
        """`sig` (SIGINT: uvicorn's graceful stop), then SIGKILL after grace_s."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def wait_ready(url: str, child: Child, timeout_s: float = 300.0) -> None:
    """/readyz 200 (the service: the bundle loaded and every bucket warmed)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        child.check_alive()
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass  # not listening yet, or 503 while warming up
        time.sleep(0.1)
    raise LoadTestError(f"{child.name} was not ready in {timeout_s:.0f} s:\n{child.tail()}")


class Server(Child):
    """A uvicorn server (argv without --host and --port) on HOST and a free port; its log
    in logdir/<name>.log."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], logdir: Path,
                 cpus: set[int] | None = None) -> None:  # fmt: skip
        self.port = free_port()
        argv = [*argv, "--host", HOST, "--port", str(self.port)]
        super().__init__(name, argv, env, logdir / f"{name}.log", cpus)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        wait_ready(self.url, self, timeout_s)


# ---------------------------------------------------------------- /proc


def process_cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads), seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    """A process's resident memory (VmRSS), MiB; NaN when /proc does not say."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def machine_cpu_s() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine so far, all cores (/proc/stat)."""
    user, nice, system, _, _, irq, softirq, steal = (
        int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    )
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, steal / tick
