"""deploy/kuberay-rayservice.yaml against KubeRay's RayService CRD schema, strictly.

The API server prunes fields a CRD's schema does not know, silently; here every object
schema without ``additionalProperties`` or ``x-kubernetes-preserve-unknown-fields`` is
closed, so a misspelt field is an error (as ``kubectl apply --validate=strict`` would say).
The Deployments' pod templates are checked against the same Kubernetes PodTemplateSpec
schema the CRD embeds. Then the pieces must fit: the gateway is the repository's Serve
application, the fast ingress's env is set, GPU workers ask for the GPUs Ray is told of, and
every Redis URL names the Redis Service of deploy/redis.yaml.
"""

from __future__ import annotations

import copy
import gzip
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from router.serve_app import app_builder

ROOT = Path(__file__).resolve().parents[2]
CRD = Path(__file__).parent / "data" / "ray.io_rayservices-v1.6.2.yaml.gz"


def _strict(schema: Any) -> Any:
    """``schema`` with every object schema closed to properties it does not name."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def rayservice_schema() -> dict[str, Any]:
    # libyaml's loader where PyYAML has it: the CRD is 1 MB of YAML.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load(gzip.decompress(CRD.read_bytes()), Loader=loader)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return _strict(version["schema"]["openAPIV3Schema"])


@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    return list(yaml.safe_load_all((ROOT / "deploy" / "kuberay-rayservice.yaml").read_text()))


def _errors(schema: dict[str, Any], instance: Any) -> list[str]:
    validator = jsonschema.Draft7Validator(schema)
    return sorted(f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
                  for e in validator.iter_errors(instance))


def _pod_template_schema(schema: dict[str, Any]) -> dict[str, Any]:
    spec = schema["properties"]["spec"]["properties"]["rayClusterConfig"]["properties"]
    return copy.deepcopy(spec["headGroupSpec"]["properties"]["template"])


def test_rayservice_is_valid_under_the_crd_schema(rayservice_schema: dict[str, Any],
                                                  docs: list[dict[str, Any]]) -> None:
    service = docs[0]
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    assert _errors(rayservice_schema, service) == []


def test_the_strict_check_catches_a_misspelt_field(rayservice_schema: dict[str, Any],
                                                    docs: list[dict[str, Any]]) -> None:
    broken = copy.deepcopy(docs[0])
    group = broken["spec"]["rayClusterConfig"]["workerGroupSpecs"][1]
    group["replica"] = group.pop("replicas")
    group["template"]["spec"]["containers"][0]["resource"] = {}
    errors = _errors(rayservice_schema, broken)
    assert any("'replica' was unexpected" in e for e in errors)
    assert any("'resource' was unexpected" in e for e in errors)


def test_deployments_pod_templates_are_valid(rayservice_schema: dict[str, Any],
                                             docs: list[dict[str, Any]]) -> None:
    template_schema = _pod_template_schema(rayservice_schema)
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    deployments += [d for d in yaml.safe_load_all((ROOT / "deploy" / "redis.yaml").read_text())
                    if d["kind"] == "Deployment"]
    assert {d["metadata"]["name"] for d in deployments} == {"llmfleet-replicas",
                                                            "llmfleet-redis"}
    for deployment in deployments:
        assert deployment["apiVersion"] == "apps/v1"
        spec = deployment["spec"]
        assert set(spec) <= {"replicas", "selector", "template", "strategy",
                             "minReadySeconds", "revisionHistoryLimit"}
        labels = spec["template"]["metadata"]["labels"]
        assert spec["selector"]["matchLabels"].items() <= labels.items()
        assert _errors(template_schema, spec["template"]) == []


def test_the_gateway_is_the_repository_serve_application(docs: list[dict[str, Any]]) -> None:
    serve = yaml.safe_load(docs[0]["spec"]["serveConfigV2"])
    ours = yaml.safe_load((ROOT / "deploy" / "serve-config.yaml").read_text())
    app, our_app = serve["applications"][0], ours["applications"][0]
    assert app["import_path"] == our_app["import_path"] == "router.serve_app:app_builder"
    assert app["route_prefix"] == "/" and app["args"]["auth"] is True
    built = app_builder(app["args"])._bound_deployment
    assert built.num_replicas == app["args"]["num_replicas"]
    # KubeRay's serve Service targets the container port named "serve".
    port = serve["http_options"]["port"]
    head = docs[0]["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    assert {"name": "serve", "containerPort": port} in head["containers"][0]["ports"]


def test_ingress_env_gpus_and_redis_fit_together(docs: list[dict[str, Any]]) -> None:
    cluster = docs[0]["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            env = {e["name"]: e["value"] for e in container["env"]}
            assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    gpu = next(g for g in cluster["workerGroupSpecs"] if g["groupName"] == "gpu")
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == gpu["rayStartParams"]["num-gpus"]
    supervisor = next(d for d in docs if d["kind"] == "Deployment")
    command = supervisor["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:2] == ["llmfleet", "replicas"]
    assert f"--num-gpus={gpu['rayStartParams']['num-gpus']}" in command
    assert "--ray-address=ray://llmfleet-head-svc:10001" in command  # <name>-head-svc

    redis = {d["kind"]: d for d in yaml.safe_load_all(
        (ROOT / "deploy" / "redis.yaml").read_text())}
    service = redis["Service"]
    redis_port = service["spec"]["ports"][0]["port"]
    urls = [e["value"] for g in groups for c in g["template"]["spec"]["containers"]
            for e in c["env"] if e["name"] == "REDIS_URL"]
    urls.append(yaml.safe_load(docs[0]["spec"]["serveConfigV2"])
                ["applications"][0]["args"]["redis_url"])
    urls += [a.split("=", 1)[1] for a in command if a.startswith("--redis-url=")]
    assert len(urls) == len(groups) + 2
    for url in urls:
        parts = urlsplit(url)
        assert (parts.hostname, parts.port) == (service["metadata"]["name"], redis_port)
    assert service["spec"]["selector"].items() <= \
        redis["Deployment"]["spec"]["template"]["metadata"]["labels"].items()
