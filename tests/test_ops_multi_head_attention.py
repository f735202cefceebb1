"""MultiHeadAttention (BSD Q/K/V, past/present, masks, bias) -> standard ops: numeric against ORT CPU, refusals."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto

from gqa_decompose.errors import GqaDecomposeError
from gqa_decompose.ops.base import OpContext
from gqa_decompose.ops.multi_head_attention import MULTI_HEAD_ATTENTION
from tests.op_harness import compare, one_node_model

B, N, H = 2, 4, 8


def mha_model(
    S=3, L=3, P=0, Hv=H, bias=False, padding=False, attention_bias=False, dtype=np.float32, presents=True, **attributes
) -> onnx.ModelProto:
    """One MultiHeadAttention node: query [B, S, N*H], key/value [B, L, ...], past [B, N, P, H]."""
    T = P + L
    zeros = lambda *shape: np.zeros(shape, dtype)
    inputs = [
        ("query", zeros(B, S, N * H)),
        ("key", zeros(B, L, N * H)),
        ("value", zeros(B, L, N * Hv)),
        ("bias", zeros(2 * N * H + N * Hv)) if bias else None,
        ("key_padding_mask", np.zeros((B, T), np.int32)) if padding else None,
        ("attention_bias", zeros(1, 1, S, T)) if attention_bias else None,
        ("past_key", zeros(B, N, P, H)) if P else None,
        ("past_value", zeros(B, N, P, Hv)) if P else None,
    ]
    elem = TensorProto.FLOAT if dtype == np.float32 else TensorProto.FLOAT16
    outputs = [("out", elem, [B, S, N * Hv])]
    if presents:
        outputs += [("present_key", elem, [B, N, T, H]), ("present_value", elem, [B, N, T, Hv])]
    return one_node_model("MultiHeadAttention", inputs, outputs, num_heads=N, **attributes)


CASES = {
    "plain": {},
    "no presents": {"presents": False},
    "bias": {"bias": True},
    "past": {"P": 5},
    "past, decode, causal": {"P": 5, "S": 1, "L": 1, "unidirectional": 1},
    "causal prompt": {"unidirectional": 1, "S": 4, "L": 4},
    "key padding mask": {"padding": True, "P": 2},
    "attention bias (the builder's causal add_qk)": {"attention_bias": True, "P": 2},
    "scale": {"scale": 0.3},
    "value head size differs": {"Hv": 16},
    "mask_filter_value": {"padding": True, "mask_filter_value": -1e9},
    "fp16 with past and attention bias": {"dtype": np.float16, "P": 4, "attention_bias": True},
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_expansion_matches_ort(case):
    kwargs = CASES[case]
    comparison = compare(MULTI_HEAD_ATTENTION, mha_model(**kwargs))
    bound = 2e-3 if kwargs.get("dtype") == np.float16 else 1e-5
    assert max(comparison.max_errors) <= bound
    assert len(comparison.got) == (3 if kwargs.get("presents", True) else 1)


def _parse(model: onnx.ModelProto):
    ir_model = ir.serde.deserialize_model(model)
    return MULTI_HEAD_ATTENTION.parse(next(iter(ir_model.graph)), OpContext(opset=21, container=ir_model.graph))


def test_refusals():
    packed = mha_model()
    packed.graph.node[0].input[1] = ""
    packed.graph.node[0].input[2] = ""
    with pytest.raises(GqaDecomposeError, match="packed"):
        _parse(packed)
    lengths = mha_model(padding=True)
    lengths.graph.input[3].type.tensor_type.shape.ClearField("dim")
    lengths.graph.input[3].type.tensor_type.shape.dim.add().dim_value = B
    with pytest.raises(GqaDecomposeError, match="2-D"):
        _parse(lengths)
    with pytest.raises(GqaDecomposeError, match="num_heads=3"):
        _parse(_with_heads(mha_model(), 3))


def _with_heads(model: onnx.ModelProto, heads: int) -> onnx.ModelProto:
    next(a for a in model.graph.node[0].attribute if a.name == "num_heads").i = heads
    return model


def _dynamo_mha(query_type=True) -> onnx.ModelProto:
    """torch dynamo + onnxscript's fusion: symbolic lengths, attention_bias [B, 1, S, T] whose T is named
    ``past_seq + seq`` (its own symbol), past/present; optionally Q and K out of RotaryEmbedding without
    value_info, as the fusion leaves them."""
    f = TensorProto.FLOAT
    hidden = N * H
    nodes = []
    if not query_type:
        for name in ("query", "key"):
            nodes.append(
                onnx.helper.make_node(
                    "RotaryEmbedding", [f"{name}_in", "position_ids", "cos", "sin"], [name], domain="com.microsoft"
                )
            )
    nodes.append(
        onnx.helper.make_node(
            "MultiHeadAttention",
            ["query", "key", "value", "", "", "attention_bias", "past_key", "past_value"],
            ["out", "present_key", "present_value"],
            domain="com.microsoft",
            num_heads=N,
        )
    )
    qk = [("query_in", "query"), ("key_in", "key")] if not query_type else [("query", "query"), ("key", "key")]
    inputs = [onnx.helper.make_tensor_value_info(name, f, ["batch", "seq", hidden]) for name, _ in qk]
    inputs += [
        onnx.helper.make_tensor_value_info("value", f, ["batch", "seq", hidden]),
        onnx.helper.make_tensor_value_info("attention_bias", f, ["batch", 1, "seq", "past_seq + seq"]),
        onnx.helper.make_tensor_value_info("past_key", f, ["batch", N, "past_seq", H]),
        onnx.helper.make_tensor_value_info("past_value", f, ["batch", N, "past_seq", H]),
    ]
    if not query_type:
        inputs += [
            onnx.helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]),
            onnx.helper.make_tensor_value_info("cos", f, [16, H // 2]),
            onnx.helper.make_tensor_value_info("sin", f, [16, H // 2]),
        ]
    outputs = [onnx.helper.make_tensor_value_info("out", f, ["batch", "seq", hidden])]
    outputs += [
        onnx.helper.make_tensor_value_info(name, f, ["batch", N, "past_seq + seq", H])
        for name in ("present_key", "present_value")
    ]
    graph = onnx.helper.make_graph(nodes, "dynamo_mha", inputs, outputs)
    opsets = [onnx.helper.make_opsetid("", 20), onnx.helper.make_opsetid("com.microsoft", 1)]
    return onnx.helper.make_model(graph, opset_imports=opsets, ir_version=10)


def test_symbolic_lengths_verify_with_an_attention_bias_as_long_as_past_plus_new():
    """verify_op_node gave every symbol 3 rows, so attention_bias was 3 wide against T = 3 + 3 and ORT
    refused the original ("attention_bias dimension 3 should be same as total_sequence_length")."""
    from gqa_decompose.verify_ops import verify_op_node

    model = ir.serde.deserialize_model(_dynamo_mha())
    node = next(iter(model.graph))
    result = verify_op_node(node, MULTI_HEAD_ATTENTION, 20)
    assert result.ok is True, result


def test_a_query_out_of_rotary_embedding_without_value_info_is_typed_and_decomposed():
    """No GQA in the model, so the typing of GQA queries never ran and MultiHeadAttention's query had no type
    (refused: "takes float or float16"); the whole model now matches ORT."""
    import gqa_decompose

    original = _dynamo_mha(query_type=False)
    decomposed = gqa_decompose.decompose(original)
    assert not [n for n in decomposed.graph.node if n.domain == "com.microsoft"]
    rng = np.random.default_rng(0)
    b, s, p = 2, 3, 4
    feeds = {name: rng.standard_normal((b, s, N * H), dtype=np.float32) for name in ("query_in", "key_in", "value")}
    feeds.update(
        attention_bias=rng.standard_normal((b, 1, s, p + s), dtype=np.float32),
        past_key=rng.standard_normal((b, N, p, H), dtype=np.float32),
        past_value=rng.standard_normal((b, N, p, H), dtype=np.float32),
        position_ids=np.array([[4, 5, 6], [1, 2, 3]], np.int64),
        cos=rng.uniform(-1, 1, (16, H // 2)).astype(np.float32),
        sin=rng.uniform(-1, 1, (16, H // 2)).astype(np.float32),
    )
    import onnxruntime as ort

    runs = [
        ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
        for m in (original, decomposed)
    ]
    for want, got in zip(*runs):
        np.testing.assert_allclose(got, want, atol=1e-5)
