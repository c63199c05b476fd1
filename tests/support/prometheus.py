"""A real Prometheus (Debian's `prometheus` package) on loopback, running the repository's
deploy/prometheus configuration and alert rules against services started by a test.

Two changes make a test's minutes out of the rules' hours, and nothing else is changed:
- the reranker job scrapes the given loopback targets (the compose stack finds replicas
  by DNS), every second, and the rules are evaluated every second;
- every duration of the rules (each `for:` and each range or subquery window) is divided
  by `speedup` (60: minutes become seconds), so an alert that waits 2 minutes waits 2 s.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from loadtest.redis_server import free_port

ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "gref-serve.json"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"(\d+)([smhd])")
_WINDOW = re.compile(r"\[([^\]]+)\]")


def find_prometheus() -> str | None:
    return shutil.which("prometheus")


def _faster(duration: str, speedup: int) -> str:
    """'5m' -> '5s' at speedup 60 (whole seconds, at least 1)."""
    seconds = sum(int(n) * _UNITS[u] for n, u in _DURATION.findall(duration))
    return f"{max(1, seconds // speedup)}s"


def compress_rules(text: str, speedup: int = 60) -> str:
    """The rules file with every `for:` and `[window]` / `[window:step]` divided."""
    rules = yaml.safe_load(text)
    for group in rules["groups"]:
        group["interval"] = "1s"
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = _faster(rule["for"], speedup)
            rule["expr"] = _WINDOW.sub(
                lambda m: "[" + ":".join(_faster(part, speedup) if part else part
                                         for part in m.group(1).split(":")) + "]",
                rule["expr"],
            )  # fmt: skip
    return str(yaml.safe_dump(rules, sort_keys=False))


class PrometheusProcess:
    """prometheus on a free loopback port with the repository's config (see the module's
    docstring), its data in a temporary directory; `stop()` removes both."""

    def __init__(self, binary: str, targets: list[str], speedup: int = 60) -> None:
        self.binary, self.port = binary, free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="gref-prometheus-"))
        config = yaml.safe_load((CONFIG_DIR / "prometheus.yml").read_text())
        config["global"].update(scrape_interval="1s", evaluation_interval="1s",
                                scrape_timeout="1s")  # fmt: skip
        for job in config["scrape_configs"]:
            if job["job_name"] == "reranker":
                job.pop("dns_sd_configs")
                job["static_configs"] = [{"targets": targets}]
            else:
                job["static_configs"] = [{"targets": [f"127.0.0.1:{self.port}"]}]
        (self.workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        for rules in config["rule_files"]:
            text = (CONFIG_DIR / rules).read_text()
            (self.workdir / rules).write_text(compress_rules(text, speedup))
        self.proc: subprocess.Popen[bytes] | None = None
        self.client = httpx.Client(base_url=self.url, timeout=10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> PrometheusProcess:
        argv = [self.binary, f"--config.file={self.workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"]  # fmt: skip
        log = (self.workdir / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: {self.log_tail()}")
            try:
                if self.client.get("/-/ready").status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"prometheus not ready: {self.log_tail()}")
            time.sleep(0.1)

    def log_tail(self) -> str:
        path = self.workdir / "prometheus.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector (or matrix/scalar as Prometheus gives it)."""
        out = self.client.get("/api/v1/query", params={"query": expr}).json()
        if out["status"] != "success":
            raise RuntimeError(f"{expr}: {out}")
        result = out["data"]["result"]
        if out["data"]["resultType"] == "scalar":
            return [{"metric": {}, "value": result}]
        return list(result)

    def alerts(self) -> dict[str, str]:
        """alertname -> state (pending or firing), from /api/v1/alerts."""
        out = self.client.get("/api/v1/alerts").json()["data"]["alerts"]
        states: dict[str, str] = {}
        for alert in out:
            name = alert["labels"]["alertname"]
            if states.get(name) != "firing":
                states[name] = alert["state"]
        return states

    def wait_alert(self, name: str, state: str | None, timeout: float = 60) -> float:
        """Wait until alert `name` is in `state` (None: neither pending nor firing);
        returns the seconds it took."""
        t0 = time.monotonic()
        while self.alerts().get(name) != state:
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"{name} not {state or 'inactive'} in {timeout} s: "
                                     f"{self.alerts()}")  # fmt: skip
            time.sleep(0.25)
        return time.monotonic() - t0

    def targets_up(self) -> bool:
        result = self.query('up{job="reranker"}')
        return bool(result) and all(r["value"][1] == "1" for r in result)

    def stop(self) -> None:
        self.client.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.workdir, ignore_errors=True)


def dashboard_queries(rate_interval: str = "15s") -> dict[str, list[str]]:
    """Every Grafana panel's queries, its variables given their values: panel -> exprs."""
    import json

    board = json.loads(DASHBOARD.read_text())
    values = {"$__rate_interval": rate_interval}
    for var in board["templating"]["list"]:
        values[f"${var['name']}"] = str(var["current"]["value"])
    panels: dict[str, list[str]] = {}
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in sorted(values.items(), key=lambda kv: -len(kv[0])):
                expr = expr.replace(name, value)
            panels.setdefault(panel["title"], []).append(expr)
    return panels
