"""Hardware profiles of replicas: the timing-model coefficients in ``profiles.json``.

The reference engine's emulated executor runs on them and the routing policies predict
TTFT and size cache views with them, so both read the same file.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any


@cache
def profile_table() -> dict[str, dict[str, Any]]:
    """Every profile in ``profiles.json`` by name (its fields, sources included)."""
    text = resources.files("proto").joinpath("profiles.json").read_text("utf-8")
    table: dict[str, dict[str, Any]] = json.loads(text)["profiles"]
    return table


def list_profiles() -> list[str]:
    """Names of the profiles in ``profiles.json``."""
    return sorted(profile_table())


def profile_fields(name: str) -> dict[str, Any]:
    """The named profile's fields; ValueError listing the names if unknown."""
    table = profile_table()
    if name not in table:
        raise ValueError(f"unknown profile {name!r}; known: {', '.join(sorted(table))}")
    return dict(table[name])
