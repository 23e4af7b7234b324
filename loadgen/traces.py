"""Trace readers: Mooncake jsonl, Azure LLM inference csv, ServeGen client data.

Readers are generators: they read one line at a time and yield ``TraceRequest``s in file
order, so a large trace is never held in memory. A malformed line raises
``TraceFormatError`` naming the file and the 1-based line number; with
``skip_bad_lines=True`` the reader skips it instead and counts it in the ``ReadStats`` the
caller passed, so no line is ever lost without a count. Blank lines are not requests and
are ignored.
"""

from __future__ import annotations

import ast
import csv
import heapq
import itertools
import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

from loadgen.arrivals import arrivals_in_window
from loadgen.request import Segment, TraceRequest, segment_key

MOONCAKE_BLOCK_SIZE = 512
TRACE_FORMATS = ("mooncake", "azure", "servegen")


class TraceFormatError(ValueError):
    """A line of a trace file that cannot be read as a request."""

    def __init__(self, path: str | Path, line_no: int, message: str) -> None:
        self.path = str(path)
        self.line_no = line_no
        self.message = message
        super().__init__(f"{self.path}:{line_no}: {message}")


@dataclass
class ReadStats:
    """What a reader did: lines seen, requests produced, bad lines skipped (first few kept)."""

    lines: int = 0
    requests: int = 0
    skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)

    def record_skip(self, error: TraceFormatError) -> None:
        self.skipped += 1
        if len(self.skipped_examples) < 10:
            self.skipped_examples.append(str(error))


def _handle_bad_line(error: TraceFormatError, skip: bool, stats: ReadStats | None) -> None:
    if not skip:
        raise error
    if stats is not None:
        stats.record_skip(error)


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if not math.isfinite(number) or number != int(number):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if number <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return int(number)


# ---------------------------------------------------------------------------------------------
# Mooncake


def read_mooncake(
    path: str | Path,
    *,
    skip_bad_lines: bool = False,
    stats: ReadStats | None = None,
    seed: int = 0,
    block_size: int = MOONCAKE_BLOCK_SIZE,
) -> Iterator[TraceRequest]:
    """Requests of a Mooncake FAST'25 jsonl trace.

    Each line is ``{"timestamp": ms, "input_length": n, "output_length": m, "hash_ids": [..]}``.
    Block id ``h`` becomes a segment of ``block_size`` deterministic tokens keyed by ``h``
    alone (ids are already prefix-chained by the trace), the last block cut to what is left
    of ``input_length``; equal ids at equal positions therefore share real token prefixes.
    ``hash_ids`` must hold exactly ``ceil(input_length / block_size)`` ids.
    """
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if stats is not None:
                stats.lines += 1
            if not line.strip():
                continue
            try:
                request = _parse_mooncake_line(line, line_no, seed, block_size)
            except (ValueError, TypeError, KeyError) as exc:
                _handle_bad_line(TraceFormatError(path, line_no, _describe(exc)),
                                 skip_bad_lines, stats)
                continue
            if stats is not None:
                stats.requests += 1
            yield request


def _describe(exc: Exception) -> str:
    if isinstance(exc, KeyError):
        return f"missing field {exc.args[0]!r}"
    return str(exc)


def _parse_mooncake_line(line: str, line_no: int, seed: int, block_size: int) -> TraceRequest:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise ValueError("expected a JSON object")
    timestamp = record["timestamp"]
    if isinstance(timestamp, bool) or not isinstance(timestamp, int | float):
        raise ValueError(f"timestamp must be a number, got {timestamp!r}")
    if not math.isfinite(timestamp) or timestamp < 0:
        raise ValueError(f"timestamp must be finite and >= 0, got {timestamp!r}")
    input_length = _positive_int(record["input_length"], "input_length")
    output_length = _positive_int(record["output_length"], "output_length")
    hash_ids = record["hash_ids"]
    if not isinstance(hash_ids, list) or not all(
        isinstance(h, int) and not isinstance(h, bool) for h in hash_ids
    ):
        raise ValueError("hash_ids must be a list of integers")
    needed = math.ceil(input_length / block_size)
    if len(hash_ids) != needed:
        raise ValueError(
            f"input_length {input_length} needs {needed} hash_ids of {block_size} tokens, "
            f"got {len(hash_ids)}"
        )
    segments = []
    remaining = input_length
    for block_id in hash_ids:
        length = min(block_size, remaining)
        segments.append(Segment(segment_key("mooncake", block_id), length))
        remaining -= length
    return TraceRequest(
        request_id=f"mc{line_no}",
        arrival_s=float(timestamp) / 1000.0,
        prompt_len=input_length,
        output_len=output_length,
        segments=tuple(segments),
        hash_ids=tuple(hash_ids),
        seed=seed,
    )


# ---------------------------------------------------------------------------------------------
# Azure


_AZURE_TIME = re.compile(
    r"(\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2})(?:\.(\d+))?([+-]\d{2}:?\d{2}|Z)?"
)
_AZURE_COLUMNS = {"timestamp": "timestamp", "contexttokens": "context", "generatedtokens": "gen"}


def _parse_azure_time(text: str) -> float:
    """Seconds since the epoch of ``2023-11-16 18:15:46.6805900`` (any fraction length), or a
    plain number of seconds."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    match = _AZURE_TIME.fullmatch(text)
    if match is None:
        raise ValueError(f"unreadable TIMESTAMP {text!r}")
    base = datetime.fromisoformat(match.group(1).replace("T", " "))
    fraction = float("0." + match.group(2)) if match.group(2) else 0.0
    # Traces give local wall time without a zone; only differences matter, so read as naive.
    return (base - datetime(1970, 1, 1)).total_seconds() + fraction


def read_azure(
    path: str | Path,
    *,
    skip_bad_lines: bool = False,
    stats: ReadStats | None = None,
    seed: int = 0,
) -> Iterator[TraceRequest]:
    """Requests of an Azure LLM inference trace csv (``TIMESTAMP,ContextTokens,
    GeneratedTokens``, columns found by name). Arrivals are relative to the first request;
    prompts are unique (the trace has no prefix information)."""
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        header: dict[str, int] | None = None
        first_time: float | None = None
        for row in reader:
            line_no = reader.line_num
            if stats is not None:
                stats.lines += 1
            if not row or all(not cell.strip() for cell in row):
                continue
            if header is None:
                names = [cell.strip().lower() for cell in row]
                header = {_AZURE_COLUMNS[n]: i for i, n in enumerate(names) if n in _AZURE_COLUMNS}
                if len(header) != 3:
                    raise TraceFormatError(
                        path, line_no,
                        "expected a header with TIMESTAMP,ContextTokens,GeneratedTokens, "
                        f"got {row!r}",
                    )
                continue
            try:
                if len(row) < len(names):
                    raise ValueError(f"expected {len(names)} columns, got {len(row)}")
                when = _parse_azure_time(row[header["timestamp"]])
                prompt_len = _positive_int(row[header["context"]].strip(), "ContextTokens")
                output_len = _positive_int(row[header["gen"]].strip(), "GeneratedTokens")
            except ValueError as exc:
                _handle_bad_line(TraceFormatError(path, line_no, str(exc)), skip_bad_lines, stats)
                continue
            if first_time is None:
                first_time = when
            if stats is not None:
                stats.requests += 1
            yield TraceRequest(
                request_id=f"az{line_no}",
                arrival_s=when - first_time,
                prompt_len=prompt_len,
                output_len=output_len,
                segments=(Segment(segment_key("azure", line_no), prompt_len),),
                seed=seed,
            )


# ---------------------------------------------------------------------------------------------
# ServeGen


@dataclass(frozen=True)
class _LengthDist:
    values: np.ndarray
    probs: np.ndarray

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        return rng.choice(self.values, size=size, p=self.probs)


def _parse_length_dist(text: object, where: str) -> _LengthDist:
    if not isinstance(text, str | dict):
        raise ValueError(f"{where}: expected a dict string, got {type(text).__name__}")
    try:
        mapping = ast.literal_eval(text) if isinstance(text, str) else text
    except (ValueError, SyntaxError) as exc:
        raise ValueError(f"{where}: unreadable distribution ({exc})") from None
    if not isinstance(mapping, dict) or not mapping:
        raise ValueError(f"{where}: expected a non-empty {{length: probability}} dict")
    values = np.array([max(1, int(k)) for k in mapping], dtype=np.int64)
    probs = np.array([float(v) for v in mapping.values()], dtype=float)
    if (probs < 0).any() or probs.sum() <= 0:
        raise ValueError(f"{where}: probabilities must be non-negative with a positive sum")
    return _LengthDist(values, probs / probs.sum())


def _load_servegen_dataset(path: Path) -> list[tuple[float, _LengthDist, _LengthDist]]:
    """Windows of a ``chunk-N-dataset.json``: (start s, input dist, output dist), sorted."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as exc:
        raise TraceFormatError(path, exc.lineno, f"not valid JSON ({exc.msg})") from None
    if not isinstance(data, dict) or not data:
        raise TraceFormatError(path, 1, "expected an object of windows")
    windows = []
    for key, value in data.items():
        where = f"window {key!r}"
        try:
            start = float(key)
            if not isinstance(value, dict):
                raise ValueError(f"{where}: expected an object")
            windows.append((
                start,
                _parse_length_dist(value["input_tokens"], f"{where} input_tokens"),
                _parse_length_dist(value["output_tokens"], f"{where} output_tokens"),
            ))
        except KeyError as exc:
            raise TraceFormatError(path, 1, f"{where}: missing {exc.args[0]!r}") from None
        except ValueError as exc:
            raise TraceFormatError(path, 1, str(exc)) from None
    windows.sort(key=lambda w: w[0])
    return windows


@dataclass(frozen=True)
class _RateWindow:
    start_s: float
    rate: float
    cv: float
    pattern: str
    shape: float


def _read_servegen_windows(
    path: Path, skip_bad_lines: bool, stats: ReadStats | None
) -> Iterator[tuple[int, _RateWindow]]:
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        for row in reader:
            line_no = reader.line_num
            if stats is not None:
                stats.lines += 1
            if not row or all(not c.strip() for c in row):
                continue
            try:
                if len(row) < 3:
                    raise ValueError(
                        "expected timestamp_s,rate_rps,cv,pattern,param1,param2, "
                        f"got {len(row)} columns"
                    )
                start = float(row[0])
                rate = float(row[1])
                cv = float(row[2]) if row[2].strip() else 0.0
                pattern = row[3].strip() if len(row) > 3 else ""
                shape = float(row[4]) if len(row) > 4 and row[4].strip() else 1.0
                if not all(math.isfinite(x) for x in (start, rate, cv, shape)):
                    raise ValueError("non-finite number")
                if rate < 0 or cv < 0:
                    raise ValueError("rate and cv must be >= 0")
                if rate > 0 and pattern.lower() not in ("gamma", "weibull", "exponential",
                                                        "poisson", ""):
                    raise ValueError(f"unknown pattern {pattern!r}")
                if rate > 0 and pattern.lower() == "weibull" and shape <= 0:
                    raise ValueError("Weibull shape (param1) must be positive")
            except ValueError as exc:
                _handle_bad_line(TraceFormatError(path, line_no, str(exc)), skip_bad_lines, stats)
                continue
            yield line_no, _RateWindow(start, rate, cv, pattern, shape)


def _servegen_pairs(path: Path) -> list[tuple[Path, Path]]:
    """(trace csv, dataset json) pairs named by ``path``: one pair, or every pair in a folder."""
    if path.is_dir():
        pairs = []
        for trace in sorted(path.glob("chunk-*-trace.csv")):
            dataset = trace.with_name(trace.name.replace("-trace.csv", "-dataset.json"))
            if dataset.exists():
                pairs.append((trace, dataset))
        if not pairs:
            raise FileNotFoundError(f"no chunk-N-trace.csv/chunk-N-dataset.json pairs in {path}")
        return pairs
    name = path.name
    if name.endswith("-trace.csv"):
        return [(path, path.with_name(name.replace("-trace.csv", "-dataset.json")))]
    if name.endswith("-dataset.json"):
        return [(path.with_name(name.replace("-dataset.json", "-trace.csv")), path)]
    raise ValueError(f"{path}: expected a chunk-N-trace.csv, chunk-N-dataset.json or a folder")


def _servegen_client(
    trace_path: Path,
    dataset_path: Path,
    client: int,
    seed: int,
    start_s: float,
    end_s: float,
    skip_bad_lines: bool,
    stats: ReadStats | None,
) -> Iterator[TraceRequest]:
    dataset = _load_servegen_dataset(dataset_path)
    dataset_starts = [w[0] for w in dataset]
    windows = list(_read_servegen_windows(trace_path, skip_bad_lines, stats))
    starts = [w.start_s for _, w in windows]
    # The last window lasts as long as the shortest gap between windows (600 s in ServeGen).
    gaps = [b - a for a, b in itertools.pairwise(starts) if b > a]
    last_length = min(gaps) if gaps else 600.0
    for position, (line_no, window) in enumerate(windows):
        if position + 1 < len(windows):
            window_end = windows[position + 1][1].start_s
        else:
            window_end = window.start_s + last_length
        lo, hi = max(window.start_s, start_s), min(window_end, end_s)
        if window.rate <= 0 or hi <= lo:
            continue
        # Each window is generated from its own seed, so skipping windows changes nothing else.
        window_seed = (seed * 7919 + client) * 1_000_003 + line_no
        times = arrivals_in_window(window.pattern, window.rate, window.cv, window.shape,
                                   lo, hi, window_seed)
        if times.size == 0:
            continue
        index = max(0, int(np.searchsorted(dataset_starts, lo, side="right")) - 1)
        _, input_dist, output_dist = dataset[index]
        rng = np.random.default_rng([seed, client, line_no])
        inputs = input_dist.sample(rng, times.size)
        outputs = output_dist.sample(rng, times.size)
        for k in range(times.size):
            if stats is not None:
                stats.requests += 1
            prompt_len = int(inputs[k])
            yield TraceRequest(
                request_id=f"sg{client}-{line_no}-{k}",
                arrival_s=float(times[k]) - start_s,
                prompt_len=prompt_len,
                output_len=int(outputs[k]),
                segments=(Segment(segment_key("servegen", client, line_no, k), prompt_len),),
                session_id=f"client{client}",
                seed=seed,
            )


def read_servegen(
    path: str | Path,
    *,
    skip_bad_lines: bool = False,
    stats: ReadStats | None = None,
    seed: int = 0,
    start_s: float = 0.0,
    end_s: float = math.inf,
) -> Iterator[TraceRequest]:
    """Requests generated from ServeGen client data between ``start_s`` and ``end_s`` of the
    trace's own time (arrivals relative to ``start_s``).

    ``path`` is a ``chunk-N-trace.csv`` (its ``chunk-N-dataset.json`` beside it), or a folder
    of such pairs (one client each; their requests are merged in time order). In each
    ``trace.csv`` window with ``rate_rps > 0``, gaps follow the window's pattern — Gamma with
    the window's ``cv``, Weibull with shape ``param1``, Exponential — rescaled to the window's
    mean rate; prompt and output lengths are drawn from the dataset window in force (the
    latest whose start is <= the window's). Prompts are unique (no prefix data).
    """
    pairs = _servegen_pairs(Path(path))
    streams: list[Iterable[TraceRequest]] = [
        _servegen_client(trace, dataset, client, seed, start_s, end_s, skip_bad_lines, stats)
        for client, (trace, dataset) in enumerate(pairs)
    ]
    yield from heapq.merge(*streams, key=lambda r: r.arrival_s)


def read_trace(
    path: str | Path,
    trace_format: str,
    *,
    skip_bad_lines: bool = False,
    stats: ReadStats | None = None,
    seed: int = 0,
) -> Iterator[TraceRequest]:
    """Dispatch to the reader of ``trace_format`` (one of ``TRACE_FORMATS``)."""
    if trace_format == "mooncake":
        return read_mooncake(path, skip_bad_lines=skip_bad_lines, stats=stats, seed=seed)
    if trace_format == "azure":
        return read_azure(path, skip_bad_lines=skip_bad_lines, stats=stats, seed=seed)
    if trace_format == "servegen":
        return read_servegen(path, skip_bad_lines=skip_bad_lines, stats=stats, seed=seed)
    raise ValueError(f"unknown trace format {trace_format!r}; choose from {TRACE_FORMATS}")
