"""HTTP header names between clients, gateway and replicas."""

from __future__ import annotations

# The gateway's request id; the replica uses it as its own request id, so logs, the request
# table and migrations name a request the same way everywhere.
REQUEST_ID_HEADER = "x-request-id"
# Which replica served the response (set by the gateway on every answer).
INSTANCE_HEADER = "x-llmfleet-instance"
# Prompt tokens the replica served from its prefix cache (reference engine; optional).
CACHED_TOKENS_HEADER = "x-llmfleet-cached-tokens"
