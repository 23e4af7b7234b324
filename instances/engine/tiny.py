"""Tiny executor: a small decoder-only transformer in numpy whose K/V live in paged blocks.

Model: byte-level vocabulary (``instances.tokenizer.VOCAB_SIZE``), ``num_layers`` pre-norm
blocks (multi-head causal self-attention + GELU MLP), sinusoidal positions, random weights
from a fixed ``weight_seed`` (every replica has the same model). The KV cache is one array
``kv[num_blocks, layers, 2 (K, V), block_size, heads, head_dim]`` indexed by the scheduler's
block tables, so prefix caching reuses real K/V tensors and preemption really recomputes.

Determinism: results are bitwise identical for a request whether it runs alone, batched,
chunked, after preemption or on a cached prefix. Each token is pushed through the network
on its own (float64), so every numpy call for the token at position ``p`` sees arrays of the
same shapes — independent of the batch, the chunking and the block layout — and the K/V it
writes are the ones a later reader gathers. That is slower than batched matmuls, and fine
for a model this small.

Sampling: greedy (argmax, lowest id on ties) at temperature 0; otherwise inverse-CDF
sampling of ``softmax(logits / temperature)`` with a uniform draw that depends only on
(seed, position), so recomputation and batching draw the same token. Timing is the profile's
iteration-time model (the core never reads the clock).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from instances.engine.executor import (
    ExecuteResult,
    Executor,
    ScheduledBatch,
    ScheduledSequence,
    sampling_seed,
    uniform_for_position,
)
from instances.engine.profile import HardwareProfile
from proto.byte_tokenizer import VOCAB_SIZE

Float64Array = npt.NDArray[np.float64]

DEFAULT_WEIGHT_SEED = 20240611


class TinyExecutor(Executor):
    """A numpy transformer executor (see module docstring)."""

    def __init__(
        self,
        profile: HardwareProfile,
        seed: int = 0,
        num_layers: int = 2,
        d_model: int = 64,
        num_heads: int = 4,
        d_ff: int = 256,
        weight_seed: int = DEFAULT_WEIGHT_SEED,
    ) -> None:
        if d_model % num_heads != 0:
            raise ValueError("d_model must be a multiple of num_heads")
        self.profile: HardwareProfile = profile
        self.seed = seed
        self.num_layers = num_layers
        self.d_model = d_model
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        rng = np.random.default_rng(weight_seed)
        scale = 1.0 / math.sqrt(d_model)
        self.token_embedding: Float64Array = rng.standard_normal((VOCAB_SIZE, d_model))
        self.w_qkv: Float64Array = rng.standard_normal((num_layers, d_model, 3 * d_model)) * scale
        self.w_out: Float64Array = rng.standard_normal((num_layers, d_model, d_model)) * scale
        self.w_up: Float64Array = rng.standard_normal((num_layers, d_model, d_ff)) * scale
        self.w_down: Float64Array = rng.standard_normal((num_layers, d_ff, d_model)) * (
            1.0 / math.sqrt(d_ff)
        )
        # A sharper unembedding than 1/sqrt(d) so greedy text is not uniform noise.
        self.w_vocab: Float64Array = rng.standard_normal((d_model, VOCAB_SIZE)) * (3.0 * scale)
        self.kv: Float64Array = np.zeros((0, num_layers, 2, 1, num_heads, self.head_dim))
        self.positions: Float64Array = np.zeros((0, d_model))
        self.block_size = 0
        self._sampling_seeds: dict[str, int] = {}

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE

    def initialize_cache(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.kv = np.zeros(
            (num_blocks, self.num_layers, 2, block_size, self.num_heads, self.head_dim)
        )
        self.positions = _sinusoidal_positions(num_blocks * block_size, self.d_model)

    def execute(self, batch: ScheduledBatch) -> ExecuteResult:
        if self.block_size == 0:
            raise RuntimeError("initialize_cache was not called")
        sampled: list[int] = []
        for seq in batch.sequences:
            last_hidden = self._run_sequence(seq)
            sampled.append(self._sample(seq, last_hidden) if seq.samples else -1)
        assert self.profile is not None
        return ExecuteResult(batch.iteration_time(self.profile), sampled)

    def release(self, request_id: str) -> None:
        self._sampling_seeds.pop(request_id, None)

    def read_block(self, block_id: int, token_ids: Sequence[int], parent_hash: int | None) -> bytes:
        return self.kv[block_id].tobytes()

    def write_block(
        self, block_id: int, token_ids: Sequence[int], parent_hash: int | None, payload: bytes
    ) -> None:
        block = self.kv[block_id]
        if len(payload) != block.nbytes:
            raise ValueError(
                f"KV payload for block {block_id} has {len(payload)} bytes, expected {block.nbytes}"
            )
        block[...] = np.frombuffer(payload, dtype=np.float64).reshape(block.shape)

    def logits(self, hidden: Float64Array) -> Float64Array:
        """Vocabulary logits of a final hidden state."""
        result: Float64Array = _layer_norm(hidden) @ self.w_vocab
        return result

    # ---- internals ------------------------------------------------------------------------

    def _run_sequence(self, seq: ScheduledSequence) -> Float64Array:
        """Compute positions ``[start, end)`` of one sequence; returns the last hidden state."""
        request = seq.request
        start = seq.num_computed_tokens
        end = start + seq.num_new_tokens
        block_size = self.block_size
        num_blocks = -(-end // block_size)
        block_ids = request.block_table[:num_blocks]
        # Gathered context [layer, K/V, head, position, head_dim]; positions >= start are
        # filled as they are computed.
        context = np.ascontiguousarray(self.kv[block_ids].transpose(1, 2, 4, 0, 3, 5)).reshape(
            self.num_layers, 2, self.num_heads, num_blocks * block_size, self.head_dim
        )
        tokens = request.token_slice(start, end).tolist()
        heads, head_dim, d_model = self.num_heads, self.head_dim, self.d_model
        inv_sqrt_hd = 1.0 / math.sqrt(head_dim)
        hidden = np.zeros(d_model)
        for offset, token in enumerate(tokens):
            position = start + offset
            block_id = block_ids[position // block_size]
            slot = position % block_size
            hidden = self.token_embedding[token] + self.positions[position]
            for layer in range(self.num_layers):
                qkv = _layer_norm(hidden) @ self.w_qkv[layer]
                query = qkv[:d_model].reshape(heads, head_dim)
                key = qkv[d_model : 2 * d_model].reshape(heads, head_dim)
                value = qkv[2 * d_model :].reshape(heads, head_dim)
                context[layer, 0, :, position, :] = key
                context[layer, 1, :, position, :] = value
                self.kv[block_id, layer, 0, slot] = key
                self.kv[block_id, layer, 1, slot] = value
                keys = context[layer, 0, :, : position + 1, :]
                values = context[layer, 1, :, : position + 1, :]
                scores = (keys * query[:, None, :]).sum(axis=-1) * inv_sqrt_hd
                scores -= scores.max(axis=-1, keepdims=True)
                weights = np.exp(scores)
                weights /= weights.sum(axis=-1, keepdims=True)
                attended = (weights[:, :, None] * values).sum(axis=1)
                hidden = hidden + attended.reshape(d_model) @ self.w_out[layer]
                up = _layer_norm(hidden) @ self.w_up[layer]
                hidden = hidden + _gelu(up) @ self.w_down[layer]
        return hidden

    def _sample(self, seq: ScheduledSequence, hidden: Float64Array) -> int:
        request = seq.request
        logits = self.logits(hidden)
        temperature = request.params.temperature
        if temperature <= 0.0:
            return int(np.argmax(logits))
        seed = self._sampling_seeds.get(request.request_id)
        if seed is None:
            seed = sampling_seed(request.params, request.request_id, self.seed)
            self._sampling_seeds[request.request_id] = seed
        scaled = logits / temperature
        probs = np.exp(scaled - scaled.max())
        cumulative = np.cumsum(probs)
        draw = uniform_for_position(seed, request.num_tokens) * cumulative[-1]
        return int(min(np.searchsorted(cumulative, draw, side="right"), VOCAB_SIZE - 1))


def _layer_norm(x: Float64Array) -> Float64Array:
    centered = x - x.mean()
    result: Float64Array = centered / np.sqrt((centered * centered).mean() + 1e-5)
    return result


def _gelu(x: Float64Array) -> Float64Array:
    result: Float64Array = 0.5 * x * (1.0 + np.tanh(0.7978845608028654 * (x + 0.044715 * x**3)))
    return result


def _sinusoidal_positions(num_positions: int, d_model: int) -> Float64Array:
    positions = np.arange(num_positions, dtype=np.float64)[:, None]
    frequencies = np.exp(-math.log(10000.0) * np.arange(0, d_model, 2) / d_model)
    table = np.zeros((num_positions, d_model))
    table[:, 0::2] = np.sin(positions * frequencies)
    table[:, 1::2] = np.cos(positions * frequencies)
    return table
