"""What ONNX Runtime 1.31 CPU computes for the standard Attention op (opsets 23/24), pinned against numpy.

The attention target relies on each of these; the ONNX spec was corrected in 2026
(softcap order, qk_matmul_output_mode meanings, causal alignment), so a future
ONNX Runtime that changes any of them fails here first, with the point named.
Each test also checks that the numpy alternative it rules out really differs,
so none can pass by accident.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from gqa_models import IR_VERSION
from onnx import TensorProto, helper

_ELEM = {
    np.float32: TensorProto.FLOAT,
    np.float16: TensorProto.FLOAT16,
    np.bool_: TensorProto.BOOL,
    np.int64: TensorProto.INT64,
}
B, N, S, K, H = 2, 4, 3, 7, 8


def _session(op_type: str, inputs: list, outputs: list[str], opset: int, **attributes):
    """A one-node model; ``inputs`` are (name, array) pairs or None for an omitted input."""
    names = [pair[0] if pair is not None else "" for pair in inputs]
    graph_inputs = [
        helper.make_tensor_value_info(name, _ELEM[array.dtype.type], array.shape)
        for name, array in (pair for pair in inputs if pair is not None)
    ]
    node = helper.make_node(op_type, names, outputs, **attributes)
    graph = helper.make_graph(
        [node],
        "g",
        graph_inputs,
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs if name],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _attention(inputs: list, opset: int = 23, qk_mode: int | None = None, past: bool = False, **attributes):
    """Run Attention; returns (Y, present_key, present_value, qk) with None for what was not asked."""
    outputs = ["Y", "present_key" if past else "", "present_value" if past else ""]
    if qk_mode is not None:
        outputs.append("qk")
        attributes["qk_matmul_output_mode"] = qk_mode
    while outputs[-1] == "":
        outputs.pop()
    session = _session("Attention", inputs, outputs, opset, **attributes)
    results = session.run(None, {name: array for name, array in (p for p in inputs if p is not None)})
    named = dict(zip([o for o in outputs if o], results))
    return named["Y"], named.get("present_key"), named.get("present_value"), named.get("qk")


def _softmax(x: np.ndarray) -> np.ndarray:
    top = np.max(x, axis=-1, keepdims=True)
    top = np.where(np.isneginf(top), 0, top)
    e = np.exp(x - top)
    total = e.sum(axis=-1, keepdims=True)
    return e / np.where(total == 0, 1, total)


def _causal(offset, rows: int, columns: int) -> np.ndarray:
    """0 where key j <= query i + offset, -inf elsewhere; offset scalar or per batch row."""
    offset = np.reshape(offset, (-1, 1, 1, 1))
    i = np.arange(rows).reshape(1, 1, rows, 1)
    j = np.arange(columns).reshape(1, 1, 1, columns)
    return np.where(j <= i + offset, 0.0, -np.inf).astype(np.float32)


def _grouped(x: np.ndarray, heads: int) -> np.ndarray:
    """[B, Nkv, K, H] -> [B, N, K, H]: query head n reads KV head n // (N / Nkv)."""
    return np.repeat(x, heads // x.shape[1], axis=1)


@pytest.fixture
def qkv():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((B, N, S, H)).astype(np.float32)
    k = rng.standard_normal((B, 2, K, H)).astype(np.float32)
    v = rng.standard_normal((B, 2, K, H)).astype(np.float32)
    return q, k, v


def _scores(q, k, scale):
    return (q @ _grouped(k, N).transpose(0, 1, 3, 2)) * scale


def test_query_head_n_reads_kv_head_n_over_group_size(qkv):
    q, k, v = qkv
    y, *_ = _attention([("Q", q), ("K", k), ("V", v)])
    expected = _softmax(_scores(q, k, H**-0.5)) @ _grouped(v, N)
    np.testing.assert_allclose(y, expected, atol=1e-5)
    interleaved = np.tile(k, (1, N // 2, 1, 1))  # head n -> n % Nkv: the other convention
    assert not np.allclose(y, _softmax((q @ interleaved.transpose(0, 1, 3, 2)) * H**-0.5) @ np.tile(v, (1, 2, 1, 1)))


def test_softcap_applies_to_the_scaled_scores_before_the_mask(qkv):
    q, k, v = qkv
    rng = np.random.default_rng(1)
    mask = rng.standard_normal((B, N, S, K)).astype(np.float32)
    scale, cap = 0.7, 1.3
    y, *_ = _attention([("Q", q), ("K", k), ("V", v), ("mask", mask)], scale=scale, softcap=cap)
    scores = _scores(q, k, scale)
    expected = _softmax(cap * np.tanh(scores / cap) + mask) @ _grouped(v, N)
    np.testing.assert_allclose(y, expected, atol=1e-5)
    # Ruled out: softcap after the mask, softcap before the scale.
    assert not np.allclose(y, _softmax(cap * np.tanh((scores + mask) / cap)) @ _grouped(v, N), atol=1e-3)
    unscaled = scores / scale
    assert not np.allclose(y, _softmax(scale * cap * np.tanh(unscaled / cap) + mask) @ _grouped(v, N), atol=1e-3)


@pytest.mark.parametrize(
    "mode,meaning",
    [(0, "scaled scores"), (1, "after softcap"), (2, "after softcap and mask"), (3, "probabilities")],
)
def test_qk_matmul_output_modes(qkv, mode, meaning):
    q, k, v = qkv
    mask = np.random.default_rng(2).standard_normal((B, N, S, K)).astype(np.float32)
    mask[0, 1, 2, 3] = -np.inf
    scale, cap = 0.7, 1.3
    _, _, _, qk = _attention([("Q", q), ("K", k), ("V", v), ("mask", mask)], qk_mode=mode, scale=scale, softcap=cap)
    scaled = _scores(q, k, scale)
    capped = cap * np.tanh(scaled / cap)
    candidates = {
        "scaled scores": scaled,
        "after softcap": capped,
        "after softcap and mask": capped + mask,
        "probabilities": _softmax(capped + mask),
    }
    matching = [name for name, value in candidates.items() if np.allclose(qk, value, atol=1e-5)]
    assert matching == [meaning]


def test_causal_without_past_is_top_left_when_query_and_keys_differ_in_length(qkv):
    q, k, v = qkv
    y, *_ = _attention([("Q", q), ("K", k), ("V", v)], is_causal=1)
    scores = _scores(q, k, H**-0.5)
    np.testing.assert_allclose(y, _softmax(scores + _causal(0, S, K)) @ _grouped(v, N), atol=1e-5)
    assert not np.allclose(y, _softmax(scores + _causal(K - S, S, K)) @ _grouped(v, N), atol=1e-3)


def test_causal_with_past_is_bottom_right_and_present_is_the_concatenation(qkv):
    q, k, v = qkv
    past = K - S
    y, present_key, present_value, _ = _attention(
        [
            ("Q", q),
            ("K", k[:, :, past:]),
            ("V", v[:, :, past:]),
            None,
            ("past_key", k[:, :, :past]),
            ("past_value", v[:, :, :past]),
        ],
        past=True,
        is_causal=1,
    )
    scores = _scores(q, k, H**-0.5)
    np.testing.assert_allclose(y, _softmax(scores + _causal(past, S, K)) @ _grouped(v, N), atol=1e-5)
    assert not np.allclose(y, _softmax(scores + _causal(0, S, K)) @ _grouped(v, N), atol=1e-3)
    np.testing.assert_array_equal(present_key, k)
    np.testing.assert_array_equal(present_value, v)


def test_causal_and_a_mask_with_past_add_up(qkv):
    q, k, v = qkv
    past = K - S
    mask = np.random.default_rng(3).standard_normal((B, 1, S, K)).astype(np.float32)
    y, *_ = _attention(
        [
            ("Q", q),
            ("K", k[:, :, past:]),
            ("V", v[:, :, past:]),
            ("mask", mask),
            ("past_key", k[:, :, :past]),
            ("past_value", v[:, :, :past]),
        ],
        past=True,
        is_causal=1,
    )
    expected = _softmax(_scores(q, k, H**-0.5) + mask + _causal(past, S, K)) @ _grouped(v, N)
    np.testing.assert_allclose(y, expected, atol=1e-5)


@pytest.mark.parametrize("is_causal", [0, 1])
def test_nonpad_kv_seqlen_masks_padding_and_aligns_causal_bottom_right_per_row(qkv, is_causal):
    q, k, v = qkv
    lengths = np.array([6, 4], np.int64)
    y, *_ = _attention(
        [("Q", q), ("K", k), ("V", v), None, None, None, ("nonpad", lengths)], opset=24, is_causal=is_causal
    )
    padding = np.where(np.arange(K)[None, :] < lengths[:, None], 0.0, -np.inf).astype(np.float32)
    bias = padding[:, None, None, :]
    if is_causal:
        bias = bias + _causal(lengths - S, S, K)
    scores = _scores(q, k, H**-0.5)
    np.testing.assert_allclose(y, _softmax(scores + bias) @ _grouped(v, N), atol=1e-5)
    if is_causal:  # the pre-2026 reading: top-left
        assert not np.allclose(y, _softmax(scores + padding[:, None, None, :] + _causal(0, S, K)) @ _grouped(v, N))


@pytest.mark.parametrize("mask_type", ["bool", "float"])
def test_a_fully_masked_row_gives_zero_output_and_zero_probabilities(qkv, mask_type):
    q, k, v = qkv
    allowed = np.ones((B, 1, S, K), bool)
    allowed[0, 0, 1, :] = False
    mask = allowed if mask_type == "bool" else np.where(allowed, 0.0, -np.inf).astype(np.float32)
    y, _, _, probs = _attention([("Q", q), ("K", k), ("V", v), ("mask", mask)], qk_mode=3)
    assert not np.isnan(y).any()
    assert np.all(y[0, :, 1] == 0) and np.all(probs[0, :, 1] == 0)
    assert np.abs(y[0, :, 0]).max() > 0


def test_a_scale_that_is_not_positive_is_rejected(qkv):
    # So the attention target applies a negative GQA scale by negating the query.
    with pytest.raises(Exception, match="scale must be greater than 0"):
        _attention([("Q", qkv[0]), ("K", qkv[1]), ("V", qkv[2])], scale=-0.5)


def test_a_mask_shorter_than_the_keys_is_rejected_although_the_spec_pads_it(qkv):
    # The spec pads a short mask with -inf; ORT 1.31 requires the full key length.
    q, k, v = qkv
    short = np.zeros((B, 1, S, K - 2), np.float32)
    with pytest.raises(Exception, match="inconsistent total_sequence_length"):
        _attention([("Q", q), ("K", k), ("V", v), ("mask", short)])


def test_a_mask_must_spell_out_the_query_axis(qkv):
    # [B, 1, 1, K] is broadcastable by the spec, but ORT 1.31 requires the query axis to be S.
    q, k, v = qkv
    with pytest.raises(Exception, match="inconsistent q_sequence_length"):
        _attention([("Q", q), ("K", k), ("V", v), ("mask", np.zeros((B, 1, 1, K), np.float32))])
    y, *_ = _attention([("Q", q), ("K", k), ("V", v), ("mask", np.zeros((B, 1, S, K), np.float32))])
    assert y.shape == (B, N, S, H)


def test_qk_matmul_output_key_axis_is_inferred_as_zero_when_keys_are_symbolic():
    # ORT 1.31's shape inference: a Where of qk_matmul_output with a [.., K] mask whose
    # K is static fails at session creation though the run would be fine. The attention
    # target therefore cuts output_qk to T (known only at run time) before any broadcast.
    nodes = [
        helper.make_node("Attention", ["q", "k", "v"], ["y", "", "", "qk"], qk_matmul_output_mode=0),
        helper.make_node("Where", ["keep", "qk", "zero"], ["masked"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("q", TensorProto.FLOAT, [B, N, S, H]),
            helper.make_tensor_value_info("k", TensorProto.FLOAT, [B, 2, None, H]),
            helper.make_tensor_value_info("v", TensorProto.FLOAT, [B, 2, None, H]),
            helper.make_tensor_value_info("keep", TensorProto.BOOL, [1, 1, 1, K]),
        ],
        [helper.make_tensor_value_info("masked", TensorProto.FLOAT, None)],
        [helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=IR_VERSION)
    with pytest.raises(Exception, match="Incompatible dimensions"):
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("interleaved", [0, 1])
@pytest.mark.parametrize("rotary_dims", [H, H // 2])
def test_rotary_embedding_23_matches_the_gqa_rotation(interleaved, rotary_dims):
    rng = np.random.default_rng(4)
    heads = 3
    x = rng.standard_normal((B, S, heads * H)).astype(np.float32)
    half = rotary_dims // 2
    angles = rng.uniform(-np.pi, np.pi, (10, half))
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    positions = rng.integers(0, 10, (B, S)).astype(np.int64)
    attributes = {"num_heads": heads, "interleaved": interleaved}
    if rotary_dims != H:
        attributes["rotary_embedding_dim"] = rotary_dims
    session = _session(
        "RotaryEmbedding", [("x", x), ("cos", cos), ("sin", sin), ("pos", positions)], ["y"], 23, **attributes
    )
    y = session.run(None, {"x": x, "cos": cos, "sin": sin, "pos": positions})[0]
    heads_x = x.reshape(B, S, heads, H)
    c, s = cos[positions][:, :, None, :], sin[positions][:, :, None, :]
    rotated = heads_x[..., :rotary_dims]
    if interleaved:
        x1, x2 = rotated[..., 0::2], rotated[..., 1::2]
        out = np.stack([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1).reshape(rotated.shape)
    else:
        x1, x2 = rotated[..., :half], rotated[..., half:]
        out = np.concatenate([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)
    expected = np.concatenate([out, heads_x[..., rotary_dims:]], axis=-1).reshape(B, S, heads * H)
    np.testing.assert_allclose(y, expected, atol=1e-5)


def test_tensor_scatter_24_writes_each_rows_update_at_its_index():
    rng = np.random.default_rng(5)
    cache = rng.standard_normal((B, 2, 6, H)).astype(np.float32)
    update = rng.standard_normal((B, 2, 2, H)).astype(np.float32)
    indices = np.array([1, 4], np.int64)
    session = _session(
        "TensorScatter", [("cache", cache), ("update", update), ("indices", indices)], ["present"], 24, mode="linear"
    )
    present = session.run(None, {"cache": cache, "update": update, "indices": indices})[0]
    expected = cache.copy()
    for b, start in enumerate(indices):
        expected[b, :, start : start + 2] = update[b]
    np.testing.assert_array_equal(present, expected)
