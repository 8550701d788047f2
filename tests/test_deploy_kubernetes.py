"""deploy/kubernetes: the manifests, against Kubernetes' own schema and against each other.

No cluster is needed: every manifest is checked against a pinned Kubernetes version's OpenAPI schema by
kubernetes-validate (strict: unknown fields are errors), and what a schema cannot express (probes on the right
paths, selectors matching pod labels, secrets only from the Secret) with PyYAML.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from admin.cli import build_parser
from tests.deploy_common import DEPLOY, console_script, load_yaml, load_yaml_documents

K8S = DEPLOY / "kubernetes"

# The Kubernetes version the manifests are validated against: one whose schemas kubernetes-validate bundles.
KUBERNETES_VERSION = "1.33.0"
# Not Kubernetes objects (kustomize's own file), so not given to kubernetes-validate.
NOT_KUBERNETES_OBJECTS = {"kustomization.yaml"}
MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name not in NOT_KUBERNETES_OBJECTS)
# Environment variables that are secrets: in a Deployment only ever from a Secret.
GATEWAY_SECRET_ENV = {"RELAY_DATABASE_URL", "RELAY_REDIS_URL", "RELAY_ADMIN_TOKEN", "RELAY_SECRET_KEY",
                      "RELAY_METRICS_TOKEN"}
WORKER_SECRET_ENV = {"WORKER_METRICS_TOKEN"}
SECRET_ENV = GATEWAY_SECRET_ENV | WORKER_SECRET_ENV
OPTIONAL_SECRET_ENV = {"RELAY_METRICS_TOKEN", "WORKER_METRICS_TOKEN"}  # unset: /metrics is open


# --- helpers -------------------------------------------------------------------------------------------------


def _kubernetes_validate(path: Path) -> tuple[bool, str]:
    """(valid, output). kubernetes-validate exits 0 on a kind it has no schema for (only a warning), so a
    document counts as valid only when the tool says it passed, and any warning fails the file."""
    exe = console_script("kubernetes-validate")
    command = [exe] if exe else [sys.executable, "-m", "kubernetes_validate"]
    result = subprocess.run([*command, "--strict", "-k", KUBERNETES_VERSION, str(path)],
                            capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    documents = load_yaml_documents(path)
    passed = output.count("passed for resource")
    return result.returncode == 0 and "WARN" not in output and passed == len(documents), output


def _objects() -> list[dict]:
    return [doc for path in MANIFESTS for doc in load_yaml_documents(path)]


def _one(kind: str, name: str) -> dict:
    found = [o for o in _objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def _deployments() -> list[dict]:
    return [o for o in _objects() if o["kind"] == "Deployment"]


def _container(deployment: dict) -> dict:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, "one container per pod"
    return containers[0]


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _secret() -> dict:
    secrets = [o for o in _objects() if o["kind"] == "Secret"]
    assert len(secrets) == 1
    return secrets[0]


def _gateway() -> dict:
    return _one("Deployment", "policy-relay-gateway")


def _worker() -> dict:
    return _one("Deployment", "policy-relay-worker")


def _port_number(container: dict, port: int | str) -> int:
    if isinstance(port, int):
        return port
    numbers = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    assert numbers, f"no container port named {port!r}"
    return numbers[0]


# --- schema ----------------------------------------------------------------------------------------------------


def test_the_pinned_kubernetes_version_is_bundled() -> None:
    import kubernetes_validate

    schemas = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    assert (schemas / f"v{KUBERNETES_VERSION}-local-strict").is_dir(), sorted(p.name for p in schemas.iterdir())


def test_there_are_manifests() -> None:
    kinds = {o["kind"] for o in _objects()}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Secret",
            "PersistentVolumeClaim"} <= kinds


@pytest.mark.parametrize("path", MANIFESTS, ids=[p.name for p in MANIFESTS])
def test_manifest_matches_the_kubernetes_schema(path: Path) -> None:
    valid, output = _kubernetes_validate(path)
    assert valid, output


@pytest.mark.parametrize(
    "broken",
    [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
         "spec": {"selectr": {"a": "b"}, "ports": [{"port": 80}]}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {"ports": [{"port": "eighty"}]}},
        {"apiVersion": "v1", "kind": "Sevice", "metadata": {"name": "x"}},
    ],
    ids=["unknown-field", "wrong-type", "unknown-kind"],
)
def test_schema_check_rejects_broken_manifest(tmp_path: Path, broken: dict) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(broken))
    valid, output = _kubernetes_validate(path)
    assert not valid, f"kubernetes-validate accepted a broken manifest:\n{output}"


def test_kustomization_lists_every_manifest_but_the_secret_example() -> None:
    kustomization = load_yaml(K8S / "kustomization.yaml")
    assert kustomization["kind"] == "Kustomization"
    resources = kustomization["resources"]
    assert len(resources) == len(set(resources))
    assert all((K8S / r).is_file() for r in resources)
    # The example Secret holds placeholders: it is created by hand, never applied by `kubectl apply -k`.
    assert set(resources) == {p.name for p in MANIFESTS} - {"secret.example.yaml"}
    assert "namespace" not in kustomization


def test_manifests_are_namespace_agnostic() -> None:
    for obj in _objects():
        assert "namespace" not in obj["metadata"], f"{obj['kind']} {obj['metadata']['name']} pins a namespace"


# --- the gateway -----------------------------------------------------------------------------------------------


def test_gateway_command_probes_and_port() -> None:
    gateway = _gateway()
    container = _container(gateway)
    args = build_parser().parse_args(container["command"][1:])  # only flags `policy-relay serve` has
    assert container["command"][0] == "policy-relay" and args.command == "serve"
    assert args.host == "0.0.0.0" and args.port == 8080
    assert _port_number(container, "http") == 8080

    worker_service = _one("Service", "policy-relay-worker")
    assert args.worker_url == f"http://policy-relay-worker:{worker_service['spec']['ports'][0]['port']}"

    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert container["startupProbe"]["httpGet"]["path"] in ("/health/live", "/health/ready")
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert _port_number(container, container[probe]["httpGet"]["port"]) == args.port
    # serve waits up to 600 s for the worker before it listens: the startup probe must outlast that.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] > 600

    env = _env(container)
    assert env["RELAY_LOG_FORMAT"]["value"] == "json"
    drain = float(env["RELAY_DRAIN_TIMEOUT_S"]["value"])
    assert gateway["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > drain


def test_gateway_is_scraped_by_prometheus() -> None:
    gateway = _gateway()
    annotations = gateway["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == _port_number(_container(gateway), "http")


def test_gateway_replicas_hpa_and_pdb() -> None:
    gateway = _gateway()
    pod_labels = gateway["spec"]["template"]["metadata"]["labels"]
    assert gateway["spec"]["replicas"] >= 2

    hpa = _one("HorizontalPodAutoscaler", "policy-relay-gateway")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": gateway["metadata"]["name"]}
    assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"
    assert 0 < metric["resource"]["target"]["averageUtilization"] <= 100
    # Utilization is measured against the CPU request, which must therefore be set.
    assert _container(gateway)["resources"]["requests"]["cpu"]

    pdb = _one("PodDisruptionBudget", "policy-relay-gateway")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["minAvailable"] == 1
    selector = pdb["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    assert not selector.items() <= _worker()["spec"]["template"]["metadata"]["labels"].items()


# --- the worker ------------------------------------------------------------------------------------------------


def test_worker_gpu_model_volume_and_probes() -> None:
    worker = _worker()
    container = _container(worker)
    args = build_parser().parse_args(container["command"][1:])  # only flags `policy-relay worker` has
    assert container["command"][0] == "policy-relay" and args.command == "worker"
    assert args.host == "0.0.0.0" and args.port == 8001 and args.device == "cuda" and args.model
    assert _port_number(container, "http") == args.port

    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
        assert _port_number(container, container[probe]["httpGet"]["port"]) == args.port

    pvc = _one("PersistentVolumeClaim", "policy-relay-models")
    assert pvc["spec"]["resources"]["requests"]["storage"]
    volumes = {v["name"]: v for v in worker["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert volumes[mounts["/models"]]["persistentVolumeClaim"]["claimName"] == "policy-relay-models"
    assert _env(container)["RELAY_MODEL_CACHE"]["value"] == "/models"
    # A ReadWriteOnce volume and one GPU: the old pod goes before the new one starts.
    assert worker["spec"]["strategy"]["type"] == "Recreate"

    annotations = worker["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and int(annotations["prometheus.io/port"]) == args.port


# --- both Deployments ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["policy-relay-gateway", "policy-relay-worker"])
def test_pods_run_locked_down(name: str) -> None:
    deployment = _one("Deployment", name)
    pod = deployment["spec"]["template"]["spec"]
    container = _container(deployment)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert isinstance(pod["securityContext"]["runAsUser"], int) and pod["securityContext"]["runAsUser"] > 0
    assert pod.get("automountServiceAccountToken") is False
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    # The read-only root needs a writable /tmp (the gateway's Prometheus multiprocess files live there).
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    resources = container["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"] and resources["limits"]["memory"]


def test_secrets_come_only_from_the_secret() -> None:
    secret = _secret()
    keys = set(secret["stringData"])
    assert keys == SECRET_ENV
    # The example holds placeholders only, each marked for replacing.
    assert all("REPLACE_ME" in value for value in secret["stringData"].values())

    assert set(_env(_container(_gateway()))) >= GATEWAY_SECRET_ENV
    assert set(_env(_container(_worker()))) >= WORKER_SECRET_ENV
    for deployment in _deployments():
        container = _container(deployment)
        for source in container.get("envFrom", []):
            assert set(source) <= {"secretRef", "prefix"}, "configuration with secrets comes from the Secret"
        for name, entry in _env(container).items():
            looks_secret = name in SECRET_ENV or re.search(r"TOKEN|PASSWORD|SECRET|_KEY$|_URL$", name)
            value = str(entry.get("value", ""))
            assert not re.search(r"://[^/@\s]*:[^/@\s]*@", value), f"{name} carries credentials in plain text"
            if looks_secret:
                ref = entry.get("valueFrom", {}).get("secretKeyRef")
                assert ref and "value" not in entry, f"{name} in {deployment['metadata']['name']} is not from a Secret"
                assert ref["name"] == secret["metadata"]["name"] and ref["key"] in keys
                assert bool(ref.get("optional", False)) == (name in OPTIONAL_SECRET_ENV)


def test_secret_urls_point_at_the_external_services() -> None:
    data = _secret()["stringData"]
    postgres = _one("Service", "policy-relay-postgres")
    redis = _one("Service", "policy-relay-redis")
    assert data["RELAY_DATABASE_URL"].startswith("postgresql://")
    assert f"@policy-relay-postgres:{postgres['spec']['ports'][0]['port']}/" in data["RELAY_DATABASE_URL"]
    redis_url = rf"redis://([^@/]*@)?policy-relay-redis:{redis['spec']['ports'][0]['port']}/"
    assert re.match(redis_url, data["RELAY_REDIS_URL"])


@pytest.mark.parametrize("name", ["policy-relay-postgres", "policy-relay-redis"])
def test_postgres_and_redis_are_external(name: str) -> None:
    service = _one("Service", name)
    assert service["spec"]["type"] == "ExternalName"
    assert service["spec"]["externalName"] and "selector" not in service["spec"]
    path = next(p for p in MANIFESTS if any(d and d["metadata"]["name"] == name
                                            for d in load_yaml_documents(p)))
    assert path.read_text().startswith("#"), f"{path.name} should say at its top what to replace"
    assert "REPLACE" in path.read_text()


def test_services_select_their_pods() -> None:
    services = [o for o in _objects() if o["kind"] == "Service" and o["spec"].get("type") != "ExternalName"]
    assert {s["metadata"]["name"] for s in services} == {"policy-relay", "policy-relay-worker"}
    for service in services:
        selector = service["spec"]["selector"]
        matched = [d for d in _deployments() if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(matched) == 1, f"Service {service['metadata']['name']} selects {len(matched)} Deployments"
        container = _container(matched[0])
        for port in service["spec"]["ports"]:
            _port_number(container, port["targetPort"])
    for deployment in _deployments():
        assert deployment["spec"]["selector"]["matchLabels"].items() <= \
            deployment["spec"]["template"]["metadata"]["labels"].items()
    assert _one("Service", "policy-relay")["spec"]["ports"][0]["port"] == 8080
    assert _one("Service", "policy-relay-worker")["spec"]["ports"][0]["port"] == 8001

