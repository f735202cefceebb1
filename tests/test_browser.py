"""The decomposed fixtures in a real browser: onnxruntime-web in headless Chromium, on wasm and on WebNN.

WebNN runs are strict (``session.disable_cpu_ep_fallback=1``): a node the WebNN
execution provider does not take fails the session, so a pass means the whole
model ran on WebNN (its LiteRT/XNNPACK CPU backend, from npm's @sparticuz/chromium).

Each fixture, rewritten in two forms, runs a first prompt (empty past) and one
decode step, batch 1, with each cache the form admits:

* ``default-growing``: the default rewrite, fed a cache that grows (past = the prompt's present);
* ``default-static``: the default rewrite, fed a max-length buffer of ``BUFFER`` rows;
* ``kvstatic-static``: the rewrite with ``static_kv_cache=True`` (what the CLI writes
  for builder models, whose genai_config shares past and present), fed the buffer.

Outputs are compared with ORT CPU's run of the original model on the same feeds;
the decode step is fed ORT's own presents, so each phase is judged alone.
One browser serves the whole file (gqa_decompose.browser starts it once).

Needs ``npm ci --prefix tests/browser`` (.ci/run does it); skipped without it.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib

import numpy as np
import onnx
import pytest

import gqa_decompose
from gqa_decompose import runtimes
from gqa_decompose.errors import GqaDecomposeError

MODELS = pathlib.Path(__file__).resolve().parent.parent / "models"
FIXTURES = {"tiny": MODELS / "tiny-llama-gqa.onnx", "builder": MODELS / "builder-tiny-llama" / "model.onnx"}
FORMS = {"default": {}, "kvstatic": {"static_kv_cache": True}}
VARIANTS = {"default-growing": ("default", "growing"), "default-static": ("default", "static"),
            "kvstatic-static": ("kvstatic", "static")}  # id -> (form, cache)
BACKENDS = ("wasm", "webnn")
PHASES = ("prompt", "decode")
PROMPT = 5
BUFFER = 16  # rows of the static buffer
TOLERANCE = 1e-4  # as the whole-model tests on the other runtimes

try:
    runtimes.get_runtime("wasm").require()
    MISSING = None
except GqaDecomposeError as error:
    MISSING = error.reason


# Why WebNN (strict) refuses a case today, from the WebNN EP's log (onnxruntime-web 1.30, Chromium 153): the
# fragments its error must contain. Strict xfails: a case that passes, or fails for another reason, fails the
# test, so this table follows the fixes (issue 14) instead of hiding them.
_ZERO_DIM_PADS = (  # the empty past, padded to the present's length
    "Pad (/model/layers.0/attn/GroupQueryAttention/Pad_",
    "The shape of [past_key_values.0.key] has 0 dimension which is not supported by WebNN",
)
_RENAMED_NORM_OUTPUTS = (  # the rewrite names SkipSimplifiedLayerNormalization's empty optional outputs
    "SkipSimplifiedLayerNormalization (/model/layers.0/post_attention_layernorm/SkipLayerNorm",
    "SkipSimplifiedLayerNormalization's output mean and inv_std_var are not supported.",
)
_DATA_DEPENDENT_SHAPES = (  # static_kv_cache reads the rows to attend from the mask's contents
    "Dynamic shape is not supported, use sessionOptions.FreeDimensionOverrides to set a fixed shape",
    "MatMul (/model/layers.0/attn/GroupQueryAttention/MatMul_",
)
WEBNN_KNOWN_FAILURES: dict[tuple[str, str, str], tuple[str, ...]] = {
    ("tiny", "default-growing", "prompt"): _ZERO_DIM_PADS,
    ("tiny", "kvstatic-static", "prompt"): _DATA_DEPENDENT_SHAPES,
    ("tiny", "kvstatic-static", "decode"): _DATA_DEPENDENT_SHAPES,
    ("builder", "default-growing", "prompt"): _ZERO_DIM_PADS + _RENAMED_NORM_OUTPUTS,
    ("builder", "default-growing", "decode"): _RENAMED_NORM_OUTPUTS,
    ("builder", "default-static", "prompt"): _RENAMED_NORM_OUTPUTS,
    ("builder", "default-static", "decode"): _RENAMED_NORM_OUTPUTS,
    ("builder", "kvstatic-static", "prompt"): _DATA_DEPENDENT_SHAPES + _RENAMED_NORM_OUTPUTS[:1],
    ("builder", "kvstatic-static", "decode"): _DATA_DEPENDENT_SHAPES + _RENAMED_NORM_OUTPUTS[:1],
}


@functools.cache
def _original(fixture: str) -> onnx.ModelProto:
    return onnx.load(FIXTURES[fixture])


@functools.cache
def _decomposed(fixture: str, form: str) -> onnx.ModelProto:
    return gqa_decompose.decompose(_original(fixture), **FORMS[form])


def _cache_shape(model: onnx.ModelProto, rows: int) -> tuple[int, ...]:
    """[1, kv heads, rows, head size] of the model's past inputs (their fixed dims, or the present's)."""
    value = next(i for i in model.graph.input if i.name.startswith("past_key_values"))
    dims = value.type.tensor_type.shape.dim
    if dims[3].HasField("dim_value"):
        return (1, dims[1].dim_value, rows, dims[3].dim_value)
    return (1, dims[1].dim_value, rows, 16)  # builder-tiny-llama: head_size 16 (genai_config.json)


@functools.cache
def _phases(fixture: str, cache: str) -> dict[str, tuple[dict, dict]]:
    """{phase: (feeds, ORT CPU's outputs of the original)}: the prompt, then one decode step fed ORT's presents."""
    original = _original(fixture)
    oracle = runtimes.get_runtime("onnxruntime").load(original)
    rng = np.random.default_rng(0)
    past_names = [i.name for i in original.graph.input if i.name.startswith("past_key_values")]
    rows = BUFFER if cache == "static" else 0
    prompt = {
        "input_ids": rng.integers(3, 60, (1, PROMPT)).astype(np.int64),
        "attention_mask": np.ones((1, PROMPT), np.int64),
        **{name: np.zeros(_cache_shape(original, rows), np.float32) for name in past_names},
    }
    prompt_out = oracle.run(prompt)
    presents = {name: prompt_out[name.replace("past_key_values", "present")] for name in past_names}
    if cache == "static":  # the buffer keeps its rows: the prompt's present padded to BUFFER
        presents = {name: _padded(value, BUFFER) for name, value in presents.items()}
    decode = {
        "input_ids": rng.integers(3, 60, (1, 1)).astype(np.int64),
        "attention_mask": np.ones((1, PROMPT + 1), np.int64),
        **presents,
    }
    return {"prompt": (prompt, prompt_out), "decode": (decode, oracle.run(decode))}


def _padded(value: np.ndarray, rows: int) -> np.ndarray:
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


def _case(backend: str, fixture: str, variant: str, phase: str):
    marks = []
    if backend == "webnn" and (fixture, variant, phase) in WEBNN_KNOWN_FAILURES:
        reason = " / ".join(WEBNN_KNOWN_FAILURES[fixture, variant, phase])
        marks.append(pytest.mark.xfail(reason=reason, strict=True, raises=RuntimeError))
    return pytest.param(backend, fixture, variant, phase, marks=marks, id=f"{backend}-{fixture}-{variant}-{phase}")


CASES = [
    _case(backend, fixture, variant, phase)
    for backend in BACKENDS
    for fixture in FIXTURES
    for variant in VARIANTS
    for phase in PHASES
]

needs_browser = pytest.mark.skipif(MISSING is not None, reason=f"browser harness not installed: {MISSING}")


@needs_browser
@pytest.mark.parametrize("backend,fixture,variant,phase", CASES)
def test_decomposed_fixture_runs_in_the_browser(backend, fixture, variant, phase, record_property):
    form, cache = VARIANTS[variant]
    feeds, want = _phases(fixture, cache)[phase]
    pinned = WEBNN_KNOWN_FAILURES.get((fixture, variant, phase), ()) if backend == "webnn" else ()
    try:
        got = _session(backend, fixture, form).run(feeds)
    except RuntimeError as error:
        missing = [fragment for fragment in pinned if fragment not in str(error)]
        if not pinned or missing:  # failing for another reason than the pinned one is a real failure
            raise AssertionError(f"fails, and not (only) as pinned {missing}: {error}") from None
        raise
    error = max_error(feeds, want, got)
    record_property("max_error", error)
    assert error < TOLERANCE, error


@functools.cache
def _session(backend: str, fixture: str, form: str) -> runtimes.Session:
    return runtimes.get_runtime(backend).load(_decomposed(fixture, form))
