"""Gateway replicas agree: separate processes build the same policy from the same (epoch,
membership) and make identical decisions for the same request stream.

Each process gets a different PYTHONHASHSEED, so nothing may depend on Python's salted
``hash()`` or on set/dict orders derived from it.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from router.policy.interfaces import ClusterSnapshot, InstanceView, RoutingRequest
from router.policy.registry import build_policy

REPO = Path(__file__).resolve().parents[2]
NUM_REQUESTS = 10_000


def decisions_digest(policy_name: str, num_requests: int = NUM_REQUESTS) -> str:
    """Route a seeded stream of prompts with feedback; a digest of every decision."""
    weights = [1.0, 2.0, 0.5, 1.0] * 4
    snapshot = ClusterSnapshot(7, tuple(
        InstanceView(f"gpu-{k:02d}", weight=w, healthy=k != 5) for k, w in enumerate(weights)))
    policy = build_policy(policy_name)
    rng = np.random.default_rng(1234)
    families = [rng.integers(0, 50_000, 1600).astype(np.int32) for _ in range(40)]
    digest = hashlib.sha256()
    for k in range(num_requests):
        if k % 3:
            family = families[int(rng.integers(len(families)))]
            prompt = np.concatenate(
                [family, rng.integers(0, 50_000, int(rng.integers(1, 800))).astype(np.int32)])
        else:
            prompt = rng.integers(0, 50_000, int(rng.integers(50, 3000))).astype(np.int32)
        request = RoutingRequest(f"req-{k}", prompt, 32)
        decision = policy.route(request, snapshot, float(k))
        policy.on_dispatched(request, decision, float(k))
        if k >= 4:
            policy.on_first_token(f"req-{k - 4}", decision.instance_id, 0.05, None, float(k))
        if k >= 16:
            policy.on_finished(f"req-{k - 16}", decision.instance_id, float(k))
        digest.update(f"{decision.instance_id}|{decision.reason}|{decision.candidates}\n"
                      .encode())
    return digest.hexdigest()


def _in_subprocess(policy_name: str, hash_seed: str) -> subprocess.Popen[str]:
    code = ("from tests.routing.test_determinism import decisions_digest; "
            f"print(decisions_digest({policy_name!r}))")
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_processes_make_identical_dualmap_decisions() -> None:
    procs = [_in_subprocess("dualmap", seed) for seed in ("1", "2")]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        outputs.append(out.strip())
    assert len(outputs[0]) == 64 and outputs[0] == outputs[1]


def test_consistent_hash_and_the_rings_agree_with_this_process_too() -> None:
    proc = _in_subprocess("consistent_hash", "3")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert out.strip() == decisions_digest("consistent_hash")


def test_the_digest_sees_the_decisions() -> None:
    assert decisions_digest("dualmap", 300) != decisions_digest("consistent_hash", 300)
    assert decisions_digest("power_of_two", 300) != decisions_digest("least_loaded", 300)
