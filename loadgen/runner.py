"""Live load generator: replays a workload against an OpenAI-compatible server over HTTP.

The client is ``router.upstream``'s (asyncio protocol + httptools, keep-alive, ``http://``
only); bodies are encoded and SSE events parsed with orjson, so the client's own CPU stays
small next to what it measures.

Each request is a streaming ``POST /v1/completions`` whose ``prompt`` is the list of engine
token ids (the OpenAI API accepts token arrays) and whose ``max_tokens`` is the request's
output length, with ``stream_options.include_usage`` so the final chunk carries usage (and,
where the server reports it, ``usage.prompt_tokens_details.cached_tokens``). Requests are sent
open-loop at their arrival times. The run is bounded: sending stops after ``max_requests``
or ``max_seconds`` and requests still running ``drain_timeout_s`` later are cancelled
(counted as unfinished). The summary has the same fields as the simulator's.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import orjson
from tqdm import tqdm

from loadgen.config import RunConfig, load_workload, warmup_count
from loadgen.metrics import (
    FOLLOWUP_FIELDS,
    RequestOutcome,
    followup_colocation,
    imbalance,
    summarize,
)
from loadgen.request import TraceRequest
from proto.headers import INSTANCE_HEADER, REQUEST_ID_HEADER
from router.upstream import UpstreamError, UpstreamPool

_JSON_HEADERS = ((b"content-type", b"application/json"), (b"accept", b"text/event-stream"))
_INSTANCE = INSTANCE_HEADER.encode()
_REQUEST_ID = REQUEST_ID_HEADER.encode()


def completion_body(request: TraceRequest, model: str, ignore_eos: bool) -> dict[str, Any]:
    """The JSON body of one streaming completion request."""
    body: dict[str, Any] = {
        "model": model,
        "prompt": request.token_ids(),
        "max_tokens": request.output_len,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if ignore_eos:
        body["ignore_eos"] = True  # vLLM/SGLang extension: always produce max_tokens
    return body


def client_pool(url: str, max_concurrency: int, connect_timeout_s: float = 10.0) -> UpstreamPool:
    """The load generator's HTTP/1.1 client to ``url`` (``http://host:port[/prefix]``).

    It is the gateway's own upstream client (``router.upstream``: asyncio protocol +
    httptools, keep-alive): a load generator that spends a millisecond of CPU per request
    in its HTTP library delays its own TTFT timestamps and takes CPU from the system it
    measures (``docs/results/loadgen-client.json``). Up to ``max_concurrency`` (at most 256)
    idle connections are kept.
    """
    return UpstreamPool(url.rstrip("/"), connect_timeout_s=connect_timeout_s,
                        max_idle=min(max_concurrency, 256))


async def _discover_model(client: UpstreamPool) -> str:
    """The first model ``GET /v1/models`` lists, or ``"default"`` if it lists none."""
    try:
        async with asyncio.timeout(10.0):
            response = await client.request(b"GET", "/v1/models", ())
            raw = await response.read()
        data = orjson.loads(raw).get("data") or []
        if response.status == 200 and data:
            return str(data[0]["id"])
    except (UpstreamError, TimeoutError, orjson.JSONDecodeError, AttributeError, KeyError,
            TypeError, IndexError):
        pass
    return "default"


async def send_one(
    client: UpstreamPool,
    request: TraceRequest,
    outcome: RequestOutcome,
    model: str,
    *,
    ignore_eos: bool = False,
    timeout_s: float = 600.0,
    clock: Callable[[], float] = time.perf_counter,
) -> None:
    """Send one request and fill ``outcome`` (TTFT, inter-token gaps, E2E, usage, errors).

    The body is encoded before the clock starts: TTFT is from just before the request is
    written to the first chunk carrying text; output tokens are ``usage.completion_tokens``
    when reported, else text chunks. ``timeout_s`` bounds the wait for the response head and
    for each next piece of the body (an idle timeout, as httpx's read timeout, firing
    0.9-1x ``timeout_s`` after the last piece); a request that runs into it is an error
    ``TimeoutError`` and its connection is dropped.
    """
    body = orjson.dumps(completion_body(request, model, ignore_eos))
    headers = (*_JSON_HEADERS, (_REQUEST_ID, request.request_id.encode()))
    loop = asyncio.get_running_loop()
    start = clock()
    chunks = 0
    last_token_at: float | None = None
    usage: dict[str, Any] | None = None
    response = None
    try:
        async with asyncio.timeout(timeout_s) as deadline:
            response = await client.request(b"POST", "/v1/completions", headers, body)
            instance = response.header(_INSTANCE)
            outcome.instance_id = None if instance is None else instance.decode("latin-1")
            if response.status != 200:
                text = (await response.read()).decode("utf-8", "replace")
                outcome.error = f"HTTP {response.status}: {text[:200]}"
                return
            pending = b""
            renew_at = loop.time() + timeout_s * 0.1
            done = False
            async for piece in response.chunks():
                now_loop = loop.time()
                if now_loop > renew_at:
                    # Moving the timer per token costs more than the rest of the token's
                    # handling; moved at most every tenth of the timeout, it still fires
                    # 0.9-1x ``timeout_s`` after the last piece received.
                    deadline.reschedule(now_loop + timeout_s)
                    renew_at = now_loop + timeout_s * 0.1
                if done:  # read to the end, so the connection is kept alive
                    continue
                lines = (pending + piece).split(b"\n") if pending else piece.split(b"\n")
                pending = lines.pop()  # an incomplete last line waits for the next piece
                for line in lines:
                    if not line.startswith(b"data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        done = True
                        break
                    chunk = orjson.loads(payload)
                    if "error" in chunk:
                        outcome.error = f"stream error: {str(chunk['error'])[:200]}"
                        return
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    choices = chunk.get("choices")
                    if choices and any(choice.get("text") for choice in choices):
                        now = clock()
                        if last_token_at is None:
                            outcome.ttft_s = now - start
                        else:
                            outcome.inter_token_s.append(now - last_token_at)
                        last_token_at = now
                        chunks += 1
        outcome.e2e_s = clock() - start
        if outcome.ttft_s is None:
            outcome.error = "no tokens in stream"
            return
    except TimeoutError:
        outcome.error = f"TimeoutError: nothing received for {timeout_s:g} s"
        return
    except (UpstreamError, orjson.JSONDecodeError) as exc:
        outcome.error = f"{type(exc).__name__}: {str(exc)[:200]}"
        return
    finally:
        # A body not read to its end leaves the connection mid-response: drop it (cancelled
        # at the end of a bounded run, timed out, an error event, or [DONE] before the end).
        if response is not None and not response.complete:
            response.close()
    outcome.output_tokens = chunks
    if usage is not None:
        outcome.output_tokens = int(usage.get("completion_tokens") or chunks)
        details = usage.get("prompt_tokens_details") or {}
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        if cached is not None:
            outcome.cached_tokens = int(cached)


async def run_live(
    config: RunConfig,
    *,
    requests: Sequence[TraceRequest] | None = None,
    outcomes_out: list[RequestOutcome] | None = None,
) -> dict[str, Any]:
    """Replay the workload of ``config`` against ``config.url`` and return the summary JSON
    (``loadgen.metrics.summarize`` fields plus ``mode``, ``url``, ``rate`` and, when the
    gateway named the instance of each response, ``request_imbalance`` over instances).
    ``outcomes_out``, if given, receives the per-request outcomes of the requests sent."""
    workload = list(requests) if requests is not None else load_workload(config)
    workload.sort(key=lambda r: r.arrival_s)
    if config.max_requests is not None:
        workload = workload[:config.max_requests]
    url = config.url.rstrip("/")
    outcomes = [RequestOutcome(r.request_id, r.arrival_s, r.prompt_len, r.output_len)
                for r in workload]
    wall_start = time.perf_counter()
    client = client_pool(url, config.max_concurrency)
    try:
        model = config.model or await _discover_model(client)
        gate = asyncio.Semaphore(config.max_concurrency)
        bar = tqdm(total=len(workload), desc="loadgen", unit="req", file=sys.stderr,
                   disable=not config.progress, leave=False)

        async def one(request: TraceRequest, outcome: RequestOutcome) -> None:
            async with gate:
                await send_one(client, request, outcome, model,
                               ignore_eos=config.ignore_eos,
                               timeout_s=config.request_timeout_s)
            bar.update(1)

        tasks: list[asyncio.Task[None]] = []
        start = time.perf_counter()
        for request, outcome in zip(workload, outcomes, strict=True):
            if config.max_seconds is not None and request.arrival_s > config.max_seconds:
                break
            delay = request.arrival_s - (time.perf_counter() - start)
            if delay > 0:
                await asyncio.sleep(delay)
            # Arrival on the run's clock is when it was actually sent (late sends are visible).
            outcome.arrival_s = time.perf_counter() - start
            tasks.append(asyncio.create_task(one(request, outcome)))
        sent = len(tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=config.drain_timeout_s
                                            if config.max_seconds is not None else None)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        bar.close()
    finally:
        client.close()
    outcomes = outcomes[:sent]
    if outcomes_out is not None:
        outcomes_out.extend(outcomes)
    summary = summarize(outcomes, slo_ttft_s=config.slo_ttft_s, slo_tpot_s=config.slo_tpot_s,
                        warmup_requests=warmup_count(config, len(outcomes)),
                        wall_seconds=time.perf_counter() - wall_start)
    per_instance: dict[str, int] = {}
    for outcome in outcomes:
        if outcome.instance_id is not None:
            per_instance[outcome.instance_id] = per_instance.get(outcome.instance_id, 0) + 1
    request_imbalance = imbalance(list(per_instance.values()))
    served = {o.request_id: o.instance_id for o in outcomes if o.ttft_s is not None}
    followup = followup_colocation(workload[:sent], served)
    summary.update({k: followup.get(k) for k in FOLLOWUP_FIELDS})
    summary.update({
        "mode": "live",
        "url": url,
        "model": model,
        "trace": config.trace,
        "trace_format": config.trace_format,
        "rate": config.rate,
        "seed": config.seed,
        # Busy time is not observable from outside; the request split is the live proxy.
        "load_imbalance": None if request_imbalance is None else round(request_imbalance, 6),
        "request_imbalance": None if request_imbalance is None else round(request_imbalance, 6),
        "per_instance": [{"instance_id": k, "requests": v}
                         for k, v in sorted(per_instance.items())],
    })
    return summary
