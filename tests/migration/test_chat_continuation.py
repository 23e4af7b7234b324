"""Chat token replay on the reference engine: ``continue_final_message`` (vLLM's chat
extension) renders the conversation up to the final assistant message's text, with no
end-of-turn and no new turn, so a chat re-issued with its partial answer (what
``migration.replay.continuation_body`` sends) continues exactly where it stopped."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from instances.engine.factory import build_engine_core
from instances.launcher import free_port
from instances.server import EngineServerConfig, create_engine_app
from migration.replay import CHAT_PATH, continuation_body
from proto.tokenize import BYTE_TOKENIZER, load_tokenizer
from tests.fleet import serve_in_thread
from tests.migration.fleet import reference_tokens
from tests.tiny_model import tiny_tokenizer_dir

SYSTEM = {"role": "system", "content": "Be brief."}
# The tiny model's greedy answer to this starts with 12 ASCII tokens.
CHAT = [{"role": "user", "content": "me gateway a model once token router a alpha"}]
MAX_TOKENS = 120

text_st = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


@given(partial=text_st)
def test_byte_template_continues_the_final_message(partial: str) -> None:
    prompt = BYTE_TOKENIZER.render_chat([SYSTEM, *CHAT])
    continued = BYTE_TOKENIZER.render_chat(
        [SYSTEM, *CHAT, {"role": "assistant", "content": partial}],
        add_generation_prompt=False, continue_final_message=True)
    assert continued == prompt + partial
    assert BYTE_TOKENIZER.encode_chat(
        [SYSTEM, *CHAT, {"role": "assistant", "content": partial}], False, True
    ).tolist() == BYTE_TOKENIZER.encode(prompt + partial)


def test_hf_template_cuts_after_the_final_message_as_transformers_does() -> None:
    tok = load_tokenizer(tiny_tokenizer_dir())
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": [{"type": "text", "text": "Hel\n lo "}]}]
    # transformers' apply_chat_template(..., add_generation_prompt=False,
    # continue_final_message=True) on this template (which trims messages) gives this.
    assert tok.render_chat(messages, False, True) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHel\n lo")
    # An empty final message: the header's trailing whitespace is trimmed too (so replay
    # re-issues a chat with nothing generated yet unchanged).
    assert tok.render_chat([messages[0], {"role": "assistant", "content": ""}], False,
                           True) == tok.render_chat(messages[:1]).rstrip()
    with pytest.raises(ValueError, match="Cannot set both"):
        tok.render_chat(messages, True, True)
    # Without continue_final_message the assistant's turn is closed, no new one opened.
    closed = tok.render_chat(messages, add_generation_prompt=False)
    assert closed.endswith("Hel\n lo<|eot_id|>")


@pytest.fixture(scope="module")
def engine_url() -> Iterator[str]:
    config = EngineServerConfig(model="tiny", instance_id="chat-test",
                                advertise_url="http://127.0.0.1:1", migration_port=None)
    with serve_in_thread(create_engine_app(build_engine_core("tiny"), config, speedup=100.0),
                         free_port()) as url:
        yield url


def _chat(url: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(url + CHAT_PATH, json=body, timeout=60)


@pytest.mark.parametrize("generated", [0, 1, 5, 10])
def test_replayed_chat_continues_where_it_stopped(engine_url: str, generated: int) -> None:
    tokens = reference_tokens(BYTE_TOKENIZER.encode_chat(CHAT).tolist(), MAX_TOKENS, 0.0, "r")
    # Text and tokens agree on the answer's ASCII lead (the tiny model writes arbitrary
    # bytes after it, which text cannot carry back).
    assert all(t < 128 for t in tokens[:generated])
    body = {"messages": CHAT, "max_tokens": MAX_TOKENS, "temperature": 0}
    whole = _chat(engine_url, body).json()
    answer = whole["choices"][0]["message"]["content"]
    assert whole["usage"]["completion_tokens"] == len(tokens)
    replay = continuation_body(CHAT_PATH, body, answer[:generated], generated)
    if generated:
        assert replay["continue_final_message"] and not replay["add_generation_prompt"]
        assert replay["messages"][-1] == {"role": "assistant", "content": answer[:generated]}
    else:
        assert replay == body  # nothing to continue: the request as it was
    rest = _chat(engine_url, replay).json()
    assert answer[:generated] + rest["choices"][0]["message"]["content"] == answer
    assert rest["usage"]["completion_tokens"] == len(tokens) - generated
    assert rest["usage"]["prompt_tokens"] == whole["usage"]["prompt_tokens"] + generated


def test_both_flags_are_refused(engine_url: str) -> None:
    r = _chat(engine_url, {"messages": CHAT, "continue_final_message": True})
    assert r.status_code == 400 and "Cannot set both" in r.json()["error"]["message"]
    ok = _chat(engine_url, {"messages": [*CHAT, {"role": "assistant", "content": "x"}],
                            "continue_final_message": True, "add_generation_prompt": False,
                            "max_tokens": 2})
    assert ok.status_code == 200


def test_a_request_that_continued_its_final_message_is_extended_not_appended_to() -> None:
    for content, extended in [
        ("Once", "Once upon"),
        ([{"type": "text", "text": "Once"}, {"type": "image_url", "image_url": {"url": "x"}}],
         [{"type": "text", "text": "Once upon"}, {"type": "image_url", "image_url": {"url": "x"}}]),
    ]:
        body = {"messages": [*CHAT, {"role": "assistant", "content": content}],
                "continue_final_message": True, "add_generation_prompt": False,
                "max_tokens": 10}
        out = continuation_body(CHAT_PATH, body, " upon", 5)
        assert out["messages"] == [*CHAT, {"role": "assistant", "content": extended}]
        assert out["max_tokens"] == 5 and body["messages"][-1]["content"] == content


def test_replay_of_a_continued_message_continues_where_it_stopped(engine_url: str) -> None:
    body = {"messages": CHAT, "max_tokens": MAX_TOKENS, "temperature": 0}
    answer = _chat(engine_url, body).json()["choices"][0]["message"]["content"]
    started = {"messages": [*CHAT, {"role": "assistant", "content": answer[:2]}],
               "continue_final_message": True, "add_generation_prompt": False,
               "max_tokens": MAX_TOKENS - 2, "temperature": 0}
    whole = _chat(engine_url, started).json()["choices"][0]["message"]["content"]
    assert answer[:2] + whole == answer
    rest = _chat(engine_url, continuation_body(CHAT_PATH, started, whole[:4], 4)).json()
    assert whole[:4] + rest["choices"][0]["message"]["content"] == whole
