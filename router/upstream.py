"""The gateway's HTTP/1.1 client to replicas: keep-alive pools, bytes in, bytes out.

Why not httpx: forwarding is the gateway's hottest code, and a general client pays for
features a relay does not need (URL objects, header models, auth flows, per-request
timeouts objects, decoders). Measured side by side in front of the same replica
(``llmfleet bench forwarders``, ``docs/results/forwarders.json``), this client spends a
fraction of httpx's CPU per request. It is a thin layer over asyncio's ``Protocol`` and
``httptools`` (the C parser uvicorn uses): one pool of keep-alive connections per replica,
``TCP_NODELAY`` on every socket, request bodies written as given and response bodies handed
on as they arrive (de-chunked, never decoded or re-encoded).

Failures are reported as ``UpstreamError``; ``UpstreamError.before_response`` says whether
the replica had answered anything yet, which is what decides if a request may be retried
elsewhere.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
from collections.abc import AsyncIterator, Sequence
from typing import cast
from urllib.parse import urlsplit

import httptools

Header = tuple[bytes, bytes]


class UpstreamError(Exception):
    """A replica could not be reached, or broke off its answer."""

    def __init__(self, message: str, before_response: bool) -> None:
        super().__init__(message)
        self.before_response = before_response


class _Connection(asyncio.Protocol):
    """One keep-alive connection; carries one request at a time."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.reused = False
        self._response: UpstreamResponse | None = None
        self._headers: list[Header] = []

    # -- asyncio.Protocol -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Each SSE event must leave at once: Nagle would hold a small write back until
            # the previous one is acknowledged (tens of ms on the first token).
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(f"bad HTTP from {self.pool.origin}: {exc}")
            if self.transport is not None:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool._forget(self)
        self._fail(f"{self.pool.origin} closed the connection"
                   + (f": {exc!r}" if exc else ""))

    def pause_writing(self) -> None:  # pragma: no cover - request bodies are small
        pass

    def resume_writing(self) -> None:  # pragma: no cover
        pass

    # -- httptools callbacks ----------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        response = self._response
        if response is not None:
            response._start(self.parser.get_status_code(), self._headers)

    def on_body(self, body: bytes) -> None:
        if self._response is not None:
            self._response._feed(body)

    def on_message_complete(self) -> None:
        response, self._response = self._response, None
        keep = self.parser.should_keep_alive()
        if response is not None:
            response._finish()
        if keep and not self.closed:
            self._headers = []
            self.reused = True
            self.pool._release(self)
        elif self.transport is not None:
            self.transport.close()

    # -- use ----------------------------------------------------------------------------
    def send(self, response: UpstreamResponse, head: bytes, body: bytes) -> None:
        assert self.transport is not None
        self._response = response
        self._headers = []
        self.transport.write(head + body if len(body) < 65536 else head)
        if len(body) >= 65536:
            self.transport.write(body)

    def _fail(self, message: str) -> None:
        response, self._response = self._response, None
        if response is not None:
            response._error(message)

    def abort(self) -> None:
        self._response = None
        if self.transport is not None and not self.closed:
            self.transport.abort()


class UpstreamResponse:
    """A replica's answer: status and headers first, then the body as it arrives."""

    __slots__ = ("_chunks", "_connection", "_done", "_error_message", "_started",
                 "_waiter", "headers", "status")

    def __init__(self, connection: _Connection) -> None:
        self._connection: _Connection | None = connection
        self.status = 0
        self.headers: list[Header] = []
        self._chunks: collections.deque[bytes] = collections.deque()
        self._done = False
        self._started = False
        self._error_message: str | None = None
        self._waiter: asyncio.Future[None] | None = None

    # -- fed by the connection ----------------------------------------------------------
    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _start(self, status: int, headers: list[Header]) -> None:
        self.status = status
        self.headers = headers
        self._started = True
        self._wake()

    def _feed(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._wake()

    def _finish(self) -> None:
        self._done = True
        self._connection = None  # back in the pool already
        self._wake()

    def _error(self, message: str) -> None:
        self._error_message = message
        self._connection = None
        self._wake()

    async def _wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    # -- read ---------------------------------------------------------------------------
    async def started(self) -> None:
        """Wait for the status line and headers."""
        while not self._started:
            if self._error_message is not None:
                raise UpstreamError(self._error_message, before_response=True)
            await self._wait()

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    async def chunks(self) -> AsyncIterator[bytes]:
        """Body chunks as they arrive; raises ``UpstreamError`` if the replica breaks off."""
        chunks = self._chunks
        while True:
            if chunks:
                # Everything that has arrived goes on as one piece: one write downstream
                # instead of one per upstream read. Nothing waits for more to arrive.
                if len(chunks) == 1:
                    yield chunks.popleft()
                else:
                    joined = b"".join(chunks)
                    chunks.clear()
                    yield joined
                continue
            if self._done:
                return
            if self._error_message is not None:
                raise UpstreamError(self._error_message, before_response=False)
            await self._wait()

    async def read(self) -> bytes:
        """The whole body."""
        parts = [chunk async for chunk in self.chunks()]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def close(self) -> None:
        """Give up on the rest of the body: the connection cannot be reused, so drop it."""
        connection, self._connection = self._connection, None
        if connection is not None and not self._done:
            connection.abort()

    @property
    def complete(self) -> bool:
        return self._done


class UpstreamPool:
    """Keep-alive connections to one replica (``http://host:port``)."""

    def __init__(self, url: str, connect_timeout_s: float = 2.0, max_idle: int = 256) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"replica URL must be http://host:port, got {url!r}")
        self.origin = url.rstrip("/")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.base_path = parts.path.rstrip("/")
        self.connect_timeout_s = connect_timeout_s
        self.max_idle = max_idle
        self._host_header = f"{self.host}:{self.port}".encode()
        self._idle: list[_Connection] = []
        self._all: set[_Connection] = set()
        self.retired = False

    def _release(self, connection: _Connection) -> None:
        if not self.retired and len(self._idle) < self.max_idle:
            self._idle.append(connection)
        elif connection.transport is not None:
            connection.transport.close()

    def retire(self) -> None:
        """The replica left the registry: close the idle connections now, and each busy
        one when its answer ends. Requests in flight go on: a replica that missed its
        heartbeat (an agent or a replica slow to renew it) may well be serving them, and
        one that really died breaks them itself (then failover and resume act)."""
        self.retired = True
        for connection in self._idle:
            if connection.transport is not None:
                connection.transport.close()
        self._idle.clear()

    def _forget(self, connection: _Connection) -> None:
        self._all.discard(connection)
        with contextlib.suppress(ValueError):
            self._idle.remove(connection)

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, connection = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(self), self.host, self.port),
                self.connect_timeout_s)
        except (TimeoutError, OSError) as exc:
            raise UpstreamError(f"cannot connect to {self.origin}: {exc!r}",
                                before_response=True) from exc
        self._all.add(connection)
        return connection

    def _head(self, method: bytes, path: str, headers: Sequence[Header], length: int) -> bytes:
        lines = [method, b" ", (self.base_path + path).encode(), b" HTTP/1.1\r\nhost: ",
                 self._host_header, b"\r\ncontent-length: ", str(length).encode(), b"\r\n"]
        for name, value in headers:
            lines += [name, b": ", value, b"\r\n"]
        lines.append(b"\r\n")
        return b"".join(lines)

    async def request(self, method: bytes, path: str, headers: Sequence[Header],
                      body: bytes = b"") -> UpstreamResponse:
        """Send a request and return once the status line and headers have arrived.

        A kept-alive connection the replica closed meanwhile is given up for the next idle
        one or a fresh one (the replica cannot have seen the request on a socket it had
        closed); a fresh connection that fails is an error.
        """
        head = self._head(method, path, headers, len(body))
        while True:
            connection = self._take_idle() or await self._connect()
            response = UpstreamResponse(connection)
            connection.send(response, head, body)
            try:
                await response.started()
            except UpstreamError:
                if connection.reused:  # stale keep-alive: the next one is idle or fresh
                    continue
                raise
            return response

    def _take_idle(self) -> _Connection | None:
        while self._idle:
            candidate = self._idle.pop()
            if not candidate.closed:
                return candidate
        return None

    def close(self) -> None:
        for connection in list(self._all):
            if connection.transport is not None:
                connection.transport.close()
        self._all.clear()
        self._idle.clear()


class UpstreamClient:
    """One ``UpstreamPool`` per replica URL, made on first use."""

    def __init__(self, connect_timeout_s: float = 2.0) -> None:
        self.connect_timeout_s = connect_timeout_s
        self._pools: dict[str, UpstreamPool] = {}

    def pool(self, url: str) -> UpstreamPool:
        pool = self._pools.get(url)
        if pool is None:
            pool = self._pools[url] = UpstreamPool(url, self.connect_timeout_s)
        return pool

    def forget(self, urls_kept: set[str]) -> None:
        """Retire the pools of replicas that left the fleet (``UpstreamPool.retire``: what
        they are answering is not cut off). A replica that comes back gets a new pool."""
        for url in [u for u in self._pools if u not in urls_kept]:
            self._pools.pop(url).retire()

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
