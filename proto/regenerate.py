"""Regenerates the Python modules of the ``.proto`` files in ``proto/``.

    python -m proto.regenerate          # rewrite proto/*_pb2.py, *_pb2.pyi, *_pb2_grpc.py
    python -m proto.regenerate --check  # exit 1 if a checked-in module is out of date

The modules are generated with ``grpcio-tools`` (``protoc`` with the gRPC plugin) from the
repository root, so they import each other as ``proto.<name>_pb2``. ``--check`` compares
freshly generated text with the checked-in files, ignoring the lines that only stamp the
generator's version (a newer ``grpcio-tools`` on another machine is not a stale contract).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from importlib import resources
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
ROOT = PROTO_DIR.parent
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
# Lines that carry the generator's or runtime's version, not the contract.
_VERSION_MARKERS = (
    "Protobuf Python Version",
    "GRPC_GENERATED_VERSION =",
    "_runtime_version.Domain",
)


def proto_files(root: Path = ROOT) -> list[Path]:
    """The ``.proto`` sources under ``root/proto``, sorted."""
    return sorted((root / "proto").glob("*.proto"))


def generated_names(proto: Path) -> list[str]:
    return [proto.stem + suffix for suffix in SUFFIXES]


def generate(out_dir: Path, root: Path = ROOT) -> list[Path]:
    """Run protoc on every ``.proto`` of ``root/proto`` into ``out_dir/proto/``; returns the
    files written."""
    from grpc_tools import protoc

    include = str(resources.files("grpc_tools") / "_proto")
    written: list[Path] = []
    for proto in proto_files(root):
        args = [
            "grpc_tools.protoc",
            f"-I{root}",
            f"-I{include}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(proto.relative_to(root)),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}")
        written.extend(out_dir / "proto" / name for name in generated_names(proto))
    return written


def _normalized(text: str) -> list[str]:
    return [line for line in text.splitlines() if not any(m in line for m in _VERSION_MARKERS)]


def stale_files(root: Path = ROOT) -> list[str]:
    """Generated modules in ``root/proto`` that differ from what its sources generate now."""
    stale: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for fresh in generate(Path(tmp), root):
            current = root / "proto" / fresh.name
            if not current.exists() or _normalized(current.read_text()) != _normalized(
                fresh.read_text()
            ):
                stale.append(current.name)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 if stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        for name in stale:
            print(f"proto/{name} is out of date: run python -m proto.regenerate", file=sys.stderr)
        return 1 if stale else 0
    with tempfile.TemporaryDirectory() as tmp:
        for fresh in generate(Path(tmp)):
            (PROTO_DIR / fresh.name).write_text(fresh.read_text())
            print(f"wrote proto/{fresh.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
