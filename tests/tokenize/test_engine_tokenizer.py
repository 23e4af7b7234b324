"""The reference engine with a real tokenizer: counts, chat template, vocabulary, output."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from instances.engine.emulated import ALPHABET, alphabet_for
from instances.engine.factory import build_engine_core
from instances.launcher import free_port
from instances.server import EngineServerConfig, create_engine_app
from proto.tokenize import BYTE_TOKENIZER, load_tokenizer
from tests.fleet import serve_in_thread
from tests.tiny_model import tiny_tokenizer_dir


@pytest.fixture(scope="module")
def engine() -> Iterator[str]:
    path = tiny_tokenizer_dir()
    core = build_engine_core("emulated", num_gpu_blocks=4096, tokenizer=path)
    config = EngineServerConfig(model="tiny", tokenizer=path)
    with serve_in_thread(create_engine_app(core, config, speedup=50.0), free_port()) as url:
        yield url


def test_byte_alphabet_is_unchanged() -> None:
    assert alphabet_for(BYTE_TOKENIZER) == ALPHABET


def test_prompt_tokens_are_the_tokenizers(engine: str) -> None:
    tok = load_tokenizer(tiny_tokenizer_dir())
    prompt = "the cache prefix of the replica router " * 20
    body = httpx.post(engine + "/v1/completions", timeout=30, json={
        "prompt": prompt, "max_tokens": 24}).json()
    assert body["usage"]["prompt_tokens"] == len(tok.encode_prompt(prompt)) < len(prompt) / 3
    assert body["usage"]["completion_tokens"] == 24
    # The emulated output is letters and spaces in this vocabulary, decoded as text.
    text = body["choices"][0]["text"]
    assert text and set(text) <= set("etaoinshrdlcumwfgypbvkjxqz ")
    again = httpx.post(engine + "/v1/completions", timeout=30, json={
        "prompt": prompt, "max_tokens": 24}).json()
    assert again["choices"][0]["text"] == text  # deterministic
    cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= body["usage"]["prompt_tokens"] - 16  # all full blocks hit


def test_chat_is_rendered_with_the_template(engine: str) -> None:
    tok = load_tokenizer(tiny_tokenizer_dir())
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": "hello there"}]
    body = httpx.post(engine + "/v1/chat/completions", timeout=30, json={
        "messages": messages, "max_tokens": 8}).json()
    assert body["usage"]["prompt_tokens"] == len(tok.encode_chat(messages)) == 34


def test_token_ids_follow_the_vocabulary(engine: str) -> None:
    ok = httpx.post(engine + "/v1/completions", timeout=30,
                    json={"prompt": [0, 300, 511], "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["usage"]["prompt_tokens"] == 3
    bad = httpx.post(engine + "/v1/completions", timeout=30,
                     json={"prompt": [0, 512], "max_tokens": 2})
    assert bad.status_code == 400 and "512" in bad.json()["error"]["message"]


def test_tiny_executor_refuses_a_tokenizer() -> None:
    with pytest.raises(ValueError, match="emulated"):
        build_engine_core("tiny", tokenizer=tiny_tokenizer_dir())
