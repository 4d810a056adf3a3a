"""The docker-compose deployment, checked without a Docker engine."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml
from compose_spec import PyCompose

from decoding.grammar import VLLM_GRAMMAR_PLUGIN
from server.config import Settings
from server.metrics import Metrics

DEPLOY = Path(__file__).parents[3] / "deploy"


def compose() -> dict[str, Any]:
    # PyYAML resolves anchors and merge keys (as docker compose does) before the strict parse.
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def test_compose_file_follows_the_compose_specification():
    parsed = PyCompose.from_yaml(yaml.safe_dump(compose()))
    assert set(parsed.service_names()) == {
        "gateway", "base-worker", "chat-worker", "reward-worker", "valkey", "otel-collector", "jaeger", "prometheus",
        "grafana",
    }  # fmt: skip


def test_workers_share_one_definition_and_reserve_gpus():
    services = compose()["services"]
    for name in ("base-worker", "chat-worker", "reward-worker"):
        worker = services[name]
        assert worker["image"] == "alignd-worker:latest"
        assert worker["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
        assert "--served-model-name" in worker["command"]
    assert "pooling" in services["reward-worker"]["command"]


def test_generation_workers_load_the_grammar_plugin_the_gateway_expects():
    settings = Settings.load(DEPLOY / "compose.alignd.yaml")
    services = compose()["services"]
    for model in settings.models:
        assert model.vllm.grammar_plugin
        for url in model.vllm.urls:
            command = services[urlparse(url).hostname]["command"]
            assert command[command.index("--logits-processors") + 1] == VLLM_GRAMMAR_PLUGIN


def test_the_gateway_config_loads_and_points_at_compose_services():
    settings = Settings.load(DEPLOY / "compose.alignd.yaml")
    services = compose()["services"]
    urls = [url for entry in [*settings.models, *settings.scorers] for url in entry.vllm.urls]
    assert urls
    for url in urls:
        parsed = urlparse(url)
        assert parsed.hostname in services and parsed.port == 8000
    gateway = services["gateway"]
    assert any(volume.startswith("./compose.alignd.yaml:") for volume in gateway["volumes"])
    assert set(gateway["depends_on"]) == {"base-worker", "chat-worker", "reward-worker", "valkey"}


def test_the_gateway_needs_keys_kept_in_the_persistent_valkey_service():
    settings = Settings.load(DEPLOY / "compose.alignd.yaml")
    assert settings.auth.enabled and settings.state.url is not None
    valkey = compose()["services"]["valkey"]
    assert urlparse(settings.state.url).hostname == "valkey" and "ports" not in valkey
    assert valkey["command"][valkey["command"].index("--appendonly") + 1] == "yes"
    assert any(volume.endswith(":/data") for volume in valkey["volumes"])


def test_the_gateway_has_time_to_drain_before_it_is_killed():
    settings = Settings.load(DEPLOY / "compose.alignd.yaml")
    grace = compose()["services"]["gateway"]["stop_grace_period"]
    assert re.fullmatch(r"\d+s", grace) and int(grace[:-1]) > settings.drain_timeout_s


def test_prometheus_scrapes_existing_services():
    services = compose()["services"]
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = [t for job in config["scrape_configs"] for group in job["static_configs"] for t in group["targets"]]
    assert {target.split(":")[0] for target in targets} == {"gateway", "base-worker", "chat-worker", "reward-worker"}
    assert all(target.split(":")[0] in services for target in targets)


def test_dashboard_queries_name_real_metrics():
    rendered = Metrics().render().decode().splitlines()
    families = {re.sub(r"_total$", "", line.split()[2]) for line in rendered if line.startswith("# TYPE ")}
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "alignd.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            names = re.findall(r"\b(alignd_[a-z_]+|vllm:[a-z_]+)", target["expr"])
            assert names, target["expr"]
            for name in names:
                if name.startswith("alignd_"):
                    assert re.sub(r"_(total|bucket|count|sum)$", "", name) in families, name


def test_traces_go_from_the_gateway_and_the_workers_through_the_collector_to_jaeger():
    settings = Settings.load(DEPLOY / "compose.alignd.yaml")
    services = compose()["services"]
    assert settings.tracing.enabled and urlparse(settings.tracing.endpoint).hostname == "otel-collector"
    collector = yaml.safe_load((DEPLOY / "otel-collector.yaml").read_text())
    assert {"grpc", "http"} <= set(collector["receivers"]["otlp"]["protocols"])
    (pipeline,) = collector["service"]["pipelines"].values()
    exporters = [collector["exporters"][name]["endpoint"] for name in pipeline["exporters"]]
    assert [endpoint.split(":")[0] for endpoint in exporters] == ["jaeger"] and "jaeger" in services
    for model in settings.models:
        command = services[urlparse(model.vllm.urls[0]).hostname]["command"]
        assert urlparse(command[command.index("--otlp-traces-endpoint") + 1]).hostname == "otel-collector"
