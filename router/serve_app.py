"""The gateway as a Ray Serve ingress deployment.

Serve's own request router only balances among Serve replicas, so routing to external
replicas happens inside the ingress (``Gateway``) and requests are forwarded with httpx.
Each Serve replica builds its own ``Gateway`` from the same config; they agree through Redis.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from ray import serve
from ray.serve.deployment import Application

from router.gateway import Gateway, GatewayConfig, create_gateway_app


@serve.ingress()
class GatewayDeployment:
    """One gateway replica inside Ray Serve; the ASGI app is built after construction."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.gateway = Gateway(GatewayConfig(**config))

    def __serve_build_asgi_app__(self) -> Any:
        return create_gateway_app(self.gateway)

    async def check_health(self) -> None:
        await self.gateway.start()


def build_gateway_application(
    config: GatewayConfig, num_replicas: int = 1, max_ongoing_requests: int = 1024
) -> Application:
    """A Serve application of ``num_replicas`` gateway replicas.

    ``max_ongoing_requests`` is raised far above Serve's default (5): a gateway replica spends
    almost all of a request's life awaiting the backend, so it can carry thousands at once.
    """
    deployment = serve.deployment(
        name="llmfleet-gateway",
        num_replicas=num_replicas,
        max_ongoing_requests=max_ongoing_requests,
        ray_actor_options={"num_cpus": 0},
    )(GatewayDeployment)
    return deployment.bind(asdict(config))


def app_builder(args: dict[str, Any]) -> Application:
    """Entry point for ``serve run`` / Serve config files (``deploy/serve-config.yaml``).

    ``args`` are ``GatewayConfig`` fields plus ``num_replicas``; ``redis_url`` defaults to
    ``$REDIS_URL``.
    """
    import os

    fields = dict(args)
    replicas = int(fields.pop("num_replicas", 1))
    fields.setdefault("redis_url", os.environ.get("REDIS_URL", "redis://127.0.0.1:6379"))
    return build_gateway_application(GatewayConfig(**fields), num_replicas=replicas)
