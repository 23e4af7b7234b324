"""Log lines every llmfleet process writes the same way: text for people, JSON for machines.

``configure_logging("json")`` makes the root logger write one JSON object per line::

    {"ts": "2026-12-01T03:04:05.678Z", "level": "INFO", "logger": "llmfleet.gateway",
     "msg": "...", "request_id": "abc-1f2e...", "process": "gateway"}

``request_id`` is the request being served when the line was written (absent outside one):
the gateway binds its request id (``bind_request_id``) and sends it to the replica in the
request-id header (``proto.headers.REQUEST_ID_HEADER``); the replica's
``RequestIdMiddleware`` binds the same id, so grepping one id finds the request's lines in
every process. Fields passed with ``extra={...}`` are added to the JSON object.

Routine traffic stays out of INFO: httpx logs every request it sends at INFO (health polls,
heartbeats, forwarded requests), so its loggers are set to WARNING here.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from contextvars import ContextVar
from typing import Any

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(request_tag)s %(message)s"

request_id_var: ContextVar[str | None] = ContextVar("llmfleet_request_id", default=None)

# Loggers that would otherwise log each routine HTTP call at INFO.
_CHATTY_LOGGERS = ("httpx", "httpcore", "uvicorn.access")
# Attributes every LogRecord has; anything else on a record came in through ``extra``.
_RECORD_FIELDS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime",
                                                                "request_id", "request_tag"}


def bind_request_id(request_id: str | None) -> None:
    """Make ``request_id`` the current request's id for log lines written from this task
    (and tasks it starts) from now on."""
    request_id_var.set(request_id)


class _RequestIdFilter(logging.Filter):
    """Puts the current request id on every record (``request_id``, ``request_tag``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = getattr(record, "request_id", None) or request_id_var.get()
        record.request_id = request_id
        record.request_tag = f" [{request_id}]" if request_id else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line (see the module docstring for the fields)."""

    def __init__(self, process_name: str = "") -> None:
        super().__init__()
        self.process_name = process_name

    def format(self, record: logging.LogRecord) -> str:
        ms = int(record.msecs)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        entry: dict[str, Any] = {
            "ts": f"{stamp}.{ms:03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None) or request_id_var.get()
        if request_id:
            entry["request_id"] = request_id
        if self.process_name:
            entry["process"] = self.process_name
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and key not in entry and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(fmt: str = "text", level: int = logging.INFO,
                      process_name: str = "") -> None:
    """Set up the root logger for one process: ``fmt`` is ``text`` or ``json``."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {LOG_FORMATS}, not {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestIdFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter(process_name))
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))


def add_log_format_argument(parser: argparse.ArgumentParser) -> None:
    """``--log-format text|json`` on a command line."""
    parser.add_argument("--log-format", choices=LOG_FORMATS, default="text",
                        help="log lines as text (default) or JSON objects, one per line")


# -- binding the request id from a request header (pure ASGI) ---------------------------

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class RequestIdMiddleware:
    """Binds the request id an HTTP request carries in ``header`` for the request's log
    lines (the header name comes from ``proto.headers``; passed in, not repeated here)."""

    def __init__(self, app: ASGIApp, header: str) -> None:
        self.app = app
        self.header = header.lower().encode("latin-1")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = None
        for name, value in scope.get("headers", ()):
            if name == self.header:
                request_id = value.decode("latin-1")
                break
        # Set for this request only, even where requests share a task (test transports).
        token = request_id_var.set(request_id)
        try:
            await self.app(scope, receive, send)
        finally:
            request_id_var.reset(token)
