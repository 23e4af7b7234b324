"""The routing kernels, compiled where built, else in Python: import them from here.

``router/policy/_fastpath.c`` (a C extension that ``pip install`` builds where a C compiler
is present) and ``router/policy/fastpath_py.py`` (plain Python and numpy) implement the same
functions with the same results: the same hash values, ring owners, LRU order and
decisions. The Python one is the reference the tests hold the compiled one to, and the
fallback when the extension is not built; it is several times slower per decision.

``LLMFLEET_PURE_PYTHON=1`` in the environment (read once, at import) selects the Python
kernels even where the extension is built. Without it the compiled kernels are used if
they import; if they do not (no compiler at install time), the Python ones are, with one
warning. ``COMPILED`` says which are in use.
"""

from __future__ import annotations

import logging
import os
from types import ModuleType
from typing import TYPE_CHECKING

__all__ = [
    "COMPILED",
    "LastHolderIndex",
    "PrefixLru",
    "PromptKey",
    "RingIndex",
    "affinity_pick",
    "key_hash",
    "locate",
    "mix64",
    "prefix_hashes",
    "prompt_key",
    "set_vector_kernels",
    "vector_kernels",
    "xxh64",
]

PURE_PYTHON_ENV = "LLMFLEET_PURE_PYTHON"

logger = logging.getLogger(__name__)


def _select() -> tuple[ModuleType, bool]:
    """(the kernels' module, whether it is the compiled one)."""
    from router.policy import fastpath_py

    if os.environ.get(PURE_PYTHON_ENV) == "1":
        return fastpath_py, False
    try:
        from router.policy import _fastpath
    except ImportError as error:
        logger.warning(
            "router.policy._fastpath is not built (%s): routing uses the pure-Python kernels, "
            "same decisions, slower. Reinstall with a C compiler for the compiled ones.", error)
        return fastpath_py, False
    return _fastpath, True


_kernels, COMPILED = _select()

if TYPE_CHECKING:  # one set of types for both (router/policy/_fastpath.pyi)
    from router.policy._fastpath import Candidate as Candidate  # locate's types (typing only)
    from router.policy._fastpath import Continuity as Continuity
    from router.policy._fastpath import (
        LastHolderIndex,
        PrefixLru,
        PromptKey,
        RingIndex,
        affinity_pick,
        key_hash,
        locate,
        mix64,
        prefix_hashes,
        prompt_key,
        set_vector_kernels,
        vector_kernels,
        xxh64,
    )
else:
    LastHolderIndex = _kernels.LastHolderIndex
    PrefixLru = _kernels.PrefixLru
    PromptKey = _kernels.PromptKey
    RingIndex = _kernels.RingIndex
    affinity_pick = _kernels.affinity_pick
    key_hash = _kernels.key_hash
    locate = _kernels.locate
    mix64 = _kernels.mix64
    prefix_hashes = _kernels.prefix_hashes
    prompt_key = _kernels.prompt_key
    set_vector_kernels = _kernels.set_vector_kernels
    vector_kernels = _kernels.vector_kernels
    xxh64 = _kernels.xxh64
