"""Nothing the rewrite does not own changes: the model's other nodes, its initializers and its graph's
input and output declarations come out as they went in."""

from __future__ import annotations

import pathlib

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import gqa_decompose
from gqa_decompose import model_io
from gqa_decompose.api import rewrite
from gqa_decompose.ops import lookup
from gqa_decompose.ops._common import is_standard
from gqa_decompose.spec import DecomposeOptions, is_gqa_node

MODELS = pathlib.Path(__file__).resolve().parent.parent / "models"
FIXTURES = [
    p
    for p in [*sorted(MODELS.glob("*/model.onnx")), *sorted(MODELS.glob("*.onnx"))]
    if not p.name.endswith(".decomposed.onnx")
]


def _node(node: ir.Node) -> tuple:
    attributes = {name: ir.serde.serialize_attribute(a).SerializeToString() for name, a in node.attributes.items()}
    inputs = [value.name if value is not None else None for value in node.inputs]
    return node.domain, node.op_type, inputs, [value.name for value in node.outputs], attributes


def _declaration(value: ir.Value) -> tuple:
    return value.name, str(value.type), str(value.shape)


def _owned(node: ir.Node, opset: int) -> bool:
    """A node the default rewrite decomposes: GQA, or a companion op with a registered decomposer that is not
    a standard op at the model's opset (a default-domain LayerNormalization below 17 is ORT's own)."""
    return (
        is_gqa_node(node)
        or (node.domain not in ("", "ai.onnx") and lookup(node.domain, node.op_type) is not None)
        or (
            node.domain in ("", "ai.onnx")
            and lookup(node.domain, node.op_type) is not None
            and not is_standard(node.domain, node.op_type, opset)
        )
    )


def _snapshot(model: ir.Model, gqa_only: bool = False, opset: int | None = None) -> dict:
    opset = opset if opset is not None else model.opset_imports.get("", 1)
    owned = is_gqa_node if gqa_only else (lambda node: _owned(node, opset))
    containers = [model.graph, *model.functions.values()]
    nodes = {}
    for container in containers:
        for node in ir.traversal.RecursiveGraphIterator(container):
            if not owned(node):
                nodes[(id(container), node.name)] = _node(node)
    # An initializer only decomposed nodes read is theirs (MatMulNBits re-lays its weights out); the others stay.
    initializers = {
        name: (value.const_value.dtype, tuple(value.const_value.shape), id(value.const_value))
        for name, value in model.graph.initializers.items()
        if not value.uses() or not all(owned(user) for user, _ in value.uses())
    }
    return {
        "nodes": nodes,
        "initializers": initializers,
        "inputs": [_declaration(v) for v in model.graph.inputs],
        "outputs": [_declaration(v) for v in model.graph.outputs],
    }


@pytest.mark.parametrize(
    "options",
    [{}, {"target": "attention", "raise_opset": True}, {"ops": ("GroupQueryAttention",)}],
    ids=["primitives", "attention", "gqa-only"],
)
@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.parent.name if p.name == "model.onnx" else p.stem)
def test_what_the_rewrite_does_not_own_is_unchanged(path, options):
    model = model_io.load_model(path)
    gqa_only = "ops" in options
    opset = model.opset_imports.get("", 1)  # the input's: --raise-opset changes it
    before = _snapshot(model, gqa_only)
    has_gqa = any(is_gqa_node(node) for node in ir.traversal.RecursiveGraphIterator(model.graph))
    # A fixture without GQA (dynamo-llama-mha, optimizer-tiny-bert) has nothing for --only GroupQueryAttention.
    assert rewrite(model, DecomposeOptions(**options)) or (gqa_only and not has_gqa)
    after = _snapshot(model, gqa_only, opset)
    changed = [key[1] for key, node in before["nodes"].items() if after["nodes"].get(key) != node]
    assert changed == []
    assert {name: after["initializers"].get(name) for name in before["initializers"]} == before["initializers"]
    assert after["inputs"] == before["inputs"]
    assert after["outputs"] == before["outputs"]


def test_an_empty_optional_output_stays_empty():
    """With the norms kept (--only GroupQueryAttention, for a runtime with its own kernel of them: WebNN)."""
    model = model_io.load_model(MODELS / "builder-tiny-llama" / "model.onnx")
    rewrite(model, DecomposeOptions(ops=("GroupQueryAttention",)))
    proto = ir.to_proto(model)
    norms = [n for n in proto.graph.node if n.op_type == "SkipSimplifiedLayerNormalization" and len(n.output) == 4]
    assert norms and all(list(node.output)[1:3] == ["", ""] for node in norms)
    assert not [name for node in proto.graph.node for name in node.output if name == "v" or name.startswith("v_")]


def test_an_unread_initializer_and_a_dead_node_stay():
    """RemoveUnusedNodesPass dropped what no output reads (6 initializers of a Phi-3 LongRoPE model)."""
    proto = onnx.load(MODELS / "tiny-llama-gqa.onnx")
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.arange(4, dtype=np.float32), "unread"))
    proto.graph.node.append(helper.make_node("Relu", ["unread"], ["dead"], name="dead_relu"))
    rewritten = gqa_decompose.decompose(proto)
    assert "unread" in {t.name for t in rewritten.graph.initializer}
    assert "dead_relu" in {n.name for n in rewritten.graph.node}


def test_only_the_gqa_import_is_dropped():
    proto = onnx.load(MODELS / "tiny-llama-gqa.onnx")
    proto.opset_import.append(helper.make_opsetid("ai.onnx.ml", 3))  # declared, unused: the model's own
    rewritten = gqa_decompose.decompose(proto)
    domains = {o.domain for o in rewritten.opset_import}
    assert "ai.onnx.ml" in domains and "com.microsoft" not in domains


def _ort_suite_prompt(batch: int, sequence: int, buffer: int, heads: int, kv_heads: int, head_size: int) -> bytes:
    """ORT's test_gqa_cpu prompt graph with share_buffer: present declared twice, with the buffer's
    length first and the new rows' length second."""
    node = helper.make_node(
        "GroupQueryAttention",
        ["query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length"],
        ["output", "present_key", "present_value"],
        "GroupQueryAttention_0",
        num_heads=heads,
        kv_num_heads=kv_heads,
        domain="com.microsoft",
    )
    f = TensorProto.FLOAT
    inputs = [
        helper.make_tensor_value_info("query", f, [batch, sequence, heads * head_size]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [batch]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, [1]),
        helper.make_tensor_value_info("key", f, [batch, sequence, kv_heads * head_size]),
        helper.make_tensor_value_info("value", f, [batch, sequence, kv_heads * head_size]),
        helper.make_tensor_value_info("past_key", f, [batch, kv_heads, buffer, head_size]),
        helper.make_tensor_value_info("past_value", f, [batch, kv_heads, buffer, head_size]),
    ]
    outputs = [helper.make_tensor_value_info("output", f, [batch, sequence, heads * head_size])]
    for rows in (buffer, sequence):
        outputs += [
            helper.make_tensor_value_info(name, f, [batch, kv_heads, rows, head_size])
            for name in ("present_key", "present_value")
        ]
    graph = helper.make_graph([node], "GroupQueryAttention_Graph", inputs, outputs)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    return model


def test_a_name_declared_twice_keeps_both_declarations():
    batch, sequence, buffer, heads, kv_heads, head_size = 1, 5, 12, 2, 1, 16
    original = _ort_suite_prompt(batch, sequence, buffer, heads, kv_heads, head_size)
    rewritten = gqa_decompose.decompose(original)
    assert list(rewritten.graph.output) == list(original.graph.output)
    rng = np.random.default_rng(0)
    feeds = {
        "query": rng.standard_normal((batch, sequence, heads * head_size), dtype=np.float32),
        "key": rng.standard_normal((batch, sequence, kv_heads * head_size), dtype=np.float32),
        "value": rng.standard_normal((batch, sequence, kv_heads * head_size), dtype=np.float32),
        "past_key": np.zeros((batch, kv_heads, buffer, head_size), np.float32),
        "past_value": np.zeros((batch, kv_heads, buffer, head_size), np.float32),
        "seqlens_k": np.full((batch,), sequence - 1, np.int32),
        "total_sequence_length": np.array([sequence], np.int32),
    }
    results = []
    for model in (original, rewritten):
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        results.append(session.run(["output", "present_key"], feeds))
    np.testing.assert_allclose(results[1][0], results[0][0], atol=1e-5)
    assert results[1][1].shape == results[0][1].shape == (batch, kv_heads, buffer, head_size)
