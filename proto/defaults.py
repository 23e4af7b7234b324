"""Defaults every part shares, defined once.

The gateway, the replicas, the simulator and the CLI read these; a default that two parts
must agree on (the heartbeat TTL a replica writes and the gateway trusts, the SLO a policy
protects and `up` advertises) lives nowhere else.
"""

from __future__ import annotations

from proto.profiles import profile_fields

# Time-to-first-token SLO the routing policies protect, seconds.
DEFAULT_SLO_TTFT_S = 3.0
# A replica's registry entry expires this long after its last heartbeat; replicas
# heartbeat every third of it.
DEFAULT_HEARTBEAT_TTL_S = 3.0
# Redis key prefix of one fleet's state.
DEFAULT_NAMESPACE = "llmfleet"
# The gateway re-reads the registry this often, seconds.
DEFAULT_REFRESH_INTERVAL_S = 0.2
# How long the control-loop leader's lease lasts, seconds.
DEFAULT_LEADER_LEASE_S = 2.0
# The routing policy `up` and `gateway` use when none is named.
DEFAULT_POLICY = "dualmap"
# The hardware profile assumed for replicas when none is named, and what policies assume
# about a replica they know nothing about (its prefill cost per token, its KV capacity).
DEFAULT_PROFILE = "h100-llama3-8b"
DEFAULT_PREFILL_S_PER_TOKEN: float = float(profile_fields(DEFAULT_PROFILE)["prefill_s_per_token"])
DEFAULT_CACHE_CAPACITY_TOKENS: int = int(profile_fields(DEFAULT_PROFILE)["kv_capacity_tokens"])
# Request body limit of the gateway (a 128k-token prompt as JSON text is a few MiB).
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
