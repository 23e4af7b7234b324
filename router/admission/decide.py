"""The routing decision under an admission mode (the gateway's ``decide`` seam uses it too).

Without pools this is ``policy.route``. With spatial pools (``laps-spatial``) the class of a
request depends on its uncached tokens, which depend on where it goes; so:

1. route on the whole fleet; the decision's cached-prefix estimate gives the class;
2. a short request that is short *because* of the prefix cached where it was routed keeps
   that decision (sending the follow-up turns of a conversation whose first turn was long
   to a cold short-pool instance would make them long again);
3. so does a decision whose instance and candidates are all in the class's pool;
4. otherwise it is routed again on the pool's snapshot (the other pool draining), so its
   candidates (DualMap's two homes) are drawn within the pool.
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
    if klass == SHORT and decision.cached_tokens_estimate > 0:
        return decision
    eligible = {v.instance_id for v in restricted.instances if not v.draining}
    if decision.instance_id in eligible and all(c in eligible for c in decision.candidates):
        return decision
    return policy.route(request, restricted, now)
