"""API keys, the admin token and request limits, through real HTTP and a real Redis.

The gateway stand-in is a minimal ASGI app behind the same middleware the gateway uses
(``router.auth.wrap_app`` / ``install_middleware``), served by uvicorn on a free port.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import httpx
import openai
import pytest
from fastapi import FastAPI, Request
from redis.exceptions import RedisError

from instances.launcher import free_port
from router.auth import (
    ADMIN_TOKEN_ENV,
    AuthGuard,
    KeyStore,
    Message,
    Receive,
    Scope,
    Send,
    auth_required,
    auth_status_line,
    install_middleware,
    prepare_auth,
    too_busy_response,
    wrap_app,
)
from router.embedded_redis import EmbeddedRedis
from tests.fleet import serve_in_thread

T = TypeVar("T")
V1_ROUTES = [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
             ("GET", "/v1/models"), ("POST", "/v1/embeddings")]
ADMIN_ROUTES = ["/admin/instances", "/admin/dashboard/state", "/dashboard/other"]
# Open on purpose: probes and scrapers; the dashboard's page and its static files, which a
# browser loads without a bearer token and which hold no data (the page reads /admin/*).
OPEN_ROUTES = ["/health", "/metrics", "/dashboard", "/dashboard/static/dashboard.js"]
BODY = {"model": "m", "prompt": "hello", "max_tokens": 4}
LIMIT = 4096


def with_store(redis_url: str, namespace: str, fn: Callable[[KeyStore], Awaitable[T]]) -> T:
    async def main() -> T:
        async with KeyStore(redis_url, namespace) as store:
            return await fn(store)
    return asyncio.run(main())


class Backend:
    """A minimal ASGI app: answers every request with its path and body size."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"].rsplit(".", 1)[-1]
                await send({"type": f"{message['type']}.complete"})
                if kind == "shutdown":
                    return
        self.calls.append(scope["path"])
        if scope["path"] == "/v1/busy":
            await too_busy_response(2.5)(scope, receive, send)
            return
        size = 0
        while True:
            message: Message = await receive()
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = json.dumps({"path": scope["path"], "bytes": size}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


@contextlib.contextmanager
def gateway(redis_url: str | None, namespace: str, enabled: bool = True,
            backend: Backend | None = None) -> Iterator[tuple[str, AuthGuard, Backend]]:
    """One gateway replica: backend behind auth + body limit, guard started by lifespan."""
    backend = backend or Backend()
    guard = AuthGuard(redis_url, namespace, enabled=enabled)
    with serve_in_thread(wrap_app(backend, guard, max_body_bytes=LIMIT), free_port()) as url:
        yield url, guard, backend


def call(client: httpx.Client, method: str, path: str, token: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    if method == "GET":
        return client.get(path, headers=headers)
    return client.post(path, json=BODY, headers=headers)


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


@pytest.fixture
def keys(redis_url: str, namespace: str) -> dict[str, str]:
    """A valid key, a revoked key and the admin token in a fresh namespace."""
    async def setup(store: KeyStore) -> dict[str, str]:
        key_id, valid = await store.create("alice")
        revoked_id, revoked = await store.create("bob")
        await store.revoke(revoked_id)
        admin = await store.ensure_admin_token(None)
        assert admin is not None
        return {"valid": valid, "valid_id": key_id, "revoked": revoked, "admin": admin}
    return with_store(redis_url, namespace, setup)


def test_every_v1_route_refuses_missing_wrong_and_revoked_keys(
        redis_url: str, namespace: str, keys: dict[str, str]) -> None:
    valid = keys["valid"]
    forged = valid[:-6] + ("AAAAAA" if not valid.endswith("AAAAAA") else "BBBBBB")
    with gateway(redis_url, namespace) as (url, _guard, backend), \
            httpx.Client(base_url=url) as client:
        for method, path in V1_ROUTES:
            missing = call(client, method, path, None)
            assert missing.status_code == 401
            assert error_of(missing)["code"] == "missing_api_key"
            assert missing.headers["www-authenticate"].startswith("Bearer")
            for wrong in ("sk-not-a-key", forged, "sk-llmfleet-000000000000-x", keys["admin"]):
                refused = call(client, method, path, wrong)
                assert refused.status_code == 401, (path, refused.text)
                assert error_of(refused)["code"] == "invalid_api_key"
            basic = client.request(method, path, headers={"Authorization": f"Basic {valid}"})
            assert basic.status_code == 401
            revoked = call(client, method, path, keys["revoked"])
            assert revoked.status_code == 401
            assert "revoked" in error_of(revoked)["message"]
            assert backend.calls == []  # nothing refused reached the app
            ok = call(client, method, path, valid)
            assert ok.status_code == 200 and ok.json()["path"] == path
            backend.calls.clear()
        # An OpenAI client sees the refusal as the error it knows.
        with pytest.raises(openai.AuthenticationError) as raised:
            openai.OpenAI(base_url=url + "/v1", api_key=forged, max_retries=0).models.list()
        assert raised.value.code == "invalid_api_key"


def test_admin_routes_need_the_admin_token_and_refuse_api_keys(
        redis_url: str, namespace: str, keys: dict[str, str]) -> None:
    with gateway(redis_url, namespace) as (url, _guard, backend), \
            httpx.Client(base_url=url) as client:
        for path in ADMIN_ROUTES:
            assert call(client, "GET", path, None).status_code == 401
            as_key = call(client, "GET", path, keys["valid"])
            assert as_key.status_code == 403
            assert error_of(as_key)["type"] == "permission_error"
            assert call(client, "GET", path, keys["revoked"]).status_code == 401
            assert call(client, "GET", path, keys["admin"] + "x").status_code == 401
            assert backend.calls == []
            ok = call(client, "GET", path, keys["admin"])
            assert ok.status_code == 200 and ok.json()["path"] == path
            backend.calls.clear()
        for path in OPEN_ROUTES:
            assert client.get(path).status_code == 200
        # A raw path climbing out of the open static prefix is not open (httpx would
        # normalise the dots away, so the request target is set as sent on the wire).
        backend.calls.clear()
        climbing = client.get("/", extensions={"target": b"/dashboard/static/../../admin/x"})
        assert climbing.status_code == 401
        assert backend.calls == []


def test_auth_off_lets_everything_through_without_redis() -> None:
    with gateway(None, "unused", enabled=False) as (url, _guard, _backend), \
            httpx.Client(base_url=url) as client:
        for method, path in [*V1_ROUTES, *(("GET", p) for p in ADMIN_ROUTES)]:
            assert call(client, method, path, None).status_code == 200


def test_two_replicas_honour_a_revocation_within_a_second(
        redis_url: str, namespace: str, keys: dict[str, str]) -> None:
    with gateway(redis_url, namespace) as (url_a, _ga, _ba), \
            gateway(redis_url, namespace) as (url_b, _gb, _bb), \
            httpx.Client() as client:
        def status(url: str, token: str) -> int:
            return call(client, "POST", url + "/v1/completions", token).status_code

        # A new key reaches both replicas within a second too.
        fresh_id, fresh = with_store(redis_url, namespace, lambda s: s.create("carol"))
        start = time.monotonic()
        while {status(url_a, fresh), status(url_b, fresh)} != {200}:
            assert time.monotonic() - start < 1.0, "a new key was not honoured within 1 s"
            time.sleep(0.01)
        assert status(url_a, keys["valid"]) == status(url_b, keys["valid"]) == 200

        with_store(redis_url, namespace, lambda s: s.revoke(fresh_id))
        revoked_at = time.monotonic()
        refused: dict[str, float] = {}
        while len(refused) < 2:
            elapsed = time.monotonic() - revoked_at
            assert elapsed < 1.0, f"not refused by every replica within 1 s: {refused}"
            for url in (url_a, url_b):
                if url not in refused and status(url, fresh) == 401:
                    refused[url] = elapsed
            time.sleep(0.01)
        print(f"revocation honoured after {sorted(refused.values())} s")
        # The other key is untouched.
        assert status(url_a, keys["valid"]) == status(url_b, keys["valid"]) == 200


def test_body_limit_by_content_length_and_by_counting_chunks(
        redis_url: str, namespace: str, keys: dict[str, str]) -> None:
    auth = {"Authorization": f"Bearer {keys['valid']}"}
    with gateway(redis_url, namespace) as (url, _guard, backend), \
            httpx.Client(base_url=url, headers=auth) as client:
        ok = client.post("/v1/completions", content=b"x" * LIMIT)
        assert ok.status_code == 200 and ok.json()["bytes"] == LIMIT

        declared = client.post("/v1/completions", content=b"x" * (LIMIT + 1))
        assert declared.status_code == 413
        assert error_of(declared)["code"] == "request_too_large"
        assert backend.calls == ["/v1/completions"]  # refused before the app ran

        def chunks(total: int) -> Iterator[bytes]:
            for _ in range(total // 1000):
                yield b"y" * 1000

        small = client.post("/v1/completions", content=chunks(3000))
        assert small.request.headers.get("transfer-encoding") == "chunked"
        assert small.status_code == 200 and small.json()["bytes"] == 3000
        chunked = client.post("/v1/completions", content=chunks(8000))
        assert chunked.request.headers.get("transfer-encoding") == "chunked"
        assert chunked.status_code == 413
        assert error_of(chunked)["code"] == "request_too_large"

        # Auth runs first: a stranger's oversized body is a 401, not a 413.
        stranger = httpx.post(url + "/v1/completions", content=b"x" * (LIMIT + 1))
        assert stranger.status_code == 401


def test_body_limit_inside_a_fastapi_app_answers_413_not_500(
        redis_url: str, namespace: str, keys: dict[str, str]) -> None:
    """install_middleware on FastAPI: the app's error middleware must not turn it into 500."""
    app = FastAPI()
    seen: list[int] = []

    @app.post("/v1/completions")
    async def completions(request: Request) -> dict[str, int]:
        seen.append(len(await request.body()))
        return {"bytes": seen[-1]}

    install_middleware(app, AuthGuard(redis_url, namespace), max_body_bytes=LIMIT)
    chunks = [b"z" * 1000] * 8
    with serve_in_thread(app, free_port()) as url, \
            httpx.Client(base_url=url,
                         headers={"Authorization": f"Bearer {keys['valid']}"}) as client:
        assert client.post("/v1/completions", content=b"z" * 10).json() == {"bytes": 10}
        chunked = client.post("/v1/completions", content=iter(chunks))
        assert chunked.status_code == 413, chunked.text
        assert error_of(chunked)["code"] == "request_too_large"
        assert httpx.post(url + "/v1/completions", json=BODY).status_code == 401
    assert seen == [10]


def test_too_busy_is_a_429_with_retry_after(
        redis_url: str, namespace: str, keys: dict[str, str]) -> None:
    with gateway(redis_url, namespace) as (url, _guard, _backend):
        busy = httpx.post(url + "/v1/busy", json=BODY,
                          headers={"Authorization": f"Bearer {keys['valid']}"})
    assert busy.status_code == 429
    assert busy.headers["retry-after"] == "3"  # whole seconds, rounded up
    assert error_of(busy)["type"] == "rate_limit_error"
    assert too_busy_response(0.01).headers["retry-after"] == "1"


@pytest.mark.parametrize(("host", "flag", "expected"), [
    ("127.0.0.1", None, False), ("localhost", None, False), ("::1", None, False),
    ("127.0.0.2", None, False), ("0.0.0.0", None, True), ("::", None, True),
    ("10.1.2.3", None, True), ("gateway.example", None, True),
    ("127.0.0.1", True, True), ("0.0.0.0", False, False),
])
def test_auth_is_off_by_default_only_on_loopback(host: str, flag: bool | None,
                                                 expected: bool) -> None:
    assert auth_required(host, flag) is expected
    line = auth_status_line(expected, host, flag)
    assert line.startswith("auth: on" if expected else ("auth: off", "auth: OFF"))
    assert "\n" not in line
    if not expected and flag is False and host == "0.0.0.0":
        assert "anyone" in line  # disabling on a public address is said loudly


def test_prepare_auth_makes_one_admin_token_or_takes_the_environments(
        redis_url: str, namespace: str) -> None:
    off = asyncio.run(prepare_auth(redis_url, "127.0.0.1", None, namespace, env={}))
    assert not off.enabled and off.lines() == [off.status_line]
    first = asyncio.run(prepare_auth(redis_url, "0.0.0.0", None, namespace, env={}))
    assert first.enabled and first.new_admin_token
    assert first.new_admin_token in first.lines()[1]
    again = asyncio.run(prepare_auth(redis_url, "0.0.0.0", None, namespace, env={}))
    assert again.new_admin_token is None  # the stored one is kept
    chosen = "operator-chosen-admin-token-0123456789"
    from_env = asyncio.run(prepare_auth(redis_url, "0.0.0.0", None, namespace,
                                        env={ADMIN_TOKEN_ENV: chosen}))
    assert from_env.new_admin_token is None
    with pytest.raises(ValueError):
        asyncio.run(prepare_auth(redis_url, "0.0.0.0", None, namespace,
                                 env={ADMIN_TOKEN_ENV: "short"}))

    with gateway(redis_url, namespace) as (url, _guard, _backend), \
            httpx.Client(base_url=url) as client:
        assert call(client, "GET", "/admin/x", chosen).status_code == 200
        assert call(client, "GET", "/admin/x", first.new_admin_token).status_code == 401


def test_guard_keeps_its_table_when_redis_goes_away(tmp_path: Any) -> None:
    server = EmbeddedRedis(str(tmp_path))
    try:
        _key_id, secret = with_store(server.url, "ns", lambda s: s.create("dana"))

        async def scenario() -> None:
            guard = AuthGuard(server.url, "ns", poll_interval_s=0.05)
            await guard.start()
            try:
                assert guard.check("/v1/models", f"Bearer {secret}") is None
                server.stop()
                await asyncio.sleep(0.2)  # a few failed polls
                assert guard.check("/v1/models", f"Bearer {secret}") is None
                assert guard.check("/v1/models", "Bearer sk-llmfleet-x-y") is not None
            finally:
                await guard.stop()

        asyncio.run(scenario())
    finally:
        server.stop()
    with pytest.raises((RedisError, OSError)):  # no table, no start: never run blind
        asyncio.run(AuthGuard(server.url, "ns").start())


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    from router.cli import main

    code = main(list(argv))
    return code, capsys.readouterr().out


def test_cli_round_trip_never_shows_or_logs_a_secret(
        redis_url: str, namespace: str, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    common = ("--redis-url", redis_url, "--namespace", namespace)
    code, out = run_cli(capsys, "keys", "create", "--name", "ci-bot", *common, "--json")
    assert code == 0
    created = json.loads(out)
    secret, key_id = created["secret"], created["key_id"]
    assert secret.startswith(f"sk-llmfleet-{key_id}-") and len(secret) > 50
    assert created["revoked"] is False

    code, text = run_cli(capsys, "keys", "create", "--name", "human", *common)
    human_secret = text.split("secret: ")[1].split()[0]
    assert code == 0 and human_secret.startswith("sk-llmfleet-")

    # The key works against a gateway, then the CLI revokes it.
    with gateway(redis_url, namespace) as (url, guard, _backend), \
            httpx.Client(base_url=url) as client:
        assert call(client, "POST", "/v1/completions", secret).status_code == 200
        assert call(client, "POST", "/v1/completions", secret + "0").status_code == 401
        code, out = run_cli(capsys, "keys", "revoke", key_id, *common, "--json")
        assert code == 0 and json.loads(out) == {"key_id": key_id, "revoked": True,
                                                  "changed": True}
        version = with_store(redis_url, namespace, lambda s: s.version())
        deadline = time.monotonic() + 1.0
        while guard.version < version:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert call(client, "POST", "/v1/completions", secret).status_code == 401

    code, out = run_cli(capsys, "keys", "list", *common, "--json")
    listed = {row["key_id"]: row for row in json.loads(out)["keys"]}
    assert listed[key_id]["revoked"] is True and listed[key_id]["revoked_at"]
    assert [row["name"] for row in listed.values()] == ["ci-bot", "human"]
    assert set(listed[key_id]) == {"key_id", "name", "created", "revoked", "revoked_at"}
    code, table = run_cli(capsys, "keys", "list", *common)
    assert key_id in table and "revoked" in table and "active" in table

    code, out = run_cli(capsys, "keys", "revoke", key_id, *common, "--json")
    assert code == 0 and json.loads(out)["changed"] is False
    code, _ = run_cli(capsys, "keys", "revoke", "nosuchkey", *common)
    assert code == 1

    code, out = run_cli(capsys, "keys", "admin-token", *common, "--json")
    assert json.loads(out) == {"admin_token_set": False}
    code, out = run_cli(capsys, "keys", "admin-token", "--rotate", *common, "--json")
    admin = json.loads(out)["admin_token"]
    code, out = run_cli(capsys, "keys", "admin-token", *common, "--json")
    assert json.loads(out) == {"admin_token_set": True}

    stored = with_store(redis_url, namespace,
                        lambda s: s._redis.hgetall(s.keys_key))  # what Redis holds
    everything_listed = out + table + json.dumps(listed) + json.dumps(stored)
    for leaked in (secret, human_secret, admin):
        assert leaked not in everything_listed
        assert leaked[-24:] not in caplog.text  # nor a recognisable part of it
        assert leaked not in caplog.text
    assert key_id in caplog.text  # the logs were captured, and name keys by id


def test_cli_without_a_redis_url_says_how_to_give_one(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from router.cli import main

    monkeypatch.delenv("REDIS_URL", raising=False)
    assert main(["keys", "list"]) == 2
    assert "--redis-url" in capsys.readouterr().err


@pytest.mark.e2e
def test_cli_entry_point_uses_redis_url_from_the_environment(
        redis_url: str, namespace: str) -> None:
    import os
    import subprocess
    import sys

    created = subprocess.run(
        [sys.executable, "-m", "router.cli", "keys", "create", "--name", "sub",
         "--namespace", namespace, "--json"],
        env={**os.environ, "REDIS_URL": redis_url}, capture_output=True, text=True, timeout=60)
    assert created.returncode == 0, created.stderr
    secret = json.loads(created.stdout)["secret"]
    assert secret not in created.stderr
    listed = with_store(redis_url, namespace, lambda s: s.list())
    assert [(k.key_id, k.name) for k in listed] == [(json.loads(created.stdout)["key_id"], "sub")]
