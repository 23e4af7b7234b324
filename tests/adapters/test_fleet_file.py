"""Fleet files: the external backends ``llmfleet up --fleet`` puts the gateway in front of."""

from __future__ import annotations

from pathlib import Path

import pytest

from instances.adapters import BackendSpec, load_fleet_file
from instances.launcher import backend_specs

YAML = """\
backends:
  - url: http://10.0.0.5:8000
    kind: vllm
    id: vllm-a
    kv_events: tcp://10.0.0.5:5557
  - url: http://10.0.0.6:30000
    kind: sglang
    weight: 2
  - url: http://10.0.0.7:9000
"""

TOML = """\
[[backends]]
url = "http://10.0.0.5:8000"
kind = "vllm"
id = "vllm-a"
block_size = 32
"""


def test_yaml_and_toml_fleet_files(tmp_path: Path) -> None:
    (tmp_path / "fleet.yaml").write_text(YAML)
    specs = load_fleet_file(str(tmp_path / "fleet.yaml"))
    assert specs == [
        BackendSpec("http://10.0.0.5:8000", "vllm", "vllm-a", kv_events="tcp://10.0.0.5:5557"),
        BackendSpec("http://10.0.0.6:30000", "sglang", weight=2),
        BackendSpec("http://10.0.0.7:9000"),
    ]
    (tmp_path / "fleet.toml").write_text(TOML)
    assert load_fleet_file(str(tmp_path / "fleet.toml")) == [
        BackendSpec("http://10.0.0.5:8000", "vllm", "vllm-a", block_size=32)]
    both = backend_specs(["http://127.0.0.1:1"], str(tmp_path / "fleet.toml"))
    assert [s.url for s in both] == ["http://127.0.0.1:1", "http://10.0.0.5:8000"]


@pytest.mark.parametrize(("text", "message"), [
    ("backends: {}\n", "top-level 'backends' list"),
    ("backends:\n  - kind: vllm\n", "needs a 'url'"),
    ("backends:\n  - url: http://h:1\n    kind: tgi\n", "unknown backend kind 'tgi'"),
    ("backends:\n  - url: http://h:1\n    colour: red\n", "unknown keys \\['colour'\\]"),
    ("backends:\n  - url: h:1\n", "http"),
    ("backends:\n  - {url: 'http://a:1', id: x}\n  - {url: 'http://b:1', id: x}\n", "unique"),
])
def test_bad_fleet_files_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_fleet_file(str(path))
