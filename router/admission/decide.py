"""The routing decision under an admission mode (the gateway's ``decide`` seam uses it too).

Without pools this is ``policy.route``. With spatial pools (``laps-spatial``) the class of a
request depends on its uncached tokens, which depend on where it goes; so:

1. route on the whole fleet; the decision's cached-prefix estimate gives the class;
2. if the chosen instance is in that class's pool, keep it; a short request that is short
   *because* of the prefix cached there keeps it too (its prefill is cheap anywhere it is
   cached; sending follow-up turns of a conversation whose first turn was long to a cold
   short-pool instance would make them long again);
3. otherwise route again on the pool's snapshot (the other pool draining).
"""

from __future__ import annotations

from router.admission.interfaces import SHORT, Admission
from router.policy.interfaces import ClusterSnapshot, Decision, RoutingPolicy, RoutingRequest


def route(
    policy: RoutingPolicy,
    admission: Admission,
    request: RoutingRequest,
    snapshot: ClusterSnapshot,
    now: float,
) -> Decision:
    """The decision for ``request`` (see the module docstring); pure like ``route``."""
    decision = policy.route(request, snapshot, now)
    uncached = max(1, len(request.token_ids) - decision.cached_tokens_estimate)
    klass = admission.classify(uncached)
    if klass == "none":
        return decision
    restricted = admission.restrict(snapshot, klass)
    if restricted is None:
        return decision
    chosen = next((v for v in restricted.instances if v.instance_id == decision.instance_id),
                  None)
    if chosen is not None and not chosen.draining:
        return decision
    if klass == SHORT and decision.cached_tokens_estimate > 0:
        return decision
    return policy.route(request, restricted, now)
