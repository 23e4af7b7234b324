"""`llmfleet bench gateway` runs end to end on a tiny load and reports consistent numbers."""

from __future__ import annotations

from router.gateway_bench import run


def test_gateway_bench_small_run() -> None:
    result = run("uvicorn", requests=24, rounds=1, concurrency=4, prompt_tokens=64,
                 max_tokens=2, speedup=100.0, policy="round_robin")
    assert result["requests"] == 24
    assert result["gateway_latency_ms_p50"] > 0 and result["direct_latency_ms_p50"] > 0
    assert result["added_latency_ms_p50"] == (
        result["gateway_latency_ms_p50"] - result["direct_latency_ms_p50"])
    assert 0 < result["cpu_ms_per_request"] < 1000
    assert result["requests_per_second"] > 0
