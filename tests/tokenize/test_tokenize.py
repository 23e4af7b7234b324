"""proto.tokenize: the byte-level default and a local Hugging Face tokenizer with a template."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from instances.tiny_llama import BOS, build_tokenizer
from proto import byte_tokenizer
from proto.tokenize import (
    BYTE_TOKENIZER,
    HFTokenizer,
    load_tokenizer,
    message_text,
    text_alphabet,
)
from tests.tiny_model import tiny_tokenizer_dir

CHAT = [{"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def tok() -> HFTokenizer:
    loaded = load_tokenizer(tiny_tokenizer_dir())
    assert isinstance(loaded, HFTokenizer)
    return loaded


def test_no_path_is_the_byte_tokenizer() -> None:
    tok = load_tokenizer(None)
    assert tok is BYTE_TOKENIZER and tok.vocab_size == 257 and tok.eos_token_id == 256
    assert tok.encode_prompt("hé").tolist() == list("hé".encode())
    assert tok.render_chat(CHAT) == byte_tokenizer.render_chat(CHAT)
    assert tok.encode_chat(CHAT).tolist() == byte_tokenizer.encode(byte_tokenizer.render_chat(CHAT))
    decoder = tok.decoder()
    assert "".join(decoder.step(t) for t in [*"né".encode(), 256]) == "né"


def test_hf_tokenizer_counts_model_tokens_not_bytes(tok: HFTokenizer) -> None:
    text = "the cache prefix of the replica router " * 8
    ids = tok.encode_prompt(text)
    assert ids.dtype == np.int32 and ids.flags.c_contiguous
    # BPE merges whole words: far fewer tokens than bytes.
    assert len(ids) < len(text.encode()) / 3
    assert tok.decode(ids.tolist()) == text
    assert tok.vocab_size == 512


def test_completion_prompts_get_the_bos_and_chat_prompts_get_one_from_the_template(
        tok: HFTokenizer) -> None:
    bos = tok.single_token(BOS)
    assert bos is not None
    assert tok.encode_prompt("hello")[0] == bos
    assert bos not in tok.encode_prompt("hello", add_special_tokens=False).tolist()
    rendered = tok.render_chat(CHAT)
    assert rendered == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nbe brief<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nhello there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = tok.encode_chat(CHAT).tolist()
    assert ids.count(bos) == 1 and ids[0] == bos


def test_a_longer_conversation_extends_the_shorter_ones_tokens(tok: HFTokenizer) -> None:
    # Routing keys rely on it: turn n+1's prompt starts with turn n's prompt + answer.
    first = tok.encode_chat(CHAT).tolist()
    longer = [*CHAT, {"role": "assistant", "content": "hi"},
              {"role": "user", "content": "and more"}]
    second = tok.encode_chat(longer).tolist()
    assert second[:len(first) - 4] == first[:-4]  # all but the assistant header


def test_text_parts_are_joined_by_newlines_and_other_parts_refused(tok: HFTokenizer) -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    assert "a\nb" in tok.render_chat([{"role": "user", "content": parts}])
    assert message_text(parts) == "ab"
    with pytest.raises(ValueError, match="text"):
        message_text([{"type": "image_url", "image_url": {"url": "x"}}])


def test_incremental_decoding_holds_broken_characters(tok: HFTokenizer) -> None:
    text = "héllo wörld 😀 done"
    ids = tok.encode(text, add_special_tokens=False)
    decoder = tok.decoder()
    pieces = [decoder.step(i) for i in ids]
    assert "".join(pieces) == text
    assert "\ufffd" not in "".join(pieces)
    assert "" in pieces  # the emoji's bytes span several tokens: some steps give nothing


def test_text_alphabet_maps_characters_to_single_tokens(tok: HFTokenizer) -> None:
    alphabet = text_alphabet(tok, "etaoin ")
    assert len(alphabet) == 7
    assert tok.decode(list(alphabet)) == "etaoin "
    assert text_alphabet(BYTE_TOKENIZER, "ab") == (97, 98)


def test_loads_from_a_file_path_and_template_variants(tmp_path: Path) -> None:
    src = Path(tiny_tokenizer_dir())
    # A bare tokenizer.json: no config, so no template and no EOS; chat still renders.
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(src / "tokenizer.json", bare / "tokenizer.json")
    tok = HFTokenizer(str(bare / "tokenizer.json"))
    assert tok.chat_template is None and tok.eos_token_id is None
    assert tok.render_chat(CHAT) == byte_tokenizer.render_chat(CHAT)
    # chat_template.jinja wins over the config; named-template lists use "default".
    custom = tmp_path / "custom"
    build_tokenizer(str(custom))
    config = json.loads((custom / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "T"},
                               {"name": "default", "template": "{{ messages | length }}"}]
    (custom / "tokenizer_config.json").write_text(json.dumps(config))
    assert HFTokenizer(str(custom)).render_chat(CHAT) == "2"
    (custom / "chat_template.jinja").write_text("{{ messages[0]['content'] | tojson }}")
    assert HFTokenizer(str(custom)).render_chat([{"role": "user", "content": "é"}]) == '"é"'


def test_a_template_can_refuse_a_conversation(tmp_path: Path) -> None:
    custom = tmp_path / "strict"
    build_tokenizer(str(custom))
    (custom / "chat_template.jinja").write_text(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}ok")
    from jinja2.exceptions import TemplateError

    with pytest.raises(TemplateError, match="user first"):
        HFTokenizer(str(custom)).render_chat(CHAT)


def test_missing_tokenizer_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        load_tokenizer(str(tmp_path))
