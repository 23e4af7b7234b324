"""The tiny Llama's tokenizer (and model) for tests, built once into the repo's build/."""

from __future__ import annotations

from pathlib import Path

from instances.tiny_llama import ensure_built

BUILD = Path(__file__).resolve().parents[1] / "build"


def tiny_tokenizer_dir() -> str:
    """A directory with the tiny Llama's tokenizer (tokenizers only; a second or so once)."""
    return ensure_built(str(BUILD / "tiny-llama-tokenizer"), with_model=False)
