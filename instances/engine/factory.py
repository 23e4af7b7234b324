"""Builds engine cores from a profile name and an executor kind."""

from __future__ import annotations

from typing import Any

from instances.engine.config import EngineConfig
from instances.engine.core import EngineCore
from instances.engine.executor import Executor
from instances.engine.profile import HardwareProfile
from proto.defaults import DEFAULT_PROFILE
from proto.profiles import profile_fields

EXECUTORS = ("emulated", "tiny")
DEFAULT_PROFILES = {"emulated": DEFAULT_PROFILE, "tiny": "tiny-cpu"}


def load_profile(name: str) -> HardwareProfile:
    """The named profile from ``profiles.json``; ValueError listing the names if unknown."""
    return HardwareProfile(name=name, **profile_fields(name))


def build_executor(executor: str, profile: HardwareProfile, seed: int = 0,
                   tokenizer: str | None = None) -> Executor:
    """An executor of kind ``executor`` ("emulated" or "tiny") timed by ``profile``.

    ``tokenizer`` (a path for ``proto.tokenize.load_tokenizer``; None: byte-level) sets the
    emulated executor's vocabulary; the tiny model is byte-level only.
    """
    if executor == "emulated":
        from instances.engine.emulated import EmulatedExecutor, alphabet_for
        from proto.tokenize import load_tokenizer

        tok = load_tokenizer(tokenizer)
        return EmulatedExecutor(profile, seed=seed, alphabet=alphabet_for(tok),
                                vocab_size=tok.vocab_size)
    if tokenizer:
        raise ValueError(f"the {executor} executor is byte-level: --tokenizer needs the "
                         "emulated executor")
    if executor == "tiny":
        from instances.engine.tiny import TinyExecutor

        return TinyExecutor(profile, seed=seed)
    raise ValueError(f"unknown executor {executor!r}; known: {', '.join(EXECUTORS)}")


def build_engine_core(
    executor: str = "emulated",
    profile: str | None = None,
    seed: int = 0,
    tokenizer: str | None = None,
    **config_overrides: Any,
) -> EngineCore:
    """An ``EngineCore`` with the given executor kind and profile.

    ``profile`` defaults to the executor's own (h100-llama3-8b for emulated, tiny-cpu for
    tiny); ``tokenizer`` the replica's tokenizer path (None: byte-level);
    ``config_overrides`` are ``EngineConfig`` fields.
    """
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}; known: {', '.join(EXECUTORS)}")
    hardware = load_profile(profile or DEFAULT_PROFILES[executor])
    config = EngineConfig(**config_overrides)
    return EngineCore(config, build_executor(executor, hardware, seed=seed,
                                             tokenizer=tokenizer))
