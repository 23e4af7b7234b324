"""Trace readers: the sample traces, malformed lines, prefix sharing of Mooncake block ids."""

from __future__ import annotations

import ast
import itertools
import json
from pathlib import Path

import pytest

from loadgen.config import RunConfig, load_workload
from loadgen.traces import (
    ReadStats,
    TraceFormatError,
    read_azure,
    read_mooncake,
    read_servegen,
)
from proto.byte_tokenizer import EOS_TOKEN_ID

TRACES = Path("/work/shared/traces")
if not TRACES.exists():  # CI clones put shared/ beside the repo
    TRACES = Path(__file__).resolve().parents[3] / "shared" / "traces"


def _mooncake_line(ts: int, length: int, hash_ids: list[int], out: int = 5) -> str:
    return json.dumps({"timestamp": ts, "input_length": length, "output_length": out,
                       "hash_ids": hash_ids})


def test_mooncake_blocks_share_real_prefixes(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join([
        _mooncake_line(0, 1100, [1, 2, 3]),
        _mooncake_line(500, 1000, [1, 2]),
        _mooncake_line(900, 700, [9, 2]),
    ]) + "\n")
    a, b, c = list(read_mooncake(path))
    ta, tb, tc = a.token_ids(), b.token_ids(), c.token_ids()
    assert (len(ta), len(tb), len(tc)) == (1100, 1000, 700)
    assert ta[:1000] == tb  # same ids at the same positions: same tokens, last block partial
    assert ta[:512] != tc[:512]
    assert tc[512:700] == ta[512:700]  # block 2's content depends on its id alone
    assert max(ta + tb + tc) < EOS_TOKEN_ID and min(ta) >= 0
    assert (a.arrival_s, b.arrival_s, c.arrival_s) == (0.0, 0.5, 0.9)
    assert a.hash_ids == (1, 2, 3)


def test_mooncake_bad_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([
        _mooncake_line(0, 600, [1, 2]),
        "",
        '{"timestamp": 5, "input_length": 600, "output_length": 3}',
        _mooncake_line(7, 600, [1]),
        "not json",
        _mooncake_line(9, 100, [4]),
    ]) + "\n")
    with pytest.raises(TraceFormatError) as info:
        list(read_mooncake(path))
    assert info.value.line_no == 3
    assert f"{path}:3:" in str(info.value) and "hash_ids" in str(info.value)

    stats = ReadStats()
    requests = list(read_mooncake(path, skip_bad_lines=True, stats=stats))
    assert [r.arrival_s for r in requests] == [0.0, 0.009]
    assert stats.skipped == 3 and stats.requests == 2 and stats.lines == 6
    assert [e.split(":")[1] for e in stats.skipped_examples] == ["3", "4", "5"]
    assert "needs 2 hash_ids" in stats.skipped_examples[1]


def test_readers_are_lazy(tmp_path: Path) -> None:
    path = tmp_path / "late.jsonl"
    path.write_text(_mooncake_line(0, 10, [1]) + "\n" + "garbage\n")
    reader = read_mooncake(path)
    assert next(reader).prompt_len == 10  # the bad second line is not read yet
    with pytest.raises(TraceFormatError):
        next(reader)


def test_azure_reads_sample_and_rejects_bad_rows(tmp_path: Path) -> None:
    sample = list(itertools.islice(read_azure(TRACES / "AzureLLMInferenceTrace_conv.csv"), 3))
    assert [(r.prompt_len, r.output_len) for r in sample] == [(374, 44), (396, 109), (879, 55)]
    assert sample[0].arrival_s == 0.0
    assert sample[1].arrival_s == pytest.approx(50.9951690 - 46.6805900)

    path = tmp_path / "az.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                    "2023-11-16 18:15:46.6805900,374,44\n"
                    "2023-11-16 18:15:47,abc,3\n"
                    "2023-11-16 18:15:48.5,10,0\n"
                    "2023-11-16 18:15:49.25,10,2\n")
    with pytest.raises(TraceFormatError, match=r"az\.csv:3: ContextTokens"):
        list(read_azure(path))
    stats = ReadStats()
    ok = list(read_azure(path, skip_bad_lines=True, stats=stats))
    assert [r.prompt_len for r in ok] == [374, 10]
    assert ok[1].arrival_s == pytest.approx(49.25 - 46.68059)
    assert stats.skipped == 2


def test_azure_needs_a_header(tmp_path: Path) -> None:
    path = tmp_path / "noheader.csv"
    path.write_text("2023-11-16 18:15:46.6805900,374,44\n")
    with pytest.raises(TraceFormatError, match=r"noheader\.csv:1: expected a header"):
        list(read_azure(path))


def test_servegen_generates_from_windows() -> None:
    trace = TRACES / "servegen/language/m-large/chunk-0-trace.csv"
    stats = ReadStats()
    day = list(read_servegen(trace, end_s=86_400, stats=stats))
    # Rates in the csv integrate to the expected count over the first day (within noise).
    expected = 0.0
    for line in trace.read_text().splitlines():
        start, rate = (float(x) for x in line.split(",")[:2])
        if start < 86_400:
            expected += rate * 600
    assert len(day) == pytest.approx(expected, rel=0.1)
    times = [r.arrival_s for r in day]
    assert times == sorted(times) and times[0] >= 0 and times[-1] < 86_400
    dataset = json.loads((trace.parent / "chunk-0-dataset.json").read_text())
    support = {int(k) for k in ast.literal_eval(dataset["0"]["input_tokens"])}
    assert {r.prompt_len for r in day if r.arrival_s < 21_600} <= support
    again = list(itertools.islice(read_servegen(trace, end_s=86_400), 50))
    assert [(r.arrival_s, r.prompt_len) for r in again] == [(r.arrival_s, r.prompt_len)
                                                            for r in day[:50]]


def test_servegen_bad_row(tmp_path: Path) -> None:
    source = TRACES / "servegen/language/m-large/chunk-0-dataset.json"
    (tmp_path / "chunk-3-dataset.json").write_bytes(source.read_bytes())
    trace = tmp_path / "chunk-3-trace.csv"
    trace.write_text("0,1.0,1.0,Gamma,1.0,1.0\n600,x,1,Gamma,1,1\n1200,0.5,2.0,Gamma,0.25,8\n")
    with pytest.raises(TraceFormatError, match=r"chunk-3-trace\.csv:2:"):
        list(read_servegen(trace))
    stats = ReadStats()
    requests = list(read_servegen(tmp_path, skip_bad_lines=True, stats=stats))
    assert stats.skipped == 1
    # Window 0 now runs until the next good row (1200 s); the last one lasts as long as the
    # shortest gap between the rows read (1200 s).
    assert requests and all(r.arrival_s < 2400 for r in requests)
    assert any(600 <= r.arrival_s < 1200 for r in requests)


def test_load_workload_rescales_and_replays() -> None:
    config = RunConfig(trace=str(TRACES / "synthetic_trace.jsonl"), trace_format="mooncake",
                       rate=10.0, max_requests=5000)
    requests = load_workload(config)
    assert len(requests) == 5000
    assert requests[0].arrival_s == 0.0
    span = requests[-1].arrival_s
    assert 4999 / span == pytest.approx(10.0, rel=1e-6)
    first, replayed = requests[0], requests[3993]
    assert replayed.request_id.endswith("-r1")
    assert replayed.prompt_len == first.prompt_len
    # Replays get fresh prefix keys: they do not share tokens with the first pass.
    assert replayed.token_ids()[:512] != first.token_ids()[:512]
