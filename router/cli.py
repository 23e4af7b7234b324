"""The ``llmfleet`` command line: one subcommand per job, each registered by its package."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Each module exposes ``register_cli(subparsers)`` adding its subcommands; a subcommand sets
# ``func`` (args -> exit code) with ``parser.set_defaults(func=...)``.
_COMMAND_MODULES = (
    "router.up",
    "instances.server",
    "instances.ray_replicas",
    "loadgen.cli",
    "router.bench",
    "router.keys_cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmfleet",
        description="Router and control plane for fleets of LLM replicas.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue  # a package still being built registers nothing yet
        module.register_cli(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
