"""The reference engine's OpenAI API request models: what this engine accepts.

These are the engine's own rules (its vocabulary, one choice per request, its sampling
parameters). The gateway does not apply them: it reads only what routing needs
(``proto.openai``) and forwards the body unchanged, so a backend judges its own requests.
Errors use the shared OpenAI error contract of ``proto.openai``.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Literal, TypeVar

import numpy as np
import numpy.typing as npt
from fastapi import Request
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from proto import byte_tokenizer as tokenizer
from proto.openai import (
    DEFAULT_CHAT_MAX_TOKENS,
    DEFAULT_COMPLETION_MAX_TOKENS,
    OpenAIError,
    validation_error_to_openai,
)
from proto.tokenize import BYTE_TOKENIZER, Tokenizer

_ModelT = TypeVar("_ModelT", bound=BaseModel)
_log = logging.getLogger("llmfleet.api")




class StreamOptions(BaseModel):
    include_usage: bool = False


class _CommonParams(BaseModel):
    """Sampling parameters both endpoints accept. Unknown fields are ignored, as OpenAI does."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1)
    user: str | None = None

    @field_validator("n")
    @classmethod
    def _only_one_choice(cls, value: int) -> int:
        if value != 1:
            raise ValueError("only n=1 is supported")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        return value

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop if s]

    def include_usage_in_stream(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_CommonParams):
    """``POST /v1/completions``. ``prompt`` may be text or a list of token ids."""

    prompt: str | list[int] | list[str] | list[list[int]]

    @field_validator("prompt")
    @classmethod
    def _single_prompt(cls, value: Any) -> Any:
        if isinstance(value, list):
            if not value:
                raise ValueError("prompt must not be empty")
            if isinstance(value[0], str | list):
                if len(value) != 1:
                    raise ValueError("only one prompt per request is supported")
                return value[0]
            # The upper bound is the replica's vocabulary: checked in prompt_token_ids.
            bad = [t for t in value if t < 0]
            if bad:
                raise ValueError(f"token id {bad[0]} is negative")
        elif value == "":
            raise ValueError("prompt must not be empty")
        return value

    def prompt_token_ids(self, tok: Tokenizer = BYTE_TOKENIZER) -> list[int]:
        """The prompt in ``tok``'s ids; ValueError for an id outside its vocabulary."""
        if isinstance(self.prompt, str):
            return tok.encode(self.prompt)
        ids = [int(t) for t in self.prompt]  # type: ignore[arg-type]
        bad = [t for t in ids if not 0 <= t < tok.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {tok.vocab_size})")
        return ids

    def output_budget(self) -> int:
        """Tokens to generate at most (OpenAI's completions default: 16)."""
        return self.max_tokens or DEFAULT_COMPLETION_MAX_TOKENS

    def prompt_token_array(self) -> npt.NDArray[np.int32]:
        """The prompt's token ids as an int32 array, without a Python int per token."""
        if isinstance(self.prompt, str):
            return tokenizer.encode_array(self.prompt)
        return tokenizer.ids_array(self.prompt)  # type: ignore[arg-type]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_CommonParams):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    # vLLM's template options: open the assistant's turn (default), or continue the final
    # message as it is (token replay sends a partial assistant message this way).
    add_generation_prompt: bool = True
    continue_final_message: bool = False

    @model_validator(mode="after")
    def _one_way_to_end_the_prompt(self) -> ChatCompletionRequest:
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("Cannot set both `continue_final_message` and "
                             "`add_generation_prompt` to True.")
        return self

    def rendered_prompt(self) -> str:
        return BYTE_TOKENIZER.render_chat(
            [{"role": m.role, "content": m.text()} for m in self.messages],
            self.add_generation_prompt, self.continue_final_message)

    def prompt_token_ids(self, tok: Tokenizer = BYTE_TOKENIZER) -> list[int]:
        """The conversation rendered by ``tok``'s chat template, in its ids."""
        return tok.encode_chat([{"role": m.role, "content": m.content} for m in self.messages],
                               self.add_generation_prompt, self.continue_final_message).tolist()

    def prompt_token_array(self) -> npt.NDArray[np.int32]:
        return tokenizer.encode_array(self.rendered_prompt())

    def output_budget(self) -> int:
        """Tokens to generate at most (``max_completion_tokens`` wins over ``max_tokens``)."""
        return self.max_completion_tokens or self.max_tokens or DEFAULT_CHAT_MAX_TOKENS




async def parse_body(request: Request, model: type[_ModelT]) -> _ModelT:
    """Parse and validate a JSON body; raise ``OpenAIError`` (400) on any problem."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OpenAIError(f"Request body is not valid JSON: {exc}", 400) from exc
    if not isinstance(data, dict):
        raise OpenAIError("Request body must be a JSON object", 400)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error_to_openai(exc) from exc



