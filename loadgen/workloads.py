"""Synthetic workloads: multi-turn conversations, Zipf-popular prefixes, SGLang-style
generated-shared-prefix groups, and long/short prompt mixes (for LAPS).

Each generator is a pure function of its parameters and ``seed`` and returns
``TraceRequest``s sorted by arrival. Prompts are built from ``Segment``s, so prefix sharing is
exact: a shared system prompt is the same segment key in every request that uses it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from loadgen.arrivals import gamma_arrivals, poisson_arrivals
from loadgen.request import Segment, TraceRequest, segment_key


def _arrivals(rate: float, count: int, seed: int, cv: float) -> np.ndarray:
    """Poisson arrivals (cv == 1) or Gamma arrivals with the given cv, starting near 0."""
    if cv == 1.0:
        times = poisson_arrivals(rate, count, seed)
    else:
        times = gamma_arrivals(rate, cv, count, seed)
    return times - (times[0] if times.size else 0.0)


def _lognormal_lengths(
    rng: np.random.Generator, mean: float, sigma: float, size: int, low: int, high: int
) -> np.ndarray:
    """Integer lengths with the given mean (before clipping to [low, high])."""
    if sigma <= 0:
        return np.full(size, round(mean), dtype=np.int64)
    mu = math.log(mean) - sigma * sigma / 2.0
    values = rng.lognormal(mu, sigma, size=size)
    return np.clip(np.rint(values), low, high).astype(np.int64)


def _zipf_choices(rng: np.random.Generator, n_items: int, exponent: float, size: int) -> np.ndarray:
    """Item indices 0..n_items-1 drawn with probability ∝ 1 / (rank + 1) ** exponent."""
    weights = 1.0 / np.power(np.arange(1, n_items + 1, dtype=float), exponent)
    return rng.choice(n_items, size=size, p=weights / weights.sum())


@dataclass(frozen=True)
class MultiTurnConfig:
    """Conversations that share system prompts and grow their history turn by turn.

    Sessions start as a Poisson process at ``rate / mean turns``; turn k+1 of a session
    arrives ``think_time`` (exponential, mean ``think_time_mean_s``) after turn k *arrives*
    (open loop: the generator cannot know response times). Turn k's prompt is the system
    prompt, then every earlier user message and assistant answer, then the new user message,
    so consecutive turns share everything but the newest answer and question. The assistant
    answers in the history are generated text of the recorded ``output_len`` (the engine's
    own output tokens are not known when the workload is built), so they miss the cache.
    """

    num_system_prompts: int = 16
    system_prompt_len: int = 2048
    system_zipf_exponent: float = 1.0
    turns_min: int = 2
    turns_max: int = 10
    user_len_mean: float = 300.0
    user_len_sigma: float = 0.8
    output_len_mean: float = 200.0
    output_len_sigma: float = 0.8
    think_time_mean_s: float = 15.0
    max_prompt_len: int = 30_000


def multi_turn(
    count: int, rate: float, seed: int, cv: float = 1.0, config: MultiTurnConfig | None = None
) -> list[TraceRequest]:
    """``count`` requests of synthetic multi-turn conversations (see ``MultiTurnConfig``)."""
    cfg = config or MultiTurnConfig()
    if cfg.turns_min < 1 or cfg.turns_max < cfg.turns_min:
        raise ValueError("need 1 <= turns_min <= turns_max")
    mean_turns = (cfg.turns_min + cfg.turns_max) / 2.0
    n_sessions = max(1, math.ceil(count / mean_turns * 1.3) + 8)
    while True:
        requests = _multi_turn_sessions(n_sessions, rate / mean_turns, seed, cv, cfg)
        requests.sort(key=lambda r: (r.arrival_s, r.request_id))
        last_session_start = max(r.arrival_s for r in requests if r.turn == 0)
        # Complete only if no session not yet generated could arrive before the count-th.
        if len(requests) >= count and requests[count - 1].arrival_s <= last_session_start:
            return requests[:count]
        n_sessions *= 2


def _multi_turn_sessions(
    n_sessions: int, session_rate: float, seed: int, cv: float, cfg: MultiTurnConfig
) -> list[TraceRequest]:
    rng = np.random.default_rng([seed, 1])
    starts = _arrivals(session_rate, n_sessions, seed, cv)
    system_ids = _zipf_choices(rng, cfg.num_system_prompts, cfg.system_zipf_exponent, n_sessions)
    n_turns = rng.integers(cfg.turns_min, cfg.turns_max + 1, size=n_sessions)
    requests: list[TraceRequest] = []
    for session in range(n_sessions):
        turns = int(n_turns[session])
        user_lens = _lognormal_lengths(
            rng, cfg.user_len_mean, cfg.user_len_sigma, turns, 4, int(cfg.user_len_mean * 8)
        )
        out_lens = _lognormal_lengths(
            rng, cfg.output_len_mean, cfg.output_len_sigma, turns, 1,
            int(cfg.output_len_mean * 8),
        )
        thinks = rng.exponential(cfg.think_time_mean_s, size=turns)
        system_index = int(system_ids[session])
        history: list[Segment] = [
            Segment(segment_key("sys", seed, system_index), cfg.system_prompt_len)
        ]
        arrival = float(starts[session])
        session_id = f"s{session}"
        for turn in range(turns):
            user = Segment(segment_key("user", seed, session, turn), int(user_lens[turn]))
            prompt = (*history, user)
            prompt_len = sum(s.length for s in prompt)
            if prompt_len > cfg.max_prompt_len:
                break
            requests.append(
                TraceRequest(
                    request_id=f"{session_id}-t{turn}",
                    arrival_s=arrival,
                    prompt_len=prompt_len,
                    output_len=int(out_lens[turn]),
                    segments=prompt,
                    session_id=session_id,
                    turn=turn,
                    group=f"sys{system_index}",
                    seed=seed,
                )
            )
            answer = Segment(segment_key("asst", seed, session, turn), int(out_lens[turn]))
            history = [*prompt, answer]
            arrival += float(thinks[turn])
    return requests


@dataclass(frozen=True)
class SharedPrefixConfig:
    """SGLang's generated-shared-prefix benchmark: groups of prompts sharing a system prompt.

    Defaults are SGLang's: 64 groups x 16 prompts, 2,048-token system prompt, 128-token
    question, 256 output tokens. Prompts are shuffled across groups before arrivals are laid.
    """

    num_groups: int = 64
    prompts_per_group: int = 16
    system_prompt_len: int = 2048
    question_len: int = 128
    output_len: int = 256


def generated_shared_prefix(
    count: int, rate: float, seed: int, cv: float = 1.0,
    config: SharedPrefixConfig | None = None,
) -> list[TraceRequest]:
    """Up to ``count`` prompts of the shared-prefix groups (all of them if count <= 0)."""
    cfg = config or SharedPrefixConfig()
    total = cfg.num_groups * cfg.prompts_per_group
    n = total if count <= 0 else min(count, total)
    rng = np.random.default_rng([seed, 2])
    order = rng.permutation(total)[:n]
    times = _arrivals(rate, n, seed, cv)
    requests = []
    for position, flat in enumerate(order):
        group, index = divmod(int(flat), cfg.prompts_per_group)
        segments = (
            Segment(segment_key("gsp-sys", seed, group), cfg.system_prompt_len),
            Segment(segment_key("gsp-q", seed, group, index), cfg.question_len),
        )
        requests.append(
            TraceRequest(
                request_id=f"g{group}-p{index}",
                arrival_s=float(times[position]),
                prompt_len=cfg.system_prompt_len + cfg.question_len,
                output_len=cfg.output_len,
                segments=segments,
                group=f"g{group}",
                seed=seed,
            )
        )
    return requests


@dataclass(frozen=True)
class ZipfPrefixConfig:
    """Requests whose prefix is one of ``num_prefixes`` documents, chosen Zipf-popularly."""

    num_prefixes: int = 200
    zipf_exponent: float = 1.1
    prefix_len: int = 4096
    suffix_len_mean: float = 256.0
    suffix_len_sigma: float = 0.5
    output_len_mean: float = 128.0
    output_len_sigma: float = 0.5


def zipf_prefixes(
    count: int, rate: float, seed: int, cv: float = 1.0, config: ZipfPrefixConfig | None = None
) -> list[TraceRequest]:
    """``count`` requests with Zipf-popular shared prefixes and unique suffixes."""
    cfg = config or ZipfPrefixConfig()
    rng = np.random.default_rng([seed, 3])
    prefix_ids = _zipf_choices(rng, cfg.num_prefixes, cfg.zipf_exponent, count)
    suffix_lens = _lognormal_lengths(
        rng, cfg.suffix_len_mean, cfg.suffix_len_sigma, count, 1, int(cfg.suffix_len_mean * 8)
    )
    out_lens = _lognormal_lengths(
        rng, cfg.output_len_mean, cfg.output_len_sigma, count, 1, int(cfg.output_len_mean * 8)
    )
    times = _arrivals(rate, count, seed, cv)
    requests = []
    for i in range(count):
        prefix = int(prefix_ids[i])
        segments = (
            Segment(segment_key("zipf-doc", seed, prefix), cfg.prefix_len),
            Segment(segment_key("zipf-q", seed, i), int(suffix_lens[i])),
        )
        requests.append(
            TraceRequest(
                request_id=f"z{i}",
                arrival_s=float(times[i]),
                prompt_len=cfg.prefix_len + int(suffix_lens[i]),
                output_len=int(out_lens[i]),
                segments=segments,
                group=f"doc{prefix}",
                seed=seed,
            )
        )
    return requests


@dataclass(frozen=True)
class LongShortConfig:
    """A mix of short and long unique prompts (LAPS classifies by uncached prefill tokens)."""

    long_fraction: float = 0.2
    short_len_min: int = 32
    short_len_max: int = 256
    long_len_min: int = 4096
    long_len_max: int = 16384
    output_len_min: int = 32
    output_len_max: int = 256


def long_short_mix(
    count: int, rate: float, seed: int, cv: float = 1.0, config: LongShortConfig | None = None
) -> list[TraceRequest]:
    """``count`` unique prompts, a ``long_fraction`` of them long (uniform lengths)."""
    cfg = config or LongShortConfig()
    rng = np.random.default_rng([seed, 4])
    is_long = rng.random(count) < cfg.long_fraction
    short = rng.integers(cfg.short_len_min, cfg.short_len_max + 1, size=count)
    long = rng.integers(cfg.long_len_min, cfg.long_len_max + 1, size=count)
    outs = rng.integers(cfg.output_len_min, cfg.output_len_max + 1, size=count)
    times = _arrivals(rate, count, seed, cv)
    requests = []
    for i in range(count):
        length = int(long[i] if is_long[i] else short[i])
        requests.append(
            TraceRequest(
                request_id=f"ls{i}",
                arrival_s=float(times[i]),
                prompt_len=length,
                output_len=int(outs[i]),
                segments=(Segment(segment_key("ls", seed, i), length),),
                group="long" if is_long[i] else "short",
                seed=seed,
            )
        )
    return requests


WorkloadFn = Callable[..., list[TraceRequest]]

SYNTHETIC_WORKLOADS: dict[str, tuple[WorkloadFn, type]] = {
    "multiturn": (multi_turn, MultiTurnConfig),
    "shared_prefix": (generated_shared_prefix, SharedPrefixConfig),
    "zipf": (zipf_prefixes, ZipfPrefixConfig),
    "long_short": (long_short_mix, LongShortConfig),
}


def build_synthetic(
    name: str, count: int, rate: float, seed: int, cv: float = 1.0,
    params: Mapping[str, Any] | None = None,
) -> list[TraceRequest]:
    """Generate the synthetic workload ``name`` with config fields overridden by ``params``
    (values given as strings are converted to the field's type)."""
    if name not in SYNTHETIC_WORKLOADS:
        raise ValueError(
            f"unknown synthetic workload {name!r}; choose from {sorted(SYNTHETIC_WORKLOADS)}"
        )
    fn, config_cls = SYNTHETIC_WORKLOADS[name]
    config = config_cls(**_coerce_params(config_cls, params or {}))
    return fn(count, rate, seed, cv, config)


def _coerce_params(config_cls: type, params: Mapping[str, Any]) -> dict[str, Any]:
    known = {f.name: f for f in fields(config_cls)}
    out: dict[str, Any] = {}
    for key, value in params.items():
        if key not in known:
            raise ValueError(f"{config_cls.__name__} has no parameter {key!r}; known: "
                             f"{sorted(known)}")
        default = getattr(config_cls(), key)
        out[key] = type(default)(value) if isinstance(value, str) else value
    return out
