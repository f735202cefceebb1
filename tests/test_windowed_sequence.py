"""A windowed KV cache (sliding_window_cache=1, semantics §12) over whole sequences of steps.

The node-level phases start from synthesized caches; here the fused node and its expansion each
run a prompt and then many steps on ORT CPU, each fed its own present as the next past, so
evictions (C - W + 1 rows at a time), multi-token steps (also longer than the capacity) and
ragged batches are compared as a runtime would see them: output and the rows of present that
hold tokens, at every step.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from gqa_models import GqaConfig, make_gqa_model

import gqa_decompose
from gqa_decompose.verify import windowed_rows

TOLERANCE = {"float32": (1e-5, 1e-5), "float16": (2e-3, 1e-3)}


def _session(model) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


class _Runner:
    """Both models, each with its own cache, stepped through the same inputs."""

    def __init__(self, config: GqaConfig, batch: int, capacity: int, candidate: GqaConfig | None = None) -> None:
        self.config = config
        self.fused = _session(make_gqa_model(config))
        self.decomposed = _session(gqa_decompose.decompose(make_gqa_model(candidate or config)))
        self.dtype = np.float16 if config.dtype == "float16" else np.float32
        shape = (batch, config.kv_num_heads, capacity, config.head_size)
        self.caches = {name: [np.zeros(shape, self.dtype)] * 2 for name in ("fused", "decomposed")}
        self.lengths = np.zeros(batch, dtype=np.int64)
        self.capacity = capacity
        self.window = config.local_window_size
        self.rng = np.random.default_rng(0)
        self.head_sink = self.rng.standard_normal(config.num_heads).astype(self.dtype)

    def step(self, query_length: int) -> list[tuple[str, float]]:
        config, batch = self.config, len(self.lengths)
        self.lengths = self.lengths + query_length
        hidden = config.num_heads * config.head_size
        kv_hidden = config.kv_num_heads * config.head_size
        feeds = {
            "query": self.rng.standard_normal((batch, query_length, hidden)).astype(self.dtype),
            "key": self.rng.standard_normal((batch, query_length, kv_hidden)).astype(self.dtype),
            "value": self.rng.standard_normal((batch, query_length, kv_hidden)).astype(self.dtype),
            "seqlens_k": (self.lengths - 1).astype(np.int32),
            "total_sequence_length": np.array(self.lengths.max(), dtype=np.int32),
        }
        if config.head_sink:
            feeds["head_sink"] = self.head_sink
        results = {}
        for name, session in (("fused", self.fused), ("decomposed", self.decomposed)):
            past_key, past_value = self.caches[name]
            results[name] = session.run(None, {**feeds, "past_key": past_key, "past_value": past_value})
            self.caches[name] = results[name][1:3]
        atol, rtol = TOLERANCE[config.dtype]
        failures = []
        for b, length in enumerate(self.lengths):
            kept = windowed_rows(int(length), self.capacity, self.window)
            pairs = [("output", results["fused"][0][b], results["decomposed"][0][b])]
            for index, label in ((1, "present_key"), (2, "present_value")):
                pairs.append((label, results["fused"][index][b, :, :kept], results["decomposed"][index][b, :, :kept]))
            for label, want, have in pairs:
                want, have = want.astype(np.float32), have.astype(np.float32)
                if not np.allclose(have, want, atol=atol, rtol=rtol):
                    failures.append((f"row {b} t={length} {label}", float(np.abs(want - have).max())))
        return failures

    def take_row(self, b: int) -> dict[str, list[np.ndarray]]:
        return {name: [cache[b : b + 1] for cache in caches] for name, caches in self.caches.items()}


def _config(dtype: str, window: int, **fields) -> GqaConfig:
    return GqaConfig(dtype=dtype, local_window_size=window, extra_attributes=(("sliding_window_cache", 1),), **fields)


SCHEDULE = [4] + [1] * 12 + [3, 1, 8, 1, 1, 2, 1]  # prompt, decode past several evictions, S=3, S=8 > C


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize(
    "capacity,window,fields",
    [
        (6, 3, {}),
        (4, 4, {"rotary": "half"}),
        (7, 2, {"rotary": "interleaved", "packed": False}),
        (6, 3, {"softcap": 1.5, "head_sink": True}),
    ],
    ids=["C6-W3", "C4-W4-rotary", "C7-W2-interleaved", "C6-W3-softcap-sink"],
)
def test_windowed_cache_sequence_matches_ort(dtype, capacity, window, fields):
    config = _config(dtype, window, **fields)
    runner = _Runner(config, batch=1, capacity=capacity)
    for step, query_length in enumerate(SCHEDULE):
        failures = runner.step(query_length)
        assert not failures, (step, query_length, failures)
    assert runner.lengths[0] == sum(SCHEDULE) > 2 * capacity


def test_windowed_cache_ragged_batch_decode_matches_ort():
    """Rows with different histories (prompts of 3 and 9 tokens) decode together for 10 steps."""
    capacity, window = 5, 3
    config = _config("float32", window, rotary="half")
    rows = []
    for prompt in (3, 9):
        runner = _Runner(config, batch=1, capacity=capacity)
        assert not runner.step(prompt)
        rows.append(runner)
    batch_runner = _Runner(config, batch=2, capacity=capacity)
    for name in ("fused", "decomposed"):
        parts = [row.take_row(0)[name] for row in rows]
        batch_runner.caches[name] = [np.concatenate([p[i] for p in parts]) for i in range(2)]
    batch_runner.lengths = np.array([3, 9], dtype=np.int64)
    for step in range(10):
        failures = batch_runner.step(1)
        assert not failures, (step, failures)


def test_sequence_comparison_catches_a_wrong_window():
    runner = _Runner(_config("float32", 3), batch=1, capacity=6, candidate=_config("float32", 4))
    failures = [failure for query_length in SCHEDULE for failure in runner.step(query_length)]
    assert failures
