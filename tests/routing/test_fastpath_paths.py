"""Which routing kernels run (compiled or Python, ``router/policy/fastpath.py``), and that
both make the same decisions: per decision on a seeded stream, and over a whole simulation.

Each side runs in its own process, since the choice is made once, at import.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HAVE_COMPILED = importlib.util.find_spec("router.policy._fastpath") is not None
needs_compiled = pytest.mark.skipif(
    not HAVE_COMPILED, reason="the C extension is not built here (installed without a C "
    "compiler): there is no second path to compare")


def _python(args: list[str], pure: bool) -> subprocess.Popen[str]:
    """``python args`` in the repository with the kernels forced to Python or not."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "LLMFLEET_PURE_PYTHON": "1" if pure else "0"}
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _output(proc: subprocess.Popen[str], timeout: float = 120) -> tuple[str, str]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return out, err


_WHICH = ("import router.policy.fastpath as f, router.policy.rings as r; "
          "print(f.COMPILED, f.PrefixLru.__module__, type(r.HashRing(1).lookup).__module__)")


def test_the_environment_variable_selects_the_python_kernels() -> None:
    pure, default = _python(["-c", _WHICH], pure=True), _python(["-c", _WHICH], pure=False)
    out, err = _output(pure)
    assert out.split() == ["False", "router.policy.fastpath_py", "router.policy.fastpath_py"]
    assert "not built" not in err  # chosen, not a fallback: no warning
    out, _ = _output(default)
    module = "router.policy._fastpath" if HAVE_COMPILED else "router.policy.fastpath_py"
    assert out.split() == [str(HAVE_COMPILED), module, module]


def test_a_missing_extension_falls_back_to_python_with_one_warning() -> None:
    code = ("import sys; sys.modules['router.policy._fastpath'] = None; "  # as if not built
            "import router.policy.fastpath as f, router.policy.dualmap, router.policy.hashing; "
            "print(f.COMPILED, f.locate.__module__)")
    out, err = _output(_python(["-c", code], pure=False))
    assert out.split() == ["False", "router.policy.fastpath_py"]
    assert err.count("router.policy._fastpath is not built") == 1


_DIGESTS = ("from tests.routing.test_determinism import decisions_digest as d; "
            "print(*(d(p, 2500) for p in ('dualmap', 'consistent_hash', 'cache_aware')))")


@needs_compiled
def test_both_paths_make_the_same_decisions_one_by_one() -> None:
    """A digest of every decision (instance, reason, candidates) over a seeded stream with
    feedback, shared prefixes and an unroutable instance, per ring or cache policy."""
    procs = [_python(["-c", _DIGESTS], pure=pure) for pure in (False, True)]
    compiled, python = (_output(proc)[0].split() for proc in procs)
    assert len(compiled) == 3 and compiled == python


@pytest.mark.e2e
@needs_compiled
def test_a_simulation_gives_the_same_result_on_both_paths() -> None:
    """``llmfleet sim`` with DualMap under enough load that it leaves the affinity pick
    (SLO and load fallbacks): every field of the result is the same but the wall time."""
    args = ["-m", "router.cli", "sim", "--trace", "zipf", "--trace-format", "synthetic",
            "--instances", "4", "--policy", "dualmap", "--rate", "100", "--slo-ttft", "0.5",
            "--max-requests", "300", "--json", "--no-progress"]
    procs = [_python(args, pure=pure) for pure in (False, True)]
    compiled, python = (json.loads(_output(proc, timeout=240)[0]) for proc in procs)
    del compiled["wall_seconds"], python["wall_seconds"]
    assert compiled == python
    assert compiled["requests"] == 300 and len(compiled["decisions"]) >= 2, compiled["decisions"]
