"""The decomposed fixtures' phases, shared by the runtime tests (tests/test_browser.py, tests/test_compilers.py).

Each fixture, rewritten in two forms, runs a first prompt (empty past) and one decode step, batch 1, with each
cache the form admits (``VARIANTS``). The expected outputs are ORT CPU's run of the original model on the same
feeds; the decode step is fed ORT's own presents, so each phase is judged alone.
"""

from __future__ import annotations

import functools
import pathlib

import numpy as np
import onnx

import gqa_decompose
from gqa_decompose import runtimes

MODELS = pathlib.Path(__file__).resolve().parent.parent / "models"
FIXTURES = {"tiny": MODELS / "tiny-llama-gqa.onnx", "builder": MODELS / "builder-tiny-llama" / "model.onnx"}
FORMS = {
    "default": {},
    "kvstatic": {"static_kv_cache": True},
    # --runtime-profile webnn (tests/test_browser.py runs these on WebNN only)
    "webnn": {"runtime_profile": "webnn"},
    "webnn-kvstatic": {"runtime_profile": "webnn", "static_kv_cache": True},
}
VARIANTS = {
    "default-growing": ("default", "growing"),
    "default-static": ("default", "static"),
    "kvstatic-static": ("kvstatic", "static"),
}  # id -> (form, cache)
PHASES = ("prompt", "decode")
PROMPT = 5
BUFFER = 16  # rows of the static buffer
TOLERANCE = 1e-4  # as the whole-model tests on the other runtimes


@functools.cache
def original(fixture: str) -> onnx.ModelProto:
    return onnx.load(FIXTURES[fixture])


@functools.cache
def decomposed(fixture: str, form: str) -> onnx.ModelProto:
    return gqa_decompose.decompose(original(fixture), **FORMS[form])


def cache_shape(model: onnx.ModelProto, rows: int) -> tuple[int, ...]:
    """[1, kv heads, rows, head size] of the model's past inputs (their fixed dims, or the present's)."""
    value = next(i for i in model.graph.input if i.name.startswith("past_key_values"))
    dims = value.type.tensor_type.shape.dim
    if dims[3].HasField("dim_value"):
        return (1, dims[1].dim_value, rows, dims[3].dim_value)
    return (1, dims[1].dim_value, rows, 16)  # builder-tiny-llama: head_size 16 (genai_config.json)


@functools.cache
def phases(fixture: str, cache: str) -> dict[str, tuple[dict, dict]]:
    """{phase: (feeds, ORT CPU's outputs of the original)}: the prompt, then one decode step fed ORT's presents."""
    model = original(fixture)
    oracle = runtimes.get_runtime("onnxruntime").load(model)
    rng = np.random.default_rng(0)
    past_names = [i.name for i in model.graph.input if i.name.startswith("past_key_values")]
    rows = BUFFER if cache == "static" else 0
    prompt = {
        "input_ids": rng.integers(3, 60, (1, PROMPT)).astype(np.int64),
        "attention_mask": np.ones((1, PROMPT), np.int64),
        **{name: np.zeros(cache_shape(model, rows), np.float32) for name in past_names},
    }
    prompt_out = oracle.run(prompt)
    presents = {name: prompt_out[name.replace("past_key_values", "present")] for name in past_names}
    if cache == "static":  # the buffer keeps its rows: the prompt's present padded to BUFFER
        presents = {name: padded(value, BUFFER) for name, value in presents.items()}
    decode = {
        "input_ids": rng.integers(3, 60, (1, 1)).astype(np.int64),
        "attention_mask": np.ones((1, PROMPT + 1), np.int64),
        **presents,
    }
    return {"prompt": (prompt, prompt_out), "decode": (decode, oracle.run(decode))}


def padded(value: np.ndarray, rows: int) -> np.ndarray:
    padded = np.zeros((*value.shape[:2], rows, value.shape[3]), value.dtype)
    padded[:, :, : value.shape[2]] = value
    return padded


def max_error(feeds: dict, want: dict, got: dict) -> float:
    """Max abs difference over what ORT defines: logits, and present rows below the total length."""
    total = feeds["attention_mask"].shape[1]
    worst = 0.0
    for name, expected in want.items():
        have = got[name]
        if name.startswith("present"):
            expected, have = expected[:, :, :total], have[:, :, :total]
        assert have.shape == expected.shape, (name, have.shape, expected.shape)
        worst = max(worst, float(np.abs(expected - have).max()))
    return worst
