"""Readers of the operations files (compose, Prometheus rules, the Grafana dashboard) and
of PromQL: the metric names an expression reads, the series a metric family stores."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]


COMPOSE = ROOT / "docker-compose.yml"


DOCKERFILE = ROOT / "Dockerfile"


DOCKERIGNORE = ROOT / ".dockerignore"


PROMETHEUS = ROOT / "deploy" / "prometheus"


GRAFANA = ROOT / "deploy" / "grafana"


DASHBOARD = GRAFANA / "dashboards" / "gref-serve.json"


CHECK_IMAGE = ROOT / "deploy" / "docker" / "check_image.py"


RUNBOOK = ROOT / "docs" / "operations.md"


# series Prometheus makes itself, not the service
PROMETHEUS_OWN = frozenset({"up", "ALERTS", "ALERTS_FOR_STATE", "scrape_duration_seconds"})


SERVING_STAGES = {"serve": "cpu", "serve-gpu": "gpu"}


def tool(name: str) -> str | None:
    """An executable of this venv (make test runs .venv/bin/pytest unactivated), else PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else shutil.which(name)


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60)


_STRINGS = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')


_MATCHERS = re.compile(r"\{[^{}]*\}")


_RANGES = re.compile(r"\[[^\[\]]*\]")


_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")


_VARIABLES = re.compile(r"\$\{?\w+\}?")  # Grafana's $budget_ms, ${x}, $__rate_interval


_DURATIONS = re.compile(r"(?<![\w:.])(?:\d+(?:ms|[smhdwy]))+(?![\w:])")


_NUMBERS = re.compile(r"(?<![\w:.])(?:0x[0-9a-fA-F]+|\d*\.?\d+(?:[eE][+-]?\d+)?)")


_IDENTIFIERS = re.compile(r"(?<![\w:])([a-zA-Z_:][\w:]*)(\s*\()?")


_KEYWORDS = frozenset(
    {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
     "bool", "offset", "inf", "nan"}
)  # fmt: skip


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: label matchers and values, ranges,
    grouping labels, Grafana variables, numbers, durations, keywords and functions (a name
    followed by a parenthesis) are not."""
    text = _STRINGS.sub(" ", expr)
    for pattern in (_MATCHERS, _RANGES, _GROUPING, _VARIABLES, _DURATIONS, _NUMBERS):
        text = pattern.sub(" ", text)
    return {
        m.group(1)
        for m in _IDENTIFIERS.finditer(text)
        if m.group(2) is None and m.group(1).lower() not in _KEYWORDS
    }


def series_names(families: Iterable[Any]) -> set[str]:
    """The series names Prometheus stores for these metric families (prometheus_client's
    collect() or its text parser): counter x -> x_total; histogram x -> x_bucket, x_sum,
    x_count; gauge x -> x; plus the samples actually present."""
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_sum", "_count"),
        "summary": ("", "_sum", "_count"),
    }
    names: set[str] = set()
    for family in families:
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def unknown_names(exprs: dict[str, str], known: set[str]) -> dict[str, set[str]]:
    """{where: names it reads that are neither in `known` nor Prometheus' own}."""
    found = {where: promql_metric_names(expr) - known - PROMETHEUS_OWN for where, expr in
             exprs.items()}  # fmt: skip
    return {where: names for where, names in found.items() if names}


def load_yaml(path: Path) -> Any:
    with path.open() as f:
        return yaml.safe_load(f)


def admin_port() -> int:
    """The rerankers' admin port in the compose stack (probes and scrapes go there)."""
    return int(load_yaml(COMPOSE)["x-serve-env"]["RERANK_ADMIN_PORT"])


def alert_rules() -> list[dict[str, Any]]:
    doc = load_yaml(PROMETHEUS / "alerts.yml")
    return [rule for group in doc["groups"] for rule in group["rules"]]


def dashboard_exprs() -> dict[str, str]:
    """{panel title / refId: expr} of every query of the dashboard (rows included)."""

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for item in items:
            yield item
            yield from panels(item.get("panels", []))

    board = json.loads(DASHBOARD.read_text())
    return {
        f"{p['title']} / {t['refId']}": t["expr"]
        for p in panels(board["panels"])
        for t in p.get("targets", [])
    }


def alert_exprs() -> dict[str, str]:
    return {rule["alert"]: rule["expr"] for rule in alert_rules()}


def panel_exprs(title: str) -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    (panel,) = [p for p in board["panels"] if p["title"] == title]
    return [t["expr"] for t in panel["targets"]]


_SERIES = re.compile(r"^\s*([a-zA-Z_:][\w:]*)\s*(?:\{(.*)\})?\s*$")


_LABEL = re.compile(r'\s*(\w+)\s*=\s*"((?:\\.|[^"\\])*)"\s*,?')


def parse_series(text: str) -> tuple[str, dict[str, str]]:
    """'name{a="x", b="y"}' -> (name, {a: x, b: y}): promtool's input series notation."""
    match = _SERIES.match(text)
    assert match is not None, text
    labels, rest = {}, match.group(2) or ""
    while rest.strip():
        label = _LABEL.match(rest)
        assert label is not None, text
        labels[label.group(1)] = label.group(2)
        rest = rest[label.end() :]
    return match.group(1), labels


def slugs(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*$", markdown, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings}
