"""The Serve config in deploy/ names a builder that really builds the gateway application."""

from __future__ import annotations

from pathlib import Path

import yaml

from router.serve_app import app_builder


def test_serve_config_builds_gateway_app() -> None:
    root = Path(__file__).resolve().parents[2]
    config = yaml.safe_load((root / "deploy" / "serve-config.yaml").read_text())
    app_config = config["applications"][0]
    assert app_config["import_path"] == "router.serve_app:app_builder"
    app = app_builder(app_config["args"])
    deployment = app._bound_deployment
    assert deployment.name == "llmfleet-gateway"
    assert deployment.num_replicas == app_config["args"]["num_replicas"]
    assert deployment.max_ongoing_requests >= 1000
