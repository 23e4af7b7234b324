"""The OpenAI API contract every part shares: error bodies and output budgets.

Bad input gets a 4xx with ``{"error": {"message", "type", "param", "code"}}``, never a 500
or a hang: from the reference engine and from the gateway alike.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

# Output budgets when the request names none (the gateway estimates load with the same).
DEFAULT_COMPLETION_MAX_TOKENS = 16
DEFAULT_CHAT_MAX_TOKENS = 128

_log = logging.getLogger("llmfleet.api")


class OpenAIError(Exception):
    """An error to be returned to the client as OpenAI-style JSON."""

    def __init__(
        self,
        message: str,
        status_code: int = 400,
        error_type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.error_type = error_type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code)


def error_body(
    message: str, error_type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def _location(loc: Sequence[Any]) -> str:
    return ".".join(str(p) for p in loc if p != "body") or "body"


def validation_error_to_openai(exc: ValidationError | RequestValidationError) -> OpenAIError:
    first = exc.errors()[0]
    param = _location(first.get("loc", ()))
    msg = first.get("msg", "invalid request")
    return OpenAIError(f"Invalid value for '{param}': {msg}", 400, param=param)


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error of ``app`` as OpenAI does: JSON error body, never an HTML page.

    Unexpected exceptions become a 500 with the same body shape (logged), so a client
    always gets parseable JSON.
    """

    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error_to_openai(exc).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        _log.exception("unexpected error in %s", app.title)
        return OpenAIError(f"Internal error: {exc!r}", 500, "server_error").response()
