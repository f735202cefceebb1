"""Whole models: the shipped samples give the same logits and caches after decomposition.

``models/tiny-llama-gqa.onnx`` is synthetic (scripts/make_tiny_llama.py);
``models/builder-tiny-llama`` is onnxruntime-genai's builder output on a tiny
random Llama (scripts/make_builder_fixture.py), with torch's logits saved beside it.
"""

from __future__ import annotations

import pathlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import gqa_decompose

MODELS = pathlib.Path(__file__).parent.parent / "models"
TINY_LLAMA = MODELS / "tiny-llama-gqa.onnx"
BUILDER = MODELS / "builder-tiny-llama" / "model.onnx"


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _run(session: ort.InferenceSession, feeds) -> dict[str, np.ndarray]:
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def _past_inputs(model: onnx.ModelProto) -> list[str]:
    return [i.name for i in model.graph.input if i.name.startswith("past_key_values")]


@pytest.mark.parametrize("model_path", [TINY_LLAMA, BUILDER], ids=["synthetic", "builder"])
@pytest.mark.parametrize("cache", ["growing", "static"])
def test_whole_model_generation_matches(model_path, cache):
    """Prompt (right-padded batch of 2) then 3 decode steps, present fed back as past (gqa_decompose.verify_model)."""
    original = onnx.load(model_path)
    static = cache == "static"
    decomposed = gqa_decompose.decompose(original, static_kv_cache=static)
    assert not any(n.op_type == "GroupQueryAttention" for n in decomposed.graph.node)
    result = gqa_decompose.verify_model(
        original, decomposed, steps=3, static_kv_cache=static, dims={"past_sequence_length": 16} if static else None
    )
    assert result.passed, result.summary()
    assert result.cache_layout == ("static buffer of 16 rows" if static else "growing cache")
    assert result.steps[0].total_lengths == (8, 6)


def test_builder_model_matches_torch_logits_after_decomposition():
    reference = np.load(BUILDER.parent / "reference.npz")
    decomposed = gqa_decompose.decompose(onnx.load(BUILDER))
    session = _session(decomposed)
    input_ids = reference["input_ids"]
    length = input_ids.shape[1]
    past = {name: np.zeros((1, 2, 0, 16), np.float32) for name in _past_inputs(decomposed)}
    prefill = _run(session, {"input_ids": input_ids, "attention_mask": np.ones((1, length), np.int64), **past})
    np.testing.assert_allclose(prefill["logits"], reference["prefill_logits"], atol=1e-4)
    presents = {name: prefill[name.replace("past_key_values", "present")] for name in past}
    decode = _run(
        session,
        {"input_ids": reference["next_id"], "attention_mask": np.ones((1, length + 1), np.int64), **presents},
    )
    np.testing.assert_allclose(decode["logits"], reference["decode_logits"], atol=1e-4)


@pytest.mark.parametrize("kv_cache", ["any", "static"])
def test_decomposed_model_runs_on_onnx_reference(kv_cache):
    """The point of the rewrite: a runtime without ORT's contrib ops runs it (here onnx.reference)."""
    from onnx.reference import ReferenceEvaluator

    original = onnx.load(TINY_LLAMA)
    decomposed = gqa_decompose.decompose(original, static_kv_cache=kv_cache == "static")
    rng = np.random.default_rng(11)
    past_rows = 8 if kv_cache == "static" else 0
    feeds = {
        "input_ids": rng.integers(0, 64, (2, 5)).astype(np.int64),
        "attention_mask": np.array([[1] * 5, [1, 1, 1, 0, 0]], np.int64),
        **{name: np.zeros((2, 2, past_rows, 16), np.float32) for name in _past_inputs(original)},
    }
    expected = _run(_session(original), feeds)
    evaluator = ReferenceEvaluator(decomposed)
    got = dict(zip(evaluator.output_names, evaluator.run(None, feeds)))
    np.testing.assert_allclose(got["logits"][0], expected["logits"][0], atol=1e-4)
    np.testing.assert_allclose(got["logits"][1, :3], expected["logits"][1, :3], atol=1e-4)
    for name in expected:
        if name.startswith("present"):
            np.testing.assert_allclose(got[name][0, :, :5], expected[name][0, :, :5], atol=1e-5)
            np.testing.assert_allclose(got[name][1, :, :3], expected[name][1, :, :3], atol=1e-5)
