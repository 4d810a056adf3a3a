"""The Kubernetes manifests (``deploy/kubernetes``: a kustomize base and one overlay per way to reach models),
checked offline: every manifest against the Kubernetes API schemas (``kubernetes-validate``), each overlay's
gateway config against alignd's own schema, the references between them, and, where ``kubectl`` is
installed, each overlay as ``kubectl kustomize`` renders it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import kubernetes_validate
import pytest
import yaml

from server.config import Settings
from server.metrics import Metrics

KUBERNETES = Path(__file__).parents[3] / "deploy" / "kubernetes"
OVERLAYS = ["production-stack", "vllm-workers", "llm-d"]
KUBERNETES_VERSION = "1.33.0"
CUSTOM_KINDS = {"ServiceMonitor"}  # a CRD (Prometheus Operator): checked by hand below
# What an overlay's config may point at outside this repository: the router or inference gateway it runs behind.
EXTERNAL_SERVICES = {"production-stack": {"vllm-router-service"}, "llm-d": {"llm-d-inference-gateway"}}


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def kustomization(directory: Path) -> dict[str, Any]:
    return dict(yaml.safe_load((directory / "kustomization.yaml").read_text()))


def resources_of(directory: Path) -> list[dict[str, Any]]:
    """Every resource an overlay's kustomization lists, its bases' included."""
    found = []
    for entry in kustomization(directory)["resources"]:
        target = (directory / entry).resolve()
        found += resources_of(target) if target.is_dir() else documents(target)
    return found


def manifest_files() -> list[Path]:
    return sorted(path for path in KUBERNETES.rglob("*.yaml") if path.name not in ("kustomization.yaml", "alignd.yaml"))


@pytest.mark.parametrize("path", manifest_files(), ids=lambda path: str(path.relative_to(KUBERNETES)))
def test_every_manifest_follows_the_kubernetes_schemas(path: Path):
    for doc in documents(path):
        if doc["kind"] in CUSTOM_KINDS:
            continue
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_overlay_configures_the_gateway_with_alignds_own_schema(overlay: str, monkeypatch: pytest.MonkeyPatch):
    directory = KUBERNETES / overlay
    resources = resources_of(directory)
    (gateway,) = [
        doc for doc in resources if doc["kind"] == "Deployment" and doc["metadata"]["name"] == "alignd-gateway"
    ]
    pod = gateway["spec"]["template"]["spec"]
    for variable in pod["containers"][0]["env"]:  # the Secret's required values, as the pod gets them
        if not variable["valueFrom"]["secretKeyRef"].get("optional"):
            monkeypatch.setenv(variable["name"], "redis://valkey:6379/0")
    (generated,) = kustomization(directory)["configMapGenerator"]
    settings = Settings.load(directory / generated["files"][0])
    assert settings.state.url == "redis://valkey:6379/0", "the store comes from the Secret"
    assert {v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v} == {generated["name"]}
    assert pod["terminationGracePeriodSeconds"] > settings.drain_timeout_s
    services = {doc["metadata"]["name"] for doc in resources if doc["kind"] == "Service"}
    hosts = {urlparse(url).hostname for model in settings.models for url in model.vllm.urls}
    assert hosts and hosts <= services | EXTERNAL_SERVICES.get(overlay, set()), hosts
    assert settings.auth.enabled and settings.host == "0.0.0.0"


def test_the_gateway_is_probed_disrupted_scaled_and_scraped_as_alignd_serves():
    resources = resources_of(KUBERNETES / "base")
    by_kind = {doc["kind"]: doc for doc in resources}
    deployment = by_kind["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert (container["readinessProbe"]["httpGet"]["path"], container["livenessProbe"]["httpGet"]["path"]) == (
        "/ready", "/health",
    )  # fmt: skip
    assert by_kind["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert by_kind["Service"]["spec"]["selector"].items() <= labels.items()
    autoscaler = by_kind["HorizontalPodAutoscaler"]["spec"]
    assert autoscaler["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    metric = next(m["pods"]["metric"]["name"] for m in autoscaler["metrics"] if m["type"] == "Pods")
    assert metric in {family.name for family in Metrics().registry.collect()}, f"{metric} is not an alignd metric"
    monitor = by_kind["ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= by_kind["Service"]["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


def test_the_worker_deployments_request_gpus_and_load_alignds_plugin():
    workers = [doc for doc in resources_of(KUBERNETES / "vllm-workers") if doc["kind"] == "Deployment"]
    workers = [doc for doc in workers if doc["metadata"]["name"] != "alignd-gateway"]
    assert {doc["metadata"]["name"] for doc in workers} == {"alignd-base-worker", "alignd-chat-worker"}
    for worker in workers:
        (container,) = worker["spec"]["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert container["args"][container["args"].index("--logits-processors") + 1].startswith("decoding.grammar")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubectl_renders_each_overlay_into_valid_manifests(overlay: str):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the overlays are checked file by file above")
    rendered = subprocess.run([kubectl, "kustomize", str(KUBERNETES / overlay)], capture_output=True, text=True,
                              check=True, timeout=60).stdout  # fmt: skip
    docs = [doc for doc in yaml.safe_load_all(rendered) if doc]
    (config,) = [doc for doc in docs if doc["kind"] == "ConfigMap"]
    gateway = next(doc for doc in docs if doc["metadata"]["name"] == "alignd-gateway" and doc["kind"] == "Deployment")
    volumes = gateway["spec"]["template"]["spec"]["volumes"]
    assert config["metadata"]["name"] in {v.get("configMap", {}).get("name") for v in volumes}  # the hashed name
    for doc in docs:
        if doc["kind"] not in CUSTOM_KINDS:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
