"""Token-replay migration, for engines that cannot export their KV cache (vLLM, SGLang, any
OpenAI-compatible server), and mid-stream failover.

Stop the request on the source (close its stream), then re-issue it on the destination as
a continuation: the prompt followed by everything generated so far, with the same sampling
parameters (temperature, seed, stop strings) and the remaining budget. The destination
prefills the whole context again (that prefill is this mode's downtime, growing with the
context, where live migration's stays flat), and streams the rest; ``migration.stitch``
splices it onto the client's stream.

``continuation_body`` builds that request body from the original one — a pure function the
gateway's forwarder can call for any OpenAI server:

* ``/v1/completions`` with a text prompt: ``prompt + generated text``. With a token-id
  prompt, the generated token ids must be given (the text would be re-tokenized).
* ``/v1/chat/completions``: the generated text is appended as a partial assistant message
  and the server is asked to continue it (``continue_final_message``, with
  ``add_generation_prompt`` off: vLLM's and SGLang's extension; the reference engine does
  not implement it yet, so replay its streams through ``/v1/completions``).

Token identity: the continuation is token-exact when re-tokenizing prompt + generated text
gives the same tokens (always for the reference engine's byte-level tokenizer) and the
server's sampling depends only on the seed and the position (the reference engine: yes;
vLLM with a per-request seed: its generator state restarts, so sampled text can differ
after the move — greedy decoding is exact).
"""

from __future__ import annotations

import copy
from typing import Any

COMPLETIONS_PATH = "/v1/completions"
CHAT_PATH = "/v1/chat/completions"


def remaining_budget(body: dict[str, Any], generated_tokens: int, default: int) -> int:
    """Output tokens the continuation may still produce (at least 1)."""
    budget = body.get("max_completion_tokens") or body.get("max_tokens") or default
    return max(1, int(budget) - generated_tokens)


def continuation_body(
    path: str,
    body: dict[str, Any],
    generated_text: str,
    generated_tokens: int,
    default_max_tokens: int = 16,
    generated_token_ids: list[int] | None = None,
) -> dict[str, Any]:
    """The body that continues ``body`` (sent to ``path``) after ``generated_tokens``
    tokens whose text is ``generated_text`` (see module docstring). ValueError when it
    cannot be built (a token-id prompt without ``generated_token_ids``)."""
    out = copy.deepcopy(body)
    budget = remaining_budget(body, generated_tokens, default_max_tokens)
    if "max_completion_tokens" in out:
        out["max_completion_tokens"] = budget
    else:
        out["max_tokens"] = budget
    if path.endswith(COMPLETIONS_PATH) and not path.endswith(CHAT_PATH):
        prompt = out.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            out["prompt"] = prompt + generated_text
        elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            if generated_token_ids is None:
                raise ValueError("a token-id prompt needs the generated token ids to replay")
            out["prompt"] = [*prompt, *generated_token_ids]
        else:
            raise ValueError("cannot replay this prompt")
        return out
    if path.endswith(CHAT_PATH):
        messages = list(out.get("messages") or [])
        if not messages:
            raise ValueError("a chat request without messages cannot be replayed")
        messages.append({"role": "assistant", "content": generated_text})
        out["messages"] = messages
        out["continue_final_message"] = True
        out["add_generation_prompt"] = False
        return out
    raise ValueError(f"token replay does not know the endpoint {path!r}")
