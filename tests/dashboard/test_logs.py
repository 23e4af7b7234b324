"""Structured logs (proto.logs): JSON lines, the request id across processes, quiet polls."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator

import httpx
import pytest
from fastapi import FastAPI

from proto.headers import REQUEST_ID_HEADER
from proto.logs import RequestIdMiddleware, bind_request_id, configure_logging
from router.cli import build_parser


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    chatty = {name: logging.getLogger(name).level for name in ("httpx", "httpcore")}
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    for name, old in chatty.items():
        logging.getLogger(name).setLevel(old)
    bind_request_id(None)


def _lines(err: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in err.splitlines() if line.startswith("{")]


def test_json_lines_carry_the_request_id_and_extra_fields(
        capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json", process_name="gateway")
    log = logging.getLogger("llmfleet.test")
    log.info("outside any request")
    bind_request_id("req-123")
    log.warning("stream from %s broke", "engine-1", extra={"instance": "engine-1"})
    first, second = _lines(capsys.readouterr().err)
    assert "request_id" not in first and first["msg"] == "outside any request"
    assert second["request_id"] == "req-123" and second["instance"] == "engine-1"
    assert second["level"] == "WARNING" and second["logger"] == "llmfleet.test"
    assert second["process"] == "gateway" and str(second["ts"]).endswith("Z")


def test_text_lines_tag_the_request(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("text")
    bind_request_id("req-9")
    logging.getLogger("llmfleet.test").info("hello")
    assert "INFO llmfleet.test [req-9] hello" in capsys.readouterr().err


def test_routine_http_calls_are_not_logged_at_info() -> None:
    configure_logging("json")
    # httpx logs every request (health polls, heartbeats, forwarding) at INFO.
    assert not logging.getLogger("httpx").isEnabledFor(logging.INFO)
    assert logging.getLogger("llmfleet.gateway").isEnabledFor(logging.INFO)


def test_a_replica_logs_under_the_id_the_gateway_sent(
        capsys: pytest.CaptureFixture[str]) -> None:
    """The replica's middleware binds the request-id header, as the engine server does."""
    configure_logging("json", process_name="engine")
    app = FastAPI()
    app.add_middleware(RequestIdMiddleware, header=REQUEST_ID_HEADER)

    @app.post("/v1/completions")
    async def completions() -> dict[str, str]:
        logging.getLogger("llmfleet.engine").info("serving")
        return {"ok": "yes"}

    async def call() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://replica") as client:
            await client.post("/v1/completions", headers={REQUEST_ID_HEADER: "gw-abc-1"})
            await client.post("/v1/completions")

    asyncio.run(call())
    tagged, untagged = _lines(capsys.readouterr().err)
    assert tagged["request_id"] == "gw-abc-1" and tagged["process"] == "engine"
    assert "request_id" not in untagged


@pytest.mark.parametrize("command", [["up"], ["gateway"], ["engine"]])
def test_log_format_is_an_option_of_every_long_running_command(command: list[str]) -> None:
    args = build_parser().parse_args([*command, "--log-format", "json"])
    assert args.log_format == "json"
    with pytest.raises(SystemExit):
        build_parser().parse_args([*command, "--log-format", "yaml"])
