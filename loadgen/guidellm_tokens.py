"""guidellm against the gateway in front of emulated replicas: do both count the same tokens?

guidellm builds synthetic prompts of an exact token length with a local tokenizer (its
"processor"). If the fleet counts tokens with another tokenizer (the byte-level default),
the replicas see prompts of a different length than the benchmark asked for (256 tokens
arrive as ~370 bytes), and every token-denominated number (throughput, TTFT per prompt
token, the routing keys) is off. With ``--tokenizer`` on the fleet, they agree.

For each fleet (with the tiny Llama's tokenizer, and byte-level) and each endpoint
(completions, chat), this runs guidellm (synthetic data, the same tokenizer as processor)
against ``llmfleet up --no-ray`` with two emulated replicas, and compares:

- ``guidellm_prompt_tokens``: the prompts guidellm sent, re-counted with its own processor
  (``transformers.AutoTokenizer``, as guidellm counts them);
- ``replica_prompt_tokens``: what the replicas counted (their ``vllm:prompt_tokens``
  counters, before and after);
- ``guidellm_reported_prompt_tokens``: what guidellm reports (from the replicas' usage).

For chat, the replicas also count the chat template's tokens (role headers), which guidellm's
synthetic prompt length does not include: ``template_tokens`` is that difference, computed
from the template itself, and the check is ``replica = guidellm + template``.

    python -m loadgen.guidellm_tokens --json        (make guidellm installs guidellm first)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from instances.tiny_llama import ensure_built
from proto.tokenize import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
GUIDELLM_VENV = ROOT / "build" / "guidellm-venv"
TOKENIZER_DIR = ROOT / "build" / "tiny-llama-tokenizer"
MODEL = "tiny-llama"

# Re-counts guidellm's prompts with its own processor, in guidellm's environment.
_COUNT_SCRIPT = """
import json, sys
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
prompts = json.load(sys.stdin)
print(json.dumps([len(tok(p).input_ids) for p in prompts]))
"""


class Fleet:
    """``llmfleet up --no-ray`` as a child process; its JSON events tell where things are."""

    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "router.cli", "up", "--no-ray", "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    self.events.put(json.loads(line))

    def wait(self, name: str, timeout_s: float = 180.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llmfleet up exited {self.proc.returncode}")
            with contextlib.suppress(queue.Empty):
                event = self.events.get(timeout=0.5)
                if event.get("event") == name:
                    return event
        raise TimeoutError(f"no {name} event")

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def replica_prompt_tokens(urls: list[str]) -> float:
    """The replicas' prompt-token counters, summed."""
    total = 0.0
    for url in urls:
        for line in httpx.get(url + "/metrics", timeout=5).text.splitlines():
            if line.startswith("vllm:prompt_tokens_total"):
                total += float(line.rsplit(" ", 1)[1])
    return total


def run_guidellm(url: str, endpoint: str, requests: int, prompt_tokens: int,
                 output_tokens: int, out: Path) -> dict[str, Any]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [str(GUIDELLM_VENV / "bin" / "guidellm"), "run",
           "--backend", f"kind=openai_http,target={url},model={MODEL},request_format={endpoint}",
           "--tokenizer", f"kind=huggingface_auto,model={TOKENIZER_DIR}",
           "--data", f"kind=synthetic_text,prompt_tokens={prompt_tokens},"
                     f"output_tokens={output_tokens}",
           "--profile", "kind=constant,rate=8",
           "--constraint", f"kind=max_requests,count={requests}",
           "--output", f"kind=json,path={out}", "--disable-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"guidellm failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    report: dict[str, Any] = json.loads(out.read_text())
    return report


def _prompt_of(body: dict[str, Any]) -> tuple[str, list[dict[str, Any]] | None]:
    if "prompt" in body:
        return str(body["prompt"]), None
    messages = body["messages"]
    content = messages[-1]["content"]
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if p.get("type") == "text")
    return str(content), messages


def count_with_processor(prompts: list[str]) -> list[int]:
    done = subprocess.run(
        [str(GUIDELLM_VENV / "bin" / "python"), "-c", _COUNT_SCRIPT, str(TOKENIZER_DIR)],
        input=json.dumps(prompts), capture_output=True, text=True, check=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    counts: list[int] = json.loads(done.stdout)
    return counts


def measure(fleet_tokenizer: str | None, endpoint: str, args: argparse.Namespace,
            workdir: Path) -> dict[str, Any]:
    fleet_args = ["--engines", "2", "--model", MODEL, "--speedup", "10"]
    if fleet_tokenizer:
        fleet_args += ["--tokenizer", fleet_tokenizer]
    fleet = Fleet(fleet_args)
    try:
        engines = [e["url"] for e in fleet.wait("engines_ready")["engines"]]
        url = fleet.wait("fleet_ready")["url"]
        before = replica_prompt_tokens(engines)
        name = f"{'tok' if fleet_tokenizer else 'byte'}-{endpoint.strip('/').replace('/', '-')}"
        out = workdir / f"guidellm-{name}.json"
        report = run_guidellm(url, endpoint, args.requests, args.prompt_tokens,
                              args.output_tokens, out)
        time.sleep(0.5)
        after = replica_prompt_tokens(engines)
    finally:
        fleet.stop()
    benchmark = report["benchmarks"][0]["requests"]
    done = benchmark["successful"]
    bodies = [json.loads(r["request_args"])["body"] for r in done]
    prompts = [_prompt_of(b) for b in bodies]
    sent = count_with_processor([p for p, _ in prompts])
    tok = load_tokenizer(str(TOKENIZER_DIR))
    # The chat template's own tokens: the rendered conversation minus its text (both with
    # one BOS, as guidellm's count has one).
    template = 0
    for text, messages in prompts:
        if messages is not None:
            template += len(tok.encode_chat(messages)) - len(tok.encode(text))
    result = {
        "fleet_tokenizer": "tiny-llama (tokenizer.json)" if fleet_tokenizer else "byte-level",
        "endpoint": endpoint,
        "requests": len(done),
        "errored": len(benchmark.get("errored", [])),
        "prompt_tokens_asked": args.prompt_tokens,
        "guidellm_prompt_tokens": sum(sent),
        "guidellm_reported_prompt_tokens": sum(r["input_metrics"]["text_tokens"] or 0
                                               for r in done),
        "replica_prompt_tokens": int(after - before),
        "template_tokens": template,
    }
    result["replica_per_request"] = result["replica_prompt_tokens"] / max(1, len(done))
    result["equal"] = (result["replica_prompt_tokens"]
                       == result["guidellm_prompt_tokens"] + template)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="guidellm vs the fleet's token counts")
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "guidellm_tokens.json"))
    args = parser.parse_args(argv)
    if not (GUIDELLM_VENV / "bin" / "guidellm").exists():
        raise SystemExit(f"no guidellm at {GUIDELLM_VENV}: run `make guidellm`")
    ensure_built(str(TOKENIZER_DIR), with_model=False)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for fleet_tokenizer in (str(TOKENIZER_DIR), None):
            for endpoint in ("/v1/completions", "/v1/chat/completions"):
                results.append(measure(fleet_tokenizer, endpoint, args, Path(tmp)))
    payload = {"guidellm": "0.8.1", "data": "synthetic_text", "results": results,
               "command": "python -m loadgen.guidellm_tokens --json"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=1) + "\n")
    print(json.dumps(payload) if args.json else json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
