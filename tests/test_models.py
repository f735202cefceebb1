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


def _generate(session, model, prompt_ids, prompt_mask, steps, static_length=None, seed=0):
    """Prompt then ``steps`` ragged decode steps; returns each step's outputs and masks.

    With ``static_length`` the cache is a max-length buffer fed back whole
    (past_present_share_buffer), otherwise it grows by one row per step.
    """
    rng = np.random.default_rng(seed)
    batch = prompt_ids.shape[0]
    past_names = _past_inputs(model)
    if static_length:
        mask = np.zeros((batch, static_length), np.int64)
        mask[:, : prompt_mask.shape[1]] = prompt_mask
        past = {name: np.zeros((batch, 2, static_length, 16), np.float32) for name in past_names}
        # A static buffer's first prompt has T = S: the mask covers just the prompt.
        feeds = {"input_ids": prompt_ids, "attention_mask": prompt_mask, **past}
    else:
        past = {name: np.zeros((batch, 2, 0, 16), np.float32) for name in past_names}
        feeds = {"input_ids": prompt_ids, "attention_mask": prompt_mask, **past}
        mask = prompt_mask
    history = []
    outputs = _run(session, feeds)
    history.append((feeds, outputs))
    lengths = prompt_mask.sum(axis=1)
    for _ in range(steps):
        next_ids = rng.integers(0, 64, (batch, 1)).astype(np.int64)
        if static_length:
            presents = {name: outputs[name.replace("past_key_values", "present")] for name in past_names}
            if presents[past_names[0]].shape[2] < static_length:
                for name, value in presents.items():
                    padded = np.zeros((batch, 2, static_length, 16), np.float32)
                    padded[:, :, : value.shape[2]] = value
                    presents[name] = padded
            for b in range(batch):
                mask[b, lengths[b]] = 1
            lengths = lengths + 1
            total = int(lengths.max())
            feeds = {"input_ids": next_ids, "attention_mask": mask[:, :total].copy(), **presents}
        else:
            mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
            lengths = mask.sum(axis=1)
            presents = {name: outputs[name.replace("past_key_values", "present")] for name in past_names}
            feeds = {"input_ids": next_ids, "attention_mask": mask, **presents}
        outputs = _run(session, feeds)
        history.append((feeds, outputs))
    return history


def _compare(original_history, decomposed_history, atol=1e-5):
    worst = 0.0
    for step, ((feeds, expected), (_, got)) in enumerate(zip(original_history, decomposed_history)):
        lengths = feeds["attention_mask"].sum(axis=1)
        query_length = feeds["input_ids"].shape[1]
        for b, length in enumerate(lengths):
            rows = min(length, query_length) if step == 0 else query_length
            difference = np.abs(expected["logits"][b, :rows] - got["logits"][b, :rows]).max()
            worst = max(worst, difference)
            for name in expected:
                if name.startswith("present"):
                    valid = expected[name][b, :, :length] - got[name][b, :, :length]
                    worst = max(worst, np.abs(valid).max())
    assert worst < atol, worst
    return worst


@pytest.mark.parametrize("model_path", [TINY_LLAMA, BUILDER], ids=["synthetic", "builder"])
@pytest.mark.parametrize("cache", ["growing", "static"])
def test_whole_model_generation_matches(model_path, cache):
    original = onnx.load(model_path)
    decomposed = gqa_decompose.decompose(original)
    assert not any(n.op_type == "GroupQueryAttention" for n in decomposed.graph.node)
    rng = np.random.default_rng(5)
    prompt_ids = rng.integers(0, 64, (2, 6)).astype(np.int64)
    prompt_mask = np.array([[1] * 6, [1, 1, 1, 1, 0, 0]], np.int64)  # right-padded row
    static_length = 16 if cache == "static" else None
    expected = _generate(_session(original), original, prompt_ids, prompt_mask, 3, static_length)
    got = _generate(_session(decomposed), decomposed, prompt_ids, prompt_mask, 3, static_length)
    _compare(expected, got)


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
