"""Typing GQA inputs: ONNX shape inference is taught GQA's outputs, so a deep model is typed in one round."""

from __future__ import annotations

import pathlib
import sys

import onnx
import onnx_ir as ir

from gqa_decompose.passes import InferGqaTypesPass, find_gqa_nodes, infer_types

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "scripts"))
from make_tiny_llama import write_sparse_model  # noqa: E402


def test_every_layer_of_a_deep_model_is_typed_in_one_inference_round(tmp_path, monkeypatch):
    path = write_sparse_model(tmp_path, layers=12, hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=64)
    model = ir.load(path)
    rounds = []
    original = infer_types.quiet_shape_inference
    monkeypatch.setattr(infer_types, "quiet_shape_inference", lambda m: rounds.append(1) or original(m))
    monkeypatch.setattr(infer_types, "_ort_symbolic_inference", lambda m: (_ for _ in ()).throw(AssertionError))
    InferGqaTypesPass()(model)
    nodes = [node for _, node in find_gqa_nodes(model)]
    assert len(nodes) == 12
    assert all(node.inputs[0].shape is not None and node.inputs[0].shape[2] == 128 for node in nodes)
    assert all(node.outputs[0].shape is not None and node.outputs[0].shape[2] == 64 for node in nodes)
    assert len(rounds) == 1  # was one round per layer


def test_the_gqa_schema_is_registered_only_during_inference():
    assert not onnx.defs.has("GroupQueryAttention", "com.microsoft")
    with infer_types._gqa_schema_registered():
        assert onnx.defs.has("GroupQueryAttention", "com.microsoft")
    assert not onnx.defs.has("GroupQueryAttention", "com.microsoft")


# Typing through ORT-only ops ONNX does not know -------------------------------------------------------

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import pytest  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import gqa_decompose  # noqa: E402
from gqa_decompose.errors import GqaDecomposeError  # noqa: E402

_N, _KV, _H, _HIDDEN = 4, 2, 16, 64


def _qk_norm_model(norm_op: str = "SimplifiedLayerNormalization", domain: str = "") -> onnx.ModelProto:
    """A dynamo + optimize_for_ort Qwen3-style attention: q/k RMS norms per head as a default-domain
    SimplifiedLayerNormalization between Reshapes, feeding GQA, and no value_info."""
    rng = np.random.default_rng(0)
    weights = {
        "wq": rng.standard_normal((_HIDDEN, _N * _H)) * 0.1,
        "wk": rng.standard_normal((_HIDDEN, _KV * _H)) * 0.1,
        "wv": rng.standard_normal((_HIDDEN, _KV * _H)) * 0.1,
        "q_norm": 1 + 0.1 * rng.standard_normal(_H),
        "k_norm": 1 + 0.1 * rng.standard_normal(_H),
    }
    initializers = [numpy_helper.from_array(w.astype(np.float32), name) for name, w in weights.items()]
    initializers += [
        numpy_helper.from_array(np.array(s, np.int64), name)
        for name, s in (("q_heads", [0, 0, _N, _H]), ("k_heads", [0, 0, _KV, _H]), ("flat", [0, 0, -1]))
    ]
    norm = dict(axis=-1, epsilon=1e-6, domain=domain)
    nodes = [
        helper.make_node("MatMul", ["hidden", "wq"], ["q"], name="q_proj"),
        helper.make_node("MatMul", ["hidden", "wk"], ["k"], name="k_proj"),
        helper.make_node("MatMul", ["hidden", "wv"], ["v"], name="v_proj"),
        helper.make_node("Reshape", ["q", "q_heads"], ["q4"], name="q_split"),
        helper.make_node("Reshape", ["k", "k_heads"], ["k4"], name="k_split"),
        helper.make_node(norm_op, ["q4", "q_norm"], ["qn4"], name="q_norm_node", **norm),
        helper.make_node(norm_op, ["k4", "k_norm"], ["kn4"], name="k_norm_node", **norm),
        helper.make_node("Reshape", ["qn4", "flat"], ["qn"], name="q_join"),
        helper.make_node("Reshape", ["kn4", "flat"], ["kn"], name="k_join"),
        helper.make_node(
            "GroupQueryAttention",
            ["qn", "kn", "v", "past_key", "past_value", "seqlens_k", "total_sequence_length"],
            ["attn", "present_key", "present_value"],
            name="node_GroupQueryAttention_509",
            domain="com.microsoft",
            num_heads=_N,
            kv_num_heads=_KV,
        ),
    ]
    f = TensorProto.FLOAT
    inputs = [
        helper.make_tensor_value_info("hidden", f, ["batch", "seq", _HIDDEN]),
        helper.make_tensor_value_info("past_key", f, ["batch", _KV, "past", _H]),
        helper.make_tensor_value_info("past_value", f, ["batch", _KV, "past", _H]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
    ]
    outputs = [
        helper.make_tensor_value_info("attn", f, ["batch", "seq", _N * _H]),
        helper.make_tensor_value_info("present_key", f, ["batch", _KV, "total", _H]),
        helper.make_tensor_value_info("present_value", f, ["batch", _KV, "total", _H]),
    ]
    graph = helper.make_graph(nodes, "qwen3_attention", inputs, outputs, initializers)
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1), helper.make_opsetid("custom", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


@pytest.fixture
def symbolic_inference_crashes(monkeypatch):
    """ONNX Runtime's symbolic shape inference fails as it does on the dynamo export."""
    from onnxruntime.tools import symbolic_shape_infer

    def crash(*args, **kwargs):
        raise TypeError("object of type 'NoneType' has no len()")

    monkeypatch.setattr(symbolic_shape_infer.SymbolicShapeInference, "infer_shapes", staticmethod(crash))
    # The pass runs infer_shapes' steps itself (to read the symbols ORT merged): the crash comes from the first.
    monkeypatch.setattr(symbolic_shape_infer.SymbolicShapeInference, "_preprocess", crash)


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


@pytest.mark.parametrize("ort_inference", ["crashes", "works"])
def test_a_default_domain_simplified_layer_norm_before_gqa_is_typed_through(ort_inference, request):
    if ort_inference == "crashes":
        request.getfixturevalue("symbolic_inference_crashes")
    original = _qk_norm_model()
    rewritten = gqa_decompose.decompose(original)
    assert not [n for n in rewritten.graph.node if n.domain == "com.microsoft"]
    rng = np.random.default_rng(1)
    batch, past, seq = 1, 3, 4
    feeds = {
        "hidden": rng.standard_normal((batch, seq, _HIDDEN), dtype=np.float32),
        "past_key": rng.standard_normal((batch, _KV, past, _H), dtype=np.float32),
        "past_value": rng.standard_normal((batch, _KV, past, _H), dtype=np.float32),
        "seqlens_k": np.full((batch,), past + seq - 1, np.int32),
        "total_sequence_length": np.array(past + seq, np.int32),
    }
    for got, expected in zip(_run(rewritten, feeds), _run(original, feeds)):
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-4)


def test_a_typing_failure_says_so_and_where(symbolic_inference_crashes):
    with pytest.raises(GqaDecomposeError) as caught:
        gqa_decompose.decompose(_qk_norm_model("Unknown", "custom"))
    message = str(caught.value)
    assert "typing failed: the query 'qn' has no type" in message
    assert "typing stops at node 'q_norm_node' (custom::Unknown)" in message
    assert "symbolic shape inference failed: TypeError: object of type 'NoneType' has no len()" in message


def test_matmul_nbits_and_skip_norm_outputs_are_typed_from_their_inputs():
    a = ir.Value(name="a", type=ir.TensorType(ir.DataType.FLOAT16), shape=ir.Shape(["batch", "seq", 64]))
    matmul = ir.node(
        "MatMulNBits",
        [a, None, None],
        attributes={"K": 64, "N": 96, "bits": 4, "block_size": 32},
        domain="com.microsoft",
        num_outputs=1,
    )
    matmul.outputs[0].name = "y"
    assert infer_types._type_known_contrib_outputs(matmul)
    assert matmul.outputs[0].dtype == ir.DataType.FLOAT16 and list(matmul.outputs[0].shape) == ["batch", "seq", 96]
    skip = ir.node("SkipSimplifiedLayerNormalization", [a, a, None], domain="com.microsoft", num_outputs=4)
    for index, output in enumerate(skip.outputs):
        output.name = f"out{index}"
    assert infer_types._type_known_contrib_outputs(skip)
    typed = [output.shape is not None for output in skip.outputs]
    assert typed == [True, False, False, True]
    assert skip.outputs[3].dtype == ir.DataType.FLOAT16
