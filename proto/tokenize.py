"""Tokenizers every part shares: byte-level by default, or a local Hugging Face tokenizer.

The gateway keys prompts and predicts TTFT in tokens, the reference engine caches and counts
tokens, and both must count the *backend's* tokens for those numbers to mean anything. With
no tokenizer named, every part uses the byte-level tokenizer (``proto.byte_tokenizer``:
zero set-up, ids 0..255 are bytes, 256 is EOS). With ``--tokenizer PATH`` (a
``tokenizer.json`` file, or a directory holding one, as ``save_pretrained`` writes it) both
load the same Hugging Face tokenizer with the ``tokenizers`` package — never from a hub —
and chat prompts are rendered with the tokenizer's own chat template (Jinja, sandboxed, as
``transformers`` renders it) where the directory has one.

How a prompt becomes tokens follows vLLM, so the gateway's token stream is the one a vLLM
replica caches: a completion prompt is encoded with the tokenizer's special tokens (e.g. a
BOS its post-processor adds); a chat prompt is rendered by the template (which writes its
own BOS) and encoded without them.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

from proto import byte_tokenizer
from proto.tokens import TokenArray, as_token_array

# What a message's content may be: a string, or OpenAI content parts ({"type": "text",
# "text": ...}); only text parts carry prompt tokens.
Message = Mapping[str, Any]


class IncrementalDecoder(Protocol):
    """Turns generated token ids into text as they come, holding back broken characters."""

    def step(self, token_id: int) -> str: ...


class Tokenizer(Protocol):
    """What the gateway and the reference engine need of a tokenizer."""

    name: str
    vocab_size: int
    eos_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def encode_prompt(self, text: str, add_special_tokens: bool = True) -> TokenArray: ...

    def render_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True,
                    continue_final_message: bool = False) -> str: ...

    def encode_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True,
                    continue_final_message: bool = False) -> TokenArray: ...

    def decode(self, token_ids: Sequence[int]) -> str: ...

    def decoder(self) -> IncrementalDecoder: ...

    def single_token(self, text: str) -> int | None: ...


def message_text(content: Any, separator: str = "") -> str:
    """A message's text: a string as is, text content parts joined by ``separator``.

    Raises ValueError for a part that is not text (images and audio carry no prompt
    tokens the gateway could count).
    """
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for part in content:
        if not isinstance(part, Mapping) or part.get("type") != "text" \
                or not isinstance(part.get("text"), str):
            raise ValueError("only text content parts are supported")
        parts.append(part["text"])
    return separator.join(parts)


# Appended to the final message's text to find where the template wrote it, as
# ``transformers.apply_chat_template(continue_final_message=True)`` (what vLLM calls) does.
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def render_continuing(
    render: Callable[[list[dict[str, Any]], bool], str],
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
) -> str:
    """``messages`` (text content) rendered by ``render(messages, add_generation_prompt)``.

    With ``continue_final_message`` (vLLM's and SGLang's chat extension) the prompt ends
    right after the final message's text: no end-of-turn, no new turn, so the model continues
    that message (token replay re-issues a chat this way, the generated text as a partial
    assistant message). It needs ``add_generation_prompt`` off. If the template trims the
    message, the prompt ends at its trimmed text, as in ``transformers``. ValueError when
    the flags conflict or the template does not write the final message.
    """
    if not continue_final_message:
        return render(messages, add_generation_prompt)
    if add_generation_prompt:
        raise ValueError("Cannot set both `continue_final_message` and "
                         "`add_generation_prompt` to True.")
    if not messages:
        raise ValueError("continue_final_message needs a final message to continue")
    final = str(messages[-1].get("content") or "")
    tagged = [*messages[:-1], {**messages[-1], "content": final + _CONTINUE_TAG}]
    rendered = render(tagged, False)
    tag = _CONTINUE_TAG.strip()
    if tag not in rendered or final.strip() not in rendered:
        raise ValueError("continue_final_message is set but the chat template does not write "
                         "the final message")
    where = rendered.rindex(tag)
    if rendered.startswith(_CONTINUE_TAG, where):
        return rendered[:where]
    return rendered[:where].rstrip()  # the template trimmed the message


class _Utf8Decoder:
    def __init__(self) -> None:
        import codecs

        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def step(self, token_id: int) -> str:
        if not 0 <= token_id < 256:
            return ""  # special tokens (EOS) carry no text
        return str(self._decoder.decode(bytes((token_id,))))


class ByteTokenizer:
    """The byte-level tokenizer as a ``Tokenizer`` (ids 0..255 are UTF-8 bytes)."""

    name = "byte"
    vocab_size = byte_tokenizer.VOCAB_SIZE
    eos_token_id: int | None = byte_tokenizer.EOS_TOKEN_ID

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return byte_tokenizer.encode(text)

    def encode_prompt(self, text: str, add_special_tokens: bool = True) -> TokenArray:
        return byte_tokenizer.encode_array(text)

    def render_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True,
                    continue_final_message: bool = False) -> str:
        return render_continuing(
            byte_tokenizer.render_chat,
            [{"role": str(m["role"]), "content": message_text(m.get("content"))}
             for m in messages], add_generation_prompt, continue_final_message)

    def encode_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True,
                    continue_final_message: bool = False) -> TokenArray:
        return self.encode_prompt(self.render_chat(messages, add_generation_prompt,
                                                   continue_final_message))

    def decode(self, token_ids: Sequence[int]) -> str:
        return byte_tokenizer.decode(token_ids)

    def decoder(self) -> IncrementalDecoder:
        return _Utf8Decoder()

    def single_token(self, text: str) -> int | None:
        data = text.encode("utf-8")
        return data[0] if len(data) == 1 else None


class _StreamDecoder:
    def __init__(self, tokenizer: Any) -> None:
        from tokenizers.decoders import DecodeStream

        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)

    def step(self, token_id: int) -> str:
        return self._stream.step(self._tokenizer, token_id) or ""


def _special_token(config: Mapping[str, Any], key: str) -> str | None:
    """A special token's text from tokenizer_config.json (a string or an AddedToken dict)."""
    value = config.get(key)
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(directory: str, config: Mapping[str, Any]) -> str | None:
    """The default chat template: ``chat_template.jinja`` (newer ``save_pretrained``),
    ``chat_template.json``, or ``chat_template`` in tokenizer_config.json (a string, or a
    list of named templates of which "default" is used)."""
    jinja_path = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            return f.read()
    template: Any = config.get("chat_template")
    json_path = os.path.join(directory, "chat_template.json")
    if template is None and os.path.isfile(json_path):
        with open(json_path, encoding="utf-8") as f:
            template = json.load(f).get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _compile_template(source: str) -> Any:
    """A chat template compiled the way ``transformers`` does: a sandboxed, immutable Jinja
    environment with trimmed blocks, loop controls, ``raise_exception``, ``strftime_now`` and
    a non-ASCII-preserving ``tojson``."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        from jinja2.exceptions import TemplateError

        raise TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class HFTokenizer:
    """A local Hugging Face tokenizer (``tokenizers``), with its chat template if it has one.

    Without a chat template, chat prompts are rendered with the byte-level tokenizer's fixed
    ``<|role|>`` template (and then encoded with this tokenizer), so chat still works; a
    real engine would refuse such a chat request, so give real models their template.
    """

    def __init__(self, path: str) -> None:
        from tokenizers import Tokenizer as _HFTokenizer

        if os.path.isdir(path):
            directory, file = path, os.path.join(path, "tokenizer.json")
        else:
            directory, file = os.path.dirname(path) or ".", path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no tokenizer.json at {path!r} (give a tokenizer.json "
                                    "file or a directory holding one)")
        self.path = os.path.abspath(path)
        self.name = self.path
        self._tokenizer = _HFTokenizer.from_file(file)
        config: dict[str, Any] = {}
        config_path = os.path.join(directory, "tokenizer_config.json")
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        self.vocab_size = int(self._tokenizer.get_vocab_size(with_added_tokens=True))
        self.special_tokens: dict[str, str] = {}
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            text = _special_token(config, key)
            if text is not None:
                self.special_tokens[key] = text
        eos = self.special_tokens.get("eos_token")
        self.eos_token_id = self._tokenizer.token_to_id(eos) if eos is not None else None
        source = _chat_template(directory, config)
        self.chat_template: str | None = source
        self._template = _compile_template(source) if source is not None else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def encode_prompt(self, text: str, add_special_tokens: bool = True) -> TokenArray:
        ids = self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        return as_token_array(ids)

    def render_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True,
                    continue_final_message: bool = False) -> str:
        template = self._template
        if template is None:
            return ByteTokenizer().render_chat(messages, add_generation_prompt,
                                               continue_final_message)

        def render(flat: list[dict[str, Any]], generation_prompt: bool) -> str:
            return str(template.render(messages=flat, add_generation_prompt=generation_prompt,
                                       tools=None, **self.special_tokens))

        # Text parts joined by newlines, as vLLM flattens them for string-content templates.
        flat = [{**m, "content": message_text(m.get("content"), "\n")} for m in messages]
        return render_continuing(render, flat, add_generation_prompt, continue_final_message)

    def encode_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True,
                    continue_final_message: bool = False) -> TokenArray:
        # The template writes the special tokens it wants (a BOS); as vLLM, add none.
        return self.encode_prompt(
            self.render_chat(messages, add_generation_prompt, continue_final_message),
            add_special_tokens=self._template is None)

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self._tokenizer.decode(list(token_ids), skip_special_tokens=True))

    def decoder(self) -> IncrementalDecoder:
        return _StreamDecoder(self._tokenizer)

    def single_token(self, text: str) -> int | None:
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        return int(ids[0]) if len(ids) == 1 else None


BYTE_TOKENIZER = ByteTokenizer()


@functools.lru_cache(maxsize=8)
def _load_cached(path: str) -> HFTokenizer:
    return HFTokenizer(path)


def load_tokenizer(path: str | None) -> Tokenizer:
    """The tokenizer at ``path`` (loaded once per process), or the byte-level one for None.

    Raises FileNotFoundError if ``path`` holds no tokenizer.json.
    """
    if not path or path == "byte":
        return BYTE_TOKENIZER
    return _load_cached(os.path.abspath(path))


def text_alphabet(tokenizer: Tokenizer, chars: str) -> tuple[int, ...]:
    """Token ids of the characters of ``chars`` that are one token each, in order.

    The emulated engine writes its deterministic text with such an alphabet, so its output
    decodes to letters and spaces in any tokenizer's vocabulary.
    """
    ids = [tokenizer.single_token(c) for c in chars]
    found = tuple(int(i) for i in ids if i is not None)
    if not found:
        raise ValueError(f"tokenizer {tokenizer.name} has no single-token characters of "
                         f"{chars!r}")
    return found

