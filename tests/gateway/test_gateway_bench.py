"""`llmfleet bench gateway` end to end on a tiny load: direct calls, llmfleet under uvicorn
and the Rust routers when installed (Ray left out with ``--skip-ray`` to keep it fast)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math

import pytest

from router.gateway_bench import (
    RUST_ROUTERS,
    BenchOptions,
    Endpoint,
    cpu_ns,
    run_batch,
    run_bench,
)

CONTRACT = ("added_latency_ms_p50", "added_latency_ms_p99", "added_ttft_ms_p50",
            "cpu_ms_per_request", "requests_per_second", "concurrency")


@pytest.mark.e2e
def test_gateway_bench_small_run() -> None:
    options = BenchOptions(rounds=1, requests_c1=20, requests_c32=64, ttft_requests=10,
                           stream_requests=4, stream_concurrency=2, stream_tokens=32,
                           distinct_prompts=16, prompt_tokens=256, skip_ray=True,
                           progress=False)
    result = run_bench(options)
    json.dumps(result)  # the whole result is JSON
    results = result["results"]
    assert result["skipped"]["ray-1"] == result["skipped"]["ray-2"] == "skipped (--skip-ray)"
    for name, (module, _, _) in RUST_ROUTERS.items():
        if importlib.util.find_spec(module) is None:
            assert "not installed" in result["skipped"][name]
        else:
            assert name in results
    assert {"direct", "uvicorn"} <= set(results)
    for name, row in results.items():
        for key in CONTRACT:
            assert isinstance(row[key], int | float) and math.isfinite(row[key]), (name, key)
        assert row["requests_per_second"] > 0
        assert set(row["by_concurrency"]) == {"1", "32"}
        assert row["limits"]["bound"]
        # Every target relays the same events of the same answers: nothing lost or added.
        assert row["sse_events_per_stream"] == results["direct"]["sse_events_per_stream"]
    direct = results["direct"]
    assert direct["added_latency_ms_p50"] == 0 and direct["added_ttft_ms_p50"] == 0
    assert direct["cpu_ms_per_request"] == 0  # no gateway process to charge
    assert direct["sse_events_per_stream"] >= 2  # tokens, then [DONE]
    for name in set(results) - {"direct"}:
        row = results[name]
        assert row["cpu_ms_per_request"] > 0 and row["cpu_ms_per_streamed_request"] > 0
        assert row["pids"] >= 1
        # One round: a target's p50 is direct's p50 plus what it adds (each rounded to µs).
        for c in ("1", "32"):
            mine, base = row["by_concurrency"][c], direct["by_concurrency"][c]
            assert mine["latency_ms_p50"] == pytest.approx(
                base["latency_ms_p50"] + mine["added_latency_ms_p50"], abs=0.003)
    assert "goals_met" in results["uvicorn"]
    assert result["client"]["cpu_ms_per_request_median"] > 0


def test_cpu_ns_counts_this_process_threads() -> None:
    import os

    before = cpu_ns([os.getpid()])[os.getpid()]
    deadline = sum(range(2_000_000))  # some work on this thread
    after = cpu_ns([os.getpid()])[os.getpid()]
    assert deadline > 0 and after[0] > before[0]
    assert cpu_ns([2**22 + 12345]) == {2**22 + 12345: (0, 0)}  # no such process: nothing


async def _echo_server(responses: list[bytes]) -> tuple[asyncio.Server, int]:
    """A server answering each request with the next canned response (keep-alive)."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for response in responses:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            writer.write(response)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_load_client_reads_chunked_streams_and_reports_errors() -> None:
    events = [b'data: {"a":1}\n\n', b"data: [DONE]\n\n"]
    stream = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + b"".join(
        b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n"
    server, port = await _echo_server([stream, stream, stream])
    async with server:
        result = await run_batch([Endpoint("127.0.0.1", port)], [b"{}"], 2, 1)
    assert len(result.latency_ms) == 2 and (result.latency_ms > 0).all()
    assert (result.ttft_ms <= result.latency_ms).all()
    assert result.events == 4  # two events per stream, the warm-up request not counted
    refusal = b"HTTP/1.1 429 Too Many Requests\r\ncontent-length: 4\r\n\r\nbusy"
    server, port = await _echo_server([refusal])
    async with server:
        with pytest.raises(RuntimeError, match="HTTP 429: b'busy'"):
            await run_batch([Endpoint("127.0.0.1", port)], [b"{}"], 1, 1)
