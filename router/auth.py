"""API keys, the admin token and request limits for the gateway.

Who may call what, once auth is on:

- ``/v1/*`` (and every other path not named below) needs an API key,
  ``Authorization: Bearer sk-llmfleet-...``, that exists and is not revoked.
- ``/admin*`` and ``/dashboard*`` need the admin token; an API key there gets a 403.
- ``/health`` and ``/metrics`` stay open: load balancers, Kubernetes probes and Prometheus
  scrape them without credentials, and they carry no prompts, keys or routing control.
- The dashboard's page and static files (``/dashboard``, ``/dashboard/static/*``) stay
  open too: a browser loads them by navigation and ``<script>`` tags, which cannot carry a
  bearer token, and they hold no data. Everything the page shows or changes goes through
  ``/admin/*`` with the token the user types in.

Auth is off by default only when the gateway listens on a loopback address
(:func:`auth_required`).

Keys live in Redis (``{ns}`` = namespace, default ``llmfleet``, as in ``router/state.py``):

- ``{ns}:auth:keys``     hash: key id -> JSON ``{"name", "created", "sha256", "revoked"}``
- ``{ns}:auth:admin``    SHA-256 (hex) of the admin token
- ``{ns}:auth:version``  counter, INCR'd by every change to the two keys above

Every gateway replica holds the whole table in memory (:class:`AuthGuard`) and re-reads it
when the version moves, so a request costs no Redis round trip and a revocation reaches all
replicas within one poll interval (0.25 s by default).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, WatchError
from starlette.responses import Response

from proto.defaults import DEFAULT_MAX_BODY_BYTES, DEFAULT_NAMESPACE
from proto.openai import error_body
from proto.registry import reply

log = logging.getLogger("llmfleet.auth")

# ASGI types, spelled out so this module needs nothing beyond the ASGI spec.
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

ADMIN_TOKEN_ENV = "LLMFLEET_ADMIN_TOKEN"
KEY_PREFIX = "sk-llmfleet-"
ADMIN_TOKEN_PREFIX = "llmfleet-admin-"
MIN_ADMIN_TOKEN_CHARS = 16
DEFAULT_POLL_INTERVAL_S = 0.25
OPEN_PATHS = frozenset({"/health", "/metrics", "/dashboard", "/dashboard/"})
OPEN_PREFIXES = ("/dashboard/static/",)
ADMIN_PREFIXES = ("/admin", "/dashboard")

# Why a plain SHA-256 and not bcrypt/scrypt/argon2: slow hashes protect low-entropy secrets
# (passwords) from offline guessing. Our keys and generated admin tokens carry 256 random
# bits, which no guessing reaches however fast the hash, and a slow hash would cost
# milliseconds on every request. (An admin token set by hand through LLMFLEET_ADMIN_TOKEN
# must therefore be long and random too; shorter than MIN_ADMIN_TOKEN_CHARS is refused.)


def _sha256(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


# -- OpenAI-style errors ------------------------------------------------------------------


def openai_error_body(message: str, error_type: str, code: str | None = None,
                      param: str | None = None) -> bytes:
    """The JSON body OpenAI's API answers errors with, encoded."""
    return json.dumps(error_body(message, error_type, param, code)).encode()


@dataclass(frozen=True)
class AuthFailure:
    """A refusal: HTTP status and the encoded OpenAI-style body (built once, at import)."""

    status: int
    body: bytes
    headers: tuple[tuple[bytes, bytes], ...] = ()

    @classmethod
    def make(cls, status: int, message: str, error_type: str, code: str,
             headers: tuple[tuple[bytes, bytes], ...] = ()) -> AuthFailure:
        return cls(status, openai_error_body(message, error_type, code), headers)

    @property
    def message(self) -> str:
        return str(json.loads(self.body)["error"]["message"])

    async def send(self, send: Send, extra_headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        """Answer the request with this failure over raw ASGI."""
        await send({
            "type": "http.response.start",
            "status": self.status,
            "headers": [(b"content-type", b"application/json"),
                        (b"content-length", str(len(self.body)).encode()),
                        *self.headers, *extra_headers],
        })
        await send({"type": "http.response.body", "body": self.body})


_BEARER = ((b"www-authenticate", b'Bearer realm="llmfleet"'),)
MISSING_KEY = AuthFailure.make(
    401, "Missing API key: send it as 'Authorization: Bearer <key>' "
    "(create one with `llmfleet keys create --name NAME`).",
    "invalid_request_error", "missing_api_key", _BEARER)
INVALID_KEY = AuthFailure.make(
    401, "Invalid API key.", "invalid_request_error", "invalid_api_key", _BEARER)
REVOKED_KEY = AuthFailure.make(
    401, "This API key has been revoked.", "invalid_request_error", "invalid_api_key", _BEARER)
MISSING_ADMIN = AuthFailure.make(
    401, "Missing admin token: send it as 'Authorization: Bearer <admin token>'.",
    "invalid_request_error", "missing_admin_token", _BEARER)
INVALID_ADMIN = AuthFailure.make(
    401, "Invalid admin token.", "invalid_request_error", "invalid_admin_token", _BEARER)
KEY_ON_ADMIN = AuthFailure.make(
    403, "API keys cannot call the admin API; use the admin token.",
    "permission_error", "admin_token_required")


def body_too_large(max_bytes: int) -> AuthFailure:
    """The 413 answer to a request body over ``max_bytes``."""
    return AuthFailure.make(
        413, f"Request body too large: the limit is {max_bytes} bytes.",
        "invalid_request_error", "request_too_large", ((b"connection", b"close"),))


def too_busy_response(retry_after_s: float) -> Response:
    """429 with ``Retry-After`` for when every replica's in-flight budget is full.

    A Starlette ``Response`` is also an ASGI app, so it can be returned from a FastAPI
    handler or awaited as ``await too_busy_response(s)(scope, receive, send)``.
    ``Retry-After`` takes whole seconds (RFC 9110), so the delay is rounded up, at least 1.
    """
    seconds = max(1, math.ceil(retry_after_s))
    body = openai_error_body(
        f"All replicas are at their in-flight limit; retry after {seconds} s.",
        "rate_limit_error", "server_busy")
    return Response(body, status_code=429, media_type="application/json",
                    headers={"Retry-After": str(seconds)})


# -- when auth is on ----------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and any loopback IP (127.0.0.0/8, ::1)."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything, so not loopback


def auth_required(host: str, flag: bool | None) -> bool:
    """Whether the gateway requires keys: ``flag`` if given (--auth/--no-auth), else on
    for every bind address except loopback (0.0.0.0 and :: included)."""
    if flag is not None:
        return flag
    return not is_loopback(host)


def auth_status_line(enabled: bool, host: str, flag: bool | None) -> str:
    """The line ``up``/``gateway`` print at start saying whether auth is on, and why."""
    if enabled:
        why = "--auth" if flag else f"the gateway listens on {host}, not only on loopback"
        return (f"auth: on ({why}): /v1/* needs an API key (`llmfleet keys create --name "
                "NAME`), /admin/* the admin token; /health and /metrics stay open")
    if not is_loopback(host):
        return (f"auth: OFF (--no-auth) although the gateway listens on {host}: anyone who "
                "can reach it can use the fleet and its /admin API")
    why = "--no-auth" if flag is False else f"the gateway listens on {host} only"
    return f"auth: off ({why}); --auth requires API keys"


def add_auth_arguments(parser: argparse.ArgumentParser) -> None:
    """``--auth/--no-auth`` and ``--max-body-bytes`` for ``up`` and ``gateway``."""
    parser.add_argument(
        "--auth", action=argparse.BooleanOptionalAction, default=None,
        help="require API keys on /v1/* and the admin token on /admin/* "
             "(default: on unless the gateway listens on a loopback address)")
    parser.add_argument(
        "--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
        help="refuse request bodies larger than this with a 413 (0: no limit)")


# -- the key store --------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyInfo:
    """What ``list`` shows of a key: never the secret, never its hash."""

    key_id: str
    name: str
    created: float
    revoked: float | None = None  # when it was revoked (epoch seconds), None if active

    def to_json(self) -> dict[str, Any]:
        return {"key_id": self.key_id, "name": self.name, "created": _iso(self.created),
                "revoked": self.revoked is not None, "revoked_at": _iso(self.revoked)}


@dataclass(frozen=True)
class KeyTable:
    """One consistent snapshot of the auth state, as a guard holds it."""

    version: int
    active: Mapping[str, bytes]  # key id -> SHA-256 digest of the secret
    revoked: frozenset[str]
    admin_sha256: bytes | None


def key_id_of(secret: str) -> str | None:
    """The key id inside ``sk-llmfleet-<id>-<random>``; None if it is not shaped so."""
    if not secret.startswith(KEY_PREFIX):
        return None
    key_id, sep, rest = secret[len(KEY_PREFIX):].partition("-")
    return key_id if sep and key_id and rest else None


class KeyStore:
    """API keys and the admin token in Redis, shared by every gateway replica.

    Secrets are returned once, by :meth:`create` and the admin-token methods; Redis holds
    only their SHA-256.
    """

    def __init__(self, redis_url: str, namespace: str = DEFAULT_NAMESPACE) -> None:
        self.redis_url = redis_url
        self.namespace = namespace
        self._redis: aioredis.Redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
        self.keys_key = f"{namespace}:auth:keys"
        self.admin_key = f"{namespace}:auth:admin"
        self.version_key = f"{namespace}:auth:version"

    async def close(self) -> None:
        await self._redis.aclose()

    async def __aenter__(self) -> KeyStore:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    # -- API keys ---------------------------------------------------------------------
    async def create(self, name: str) -> tuple[str, str]:
        """A new key named ``name``: returns ``(key_id, secret)``; the secret is not kept."""
        name = name.strip()
        if not name or len(name) > 200:
            raise ValueError("a key needs a name of 1 to 200 characters")
        while True:
            key_id = secrets.token_hex(6)
            secret = f"{KEY_PREFIX}{key_id}-{secrets.token_urlsafe(32)}"
            record = json.dumps({"name": name, "created": time.time(),
                                 "sha256": _sha256(secret).hex(), "revoked": None})
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hsetnx(self.keys_key, key_id, record)
                pipe.incr(self.version_key)
                added, _version = await pipe.execute()
            if added:  # a 48-bit id collides about never, but never overwrite one
                log.info("created API key %s (%s)", key_id, name)
                return key_id, secret

    async def list(self) -> list[KeyInfo]:
        """Every key, oldest first, revoked ones included."""
        rows = await reply(self._redis.hgetall(self.keys_key))
        infos = []
        for key_id, raw in rows.items():
            record = json.loads(raw)
            infos.append(KeyInfo(str(key_id), record["name"], float(record["created"]),
                                 record.get("revoked")))
        return sorted(infos, key=lambda info: (info.created, info.key_id))

    async def revoke(self, key_id: str) -> bool:
        """Revoke a key; True if it was active, False if it was already revoked.

        Raises ``KeyError`` for an id that does not exist. Every guard refuses the key
        after its next poll.
        """
        async with self._redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(self.keys_key)
                    raw = await reply(pipe.hget(self.keys_key, key_id))
                    if raw is None:
                        raise KeyError(key_id)
                    record = json.loads(raw)
                    if record.get("revoked") is not None:
                        await pipe.unwatch()
                        return False
                    record["revoked"] = time.time()
                    pipe.multi()
                    pipe.hset(self.keys_key, key_id, json.dumps(record))
                    pipe.incr(self.version_key)
                    await pipe.execute()
                    log.info("revoked API key %s", key_id)
                    return True
                except WatchError:
                    continue

    # -- the admin token --------------------------------------------------------------
    async def set_admin_token(self, token: str) -> None:
        """Make ``token`` the admin token (its hash replaces any previous one)."""
        if len(token) < MIN_ADMIN_TOKEN_CHARS:
            raise ValueError(f"the admin token must have at least {MIN_ADMIN_TOKEN_CHARS} "
                             "characters (use a long random value)")
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(self.admin_key, _sha256(token).hex())
            pipe.incr(self.version_key)
            await pipe.execute()

    async def rotate_admin_token(self) -> str:
        """A new random admin token, replacing the old one; returned once."""
        token = ADMIN_TOKEN_PREFIX + secrets.token_urlsafe(32)
        await self.set_admin_token(token)
        return token

    async def has_admin_token(self) -> bool:
        return bool(await self._redis.exists(self.admin_key))

    async def ensure_admin_token(self, env_token: str | None) -> str | None:
        """Set up the admin token at start; returns a token only if it generated one now.

        ``env_token`` (from ``$LLMFLEET_ADMIN_TOKEN``) wins and replaces the stored hash.
        Without it, a token already in Redis is kept (its holder still has it), else a new
        one is generated and stored; only then is it returned, to be printed once.
        """
        if env_token:
            if await self._redis.get(self.admin_key) != _sha256(env_token).hex():
                await self.set_admin_token(env_token)
            return None
        token = ADMIN_TOKEN_PREFIX + secrets.token_urlsafe(32)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(self.admin_key, _sha256(token).hex(), nx=True)
            pipe.incr(self.version_key)
            created, _version = await pipe.execute()
        return token if created else None

    # -- for guards ------------------------------------------------------------------
    async def version(self) -> int:
        return int(await self._redis.get(self.version_key) or 0)

    async def table(self) -> KeyTable:
        """The whole auth state in one round trip (MULTI, so version and rows agree)."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.get(self.version_key)
            pipe.hgetall(self.keys_key)
            pipe.get(self.admin_key)
            version, rows, admin = await pipe.execute()
        active: dict[str, bytes] = {}
        revoked: set[str] = set()
        for key_id, raw in rows.items():
            record = json.loads(raw)
            if record.get("revoked") is None:
                active[str(key_id)] = bytes.fromhex(record["sha256"])
            else:
                revoked.add(str(key_id))
        return KeyTable(int(version or 0), active, frozenset(revoked),
                        bytes.fromhex(admin) if admin else None)


# -- the guard -------------------------------------------------------------------------------


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class AuthGuard:
    """Decides, from memory, whether a request may pass.

    ``start()`` loads the table from Redis (and raises if it cannot: a gateway that cannot
    see its keys should not start) and launches a task that polls the version counter every
    ``poll_interval_s`` and reloads the table when it moved. If Redis becomes unreachable
    later, the last table stays in force. ``stop()`` ends the task. With ``enabled=False``
    every request passes and Redis is never touched.
    """

    def __init__(self, redis_url: str | None, namespace: str = DEFAULT_NAMESPACE, *,
                 enabled: bool = True,
                 poll_interval_s: float = DEFAULT_POLL_INTERVAL_S) -> None:
        if enabled and not redis_url:
            raise ValueError("auth needs a Redis URL to read keys from")
        self.redis_url = redis_url
        self.namespace = namespace
        self.enabled = enabled
        self.poll_interval_s = poll_interval_s
        self._store: KeyStore | None = None
        self._task: asyncio.Task[None] | None = None
        self._table = KeyTable(-1, {}, frozenset(), None)

    @property
    def version(self) -> int:
        """The version of the table in force (-1 before the first load)."""
        return self._table.version

    async def start(self) -> None:
        if not self.enabled or self._task is not None:
            return
        assert self.redis_url is not None
        self._store = KeyStore(self.redis_url, self.namespace)
        try:
            await self.refresh()
        except BaseException:
            await self.stop()
            raise
        self._task = asyncio.create_task(self._poll(), name="llmfleet-auth-refresh")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        store, self._store = self._store, None
        if store is not None:
            await store.close()

    async def refresh(self) -> bool:
        """Reload the table if its version moved; True if it did."""
        assert self._store is not None, "start() the guard first"
        if await self._store.version() == self._table.version:
            return False
        table = await self._store.table()
        self._table = table
        log.debug("auth table version %d: %d active keys, %d revoked", table.version,
                  len(table.active), len(table.revoked))
        return True

    async def _poll(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self.poll_interval_s)
            try:
                await self.refresh()
            except (RedisError, OSError) as exc:
                if not failing:  # once per outage, not four times a second
                    log.warning("auth: cannot refresh keys from Redis (%s); keeping the "
                                "table of version %d", exc, self._table.version)
                failing = True
            else:
                if failing:
                    log.warning("auth: key refresh from Redis works again")
                failing = False

    def _key_failure(self, token: str) -> AuthFailure | None:
        key_id = key_id_of(token)
        digest = self._table.active.get(key_id) if key_id else None
        if digest is None:
            return REVOKED_KEY if key_id in self._table.revoked else INVALID_KEY
        if not hmac.compare_digest(_sha256(token), digest):
            return INVALID_KEY
        return None

    def check(self, path: str, authorization_header: str | None) -> AuthFailure | None:
        """None if the request may pass, else the refusal to send."""
        if not self.enabled or path in OPEN_PATHS:
            return None
        if path.startswith(OPEN_PREFIXES) and ".." not in path:  # no way out of the prefix
            return None
        token = _bearer(authorization_header)
        if path.startswith(ADMIN_PREFIXES):
            if token is None:
                return MISSING_ADMIN
            admin = self._table.admin_sha256
            if admin is not None and hmac.compare_digest(_sha256(token), admin):
                return None
            return KEY_ON_ADMIN if self._key_failure(token) is None else INVALID_ADMIN
        if token is None:
            return MISSING_KEY
        failure = self._key_failure(token)
        if failure is not None and log.isEnabledFor(logging.DEBUG):
            log.debug("auth: refused %s (key id %s): %s", path, key_id_of(token) or "-",
                      failure.message)
        return failure


# -- ASGI middleware -----------------------------------------------------------------------


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value)
    return None


class AuthMiddleware:
    """Pure ASGI: refuses HTTP and WebSocket requests ``guard.check`` refuses.

    With ``manage_lifespan`` (the default) it also starts the guard on the server's
    lifespan startup and stops it on shutdown, so wrapping the app is all the wiring needed
    (servers that skip lifespan need ``guard.start()`` called another way).
    """

    def __init__(self, app: ASGIApp, guard: AuthGuard, *, manage_lifespan: bool = True) -> None:
        self.app = app
        self.guard = guard
        self.manage_lifespan = manage_lifespan

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind in ("http", "websocket") and self.guard.enabled:
            header = _header(scope, b"authorization")
            failure = self.guard.check(scope["path"],
                                       header.decode("latin-1") if header else None)
            if failure is None:
                await self.app(scope, receive, send)
            elif kind == "http":
                await failure.send(send)
            else:
                await send({"type": "websocket.close", "code": 1008})  # policy violation
            return
        if kind == "lifespan" and self.manage_lifespan:
            await self.app(scope, self._lifespan_receive(receive), send)
            return
        await self.app(scope, receive, send)

    def _lifespan_receive(self, receive: Receive) -> Receive:
        async def wrapped() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.guard.start()
            elif message["type"] == "lifespan.shutdown":
                await self.guard.stop()
            return message
        return wrapped


class _TooLarge(Exception):
    pass


@dataclass
class _Exchange:
    received: int = 0
    too_large: bool = False
    answered: bool = False  # our 413 went out
    started: bool = False  # the app's own response started


class BodyLimitMiddleware:
    """Pure ASGI: 413 for request bodies over ``max_bytes`` (0 or less: no limit).

    A declared ``Content-Length`` over the limit is refused before the app runs (and one
    within it costs nothing more). Bodies without one (chunked uploads) are counted as the
    app reads them: past the limit, the app's ``receive`` raises, and whatever the app then
    answers (an error handler's 500, say) is replaced by the 413, as long as no response
    had started before.
    """

    def __init__(self, app: ASGIApp, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.failure = body_too_large(max_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.max_bytes <= 0:
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit():
            if int(declared) > self.max_bytes:
                await self.failure.send(send)
                return
            # An HTTP/1.1 server hands the app at most Content-Length bytes (anything after
            # them is the next request), so only bodies without one need counting.
            await self.app(scope, receive, send)
            return
        state = _Exchange()

        async def limited_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                state.received += len(message.get("body", b""))
                if state.received > self.max_bytes:
                    state.too_large = True
                    raise _TooLarge
            return message

        async def guarded_send(message: Message) -> None:
            if state.too_large and not state.started:
                if not state.answered:
                    state.answered = True
                    await self.failure.send(send)
                return  # drop the app's own answer to the oversized body
            if message["type"] == "http.response.start":
                state.started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _TooLarge:
            pass
        except Exception:
            if not state.too_large:
                raise
            # the app turned our exception into its own (or answered and re-raised, as
            # Starlette's error middleware does): the 413 replaces whatever it sent
        if state.too_large and not state.started and not state.answered:
            state.answered = True
            await self.failure.send(send)


def wrap_app(app: ASGIApp, guard: AuthGuard,
             max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> ASGIApp:
    """The gateway app behind both middlewares: auth outermost (a stranger learns nothing,
    not even the body limit, and costs no body reading), then the body limit."""
    return AuthMiddleware(BodyLimitMiddleware(app, max_body_bytes), guard)


def install_middleware(app: Any, guard: AuthGuard,
                       max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
    """The same order on a Starlette/FastAPI app (for Ray Serve's ingress, which needs the
    app object itself): the middleware added last runs first."""
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    app.add_middleware(AuthMiddleware, guard=guard)


# -- start-up -------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuthSetup:
    """What ``up``/``gateway`` decided at start, and what they print."""

    enabled: bool
    status_line: str
    new_admin_token: str | None = None  # generated now: print it once, it is not kept

    def lines(self) -> list[str]:
        out = [self.status_line]
        if self.new_admin_token:
            out.append(f"auth: admin token (shown once; `llmfleet keys admin-token --rotate` "
                       f"replaces it): {self.new_admin_token}")
        return out


async def prepare_auth(redis_url: str, host: str, flag: bool | None,
                       namespace: str = DEFAULT_NAMESPACE,
                       env: Mapping[str, str] | None = None) -> AuthSetup:
    """Decide whether auth is on and, if so, make sure an admin token exists.

    The token is ``$LLMFLEET_ADMIN_TOKEN`` if set (its hash is stored so every replica
    accepts it), else the one already stored, else a new one returned for printing.
    """
    enabled = auth_required(host, flag)
    line = auth_status_line(enabled, host, flag)
    if not enabled:
        return AuthSetup(False, line)
    environ = os.environ if env is None else env
    async with KeyStore(redis_url, namespace) as store:
        token = await store.ensure_admin_token(environ.get(ADMIN_TOKEN_ENV) or None)
    return AuthSetup(True, line, token)
