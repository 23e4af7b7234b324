"""The packages' layering: who may import whom (issue 9).

``proto`` holds the contracts every part shares and imports nothing of ours. ``migration``
builds on ``proto`` only. The replicas (``instances``) build on ``proto`` and ``migration``.
The gateway (``router``) builds on ``proto`` and ``migration``; from ``instances`` it may use
only the public launch API (``instances.launcher``), never engine internals. ``loadgen``
(simulator, load generator) sits on top and may use everything. So no package imports one
that imports it back. Imports inside functions count: a late import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OURS = ("proto", "migration", "instances", "router", "loadgen")
ALLOWED: dict[str, tuple[str, ...]] = {
    "proto": ("proto",),
    "migration": ("proto", "migration"),
    "instances": ("proto", "migration", "instances"),
    "router": ("proto", "migration", "router", "instances.launcher"),
    "loadgen": OURS,
}


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module in OURS:
                # ``from instances import launcher`` names the submodule in the alias.
                found.extend((node.lineno, f"{node.module}.{alias.name}")
                             for alias in node.names)
            else:
                found.append((node.lineno, node.module))
    return found


def _allowed(module: str, rules: tuple[str, ...]) -> bool:
    return any(module == rule or module.startswith(rule + ".") for rule in rules)


def violations(package: str) -> list[str]:
    bad: list[str] = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for lineno, module in _imports(path):
            top = module.split(".")[0]
            if top not in OURS:
                continue
            if not _allowed(module, ALLOWED[package]):
                bad.append(f"{path.relative_to(ROOT)}:{lineno} imports {module}")
    return bad


@pytest.mark.parametrize("package", OURS)
def test_package_imports_only_what_its_layer_allows(package: str) -> None:
    assert violations(package) == []


def test_the_check_sees_a_violation(tmp_path: Path) -> None:
    # The rule would catch what it is meant to: an engine module importing the gateway.
    sample = tmp_path / "x.py"
    sample.write_text("def f():\n    from router.gateway import Gateway\n")
    modules = [m for _, m in _imports(sample)]
    assert modules == ["router.gateway"]
    assert not _allowed("router.gateway", ALLOWED["instances"])
    assert not _allowed("instances.engine.core", ALLOWED["router"])
    assert _allowed("instances.launcher", ALLOWED["router"])


def test_proto_imports_as_ours_from_anywhere(tmp_path: Path) -> None:
    # proto-plus (a dependency of a dependency of Ray) installs its own top-level `proto`;
    # the Makefile removes it. From outside the repository (as Ray workers and installed
    # commands import), `proto` must still be this project's.
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", "import proto.registry, proto; "
                          "print(proto.__file__)"], cwd=tmp_path, capture_output=True,
                         text=True, check=True, env={"PATH": "/usr/bin:/bin"})
    assert Path(out.stdout.strip()).resolve() == (ROOT / "proto" / "__init__.py").resolve()
