"""The OpenAI API contract every part shares: error bodies and output budgets.

Bad input gets a 4xx with ``{"error": {"message", "type", "param", "code"}}``, never a 500
or a hang: from the reference engine and from the gateway alike.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
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


# -- the gateway's view of a request --------------------------------------------------------
# The gateway reads only what routing needs and forwards the client's body unchanged: the
# backend judges everything else (n, tools, logprobs, response_format, its vocabulary, its
# context length) and its answer, 4xx included, goes back as it came.

_MAX_TOKEN_ID = 2**31 - 1


@dataclass(slots=True)
class RouteView:
    """What routing reads from an OpenAI request body."""

    model: str | None
    stream: bool
    # Output tokens to expect at most (for load estimates), over all choices.
    output_budget: int
    # The prompt as text (completions with a text prompt) ...
    prompt_text: str | None = None
    # ... or as token ids (completions with a token-id prompt) ...
    prompt_ids: list[int] | None = None
    # ... or as chat messages, text parts only.
    messages: list[dict[str, str]] | None = None


def _bad(message: str, param: str) -> OpenAIError:
    return OpenAIError(message, 400, param=param)


def _positive_int(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if type(value) is not int or value < 1:
        raise _bad(f"'{name}' must be a positive integer, got {value!r}", name)
    return value


def _token_ids(value: list[Any], param: str) -> list[int]:
    for token in value:
        if type(token) is not int or not 0 <= token <= _MAX_TOKEN_ID:
            raise _bad(f"'{param}' must hold token ids (non-negative integers), "
                       f"got {token!r}", param)
    return value


def _routing_messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise _bad("'messages' must be a non-empty array of messages", "messages")
    out: list[dict[str, str]] = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _bad(f"messages[{i}] must be an object with a string 'role'",
                       f"messages.{i}")
        content = message.get("content")
        if content is None or isinstance(content, str):
            text = content or ""
        elif isinstance(content, list):
            # Route on the text parts; other parts (images, audio) go to the backend as sent.
            text = "".join(part["text"] for part in content
                           if isinstance(part, dict) and isinstance(part.get("text"), str))
        else:
            raise _bad(f"messages[{i}].content must be a string or an array of parts",
                       f"messages.{i}.content")
        out.append({"role": message["role"], "content": text})
    return out


def parse_route_view(raw: bytes, chat: bool) -> RouteView:
    """Read what routing needs from a request body; ``OpenAIError`` (400) if it can't.

    Checked: the body is a JSON object; ``model`` a string if given; ``stream`` a boolean if
    given; ``max_tokens`` / ``max_completion_tokens`` / ``n`` positive integers if given; a
    prompt (completions: text, token ids, or a batch of either — routed on the first) or
    messages (chat: objects with a role; text content parts are routed on) to route on.
    Nothing else is looked at.
    """
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise OpenAIError(f"Request body is not valid JSON: {exc}", 400) from exc
    if not isinstance(body, dict):
        raise OpenAIError("Request body must be a JSON object", 400)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("'model' must be a string", "model")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad("'stream' must be a boolean", "stream")
    max_tokens = _positive_int(body, "max_tokens")
    choices = _positive_int(body, "n") or 1
    if chat:
        budget = _positive_int(body, "max_completion_tokens") or max_tokens
        view = RouteView(model, stream, (budget or DEFAULT_CHAT_MAX_TOKENS) * choices)
        view.messages = _routing_messages(body.get("messages"))
        return view
    view = RouteView(model, stream, (max_tokens or DEFAULT_COMPLETION_MAX_TOKENS) * choices)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of prompts: routed on the first
    if isinstance(prompt, str):
        view.prompt_text = prompt
    elif isinstance(prompt, list) and prompt:
        view.prompt_ids = _token_ids(prompt, "prompt")
    else:
        raise _bad("'prompt' must be a string, an array of token ids, or a batch of either",
                   "prompt")
    return view
