"""DecomposeOpsPass: nodes in the main graph, If branches and model-local functions; refusals before any change."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import helper

from gqa_decompose.api import rewrite
from gqa_decompose.errors import GqaDecomposeError
from gqa_decompose.passes.decompose_ops import DecomposeOpsPass, find_op_nodes

F = onnx.TensorProto.FLOAT
OPSETS = [helper.make_opsetid("", 22), helper.make_opsetid("com.microsoft", 1)]


def _norm(x, out, name, gamma="gamma"):
    return helper.make_node("SimplifiedLayerNormalization", [x, gamma], [out], name=name, epsilon=1e-6)


def _model() -> onnx.ModelProto:
    """x -> norm -> If(cond: branch with a norm | branch with the local function) -> y."""
    then_graph = helper.make_graph(
        [_norm("h", "t", "in_then")], "then", [], [helper.make_tensor_value_info("t", F, None)]
    )
    else_graph = helper.make_graph(
        [helper.make_node("SkipNorm", ["h", "h"], ["e"], domain="local", name="call")],
        "else",
        [],
        [helper.make_tensor_value_info("e", F, None)],
    )
    function = helper.make_function(
        "local",
        "SkipNorm",
        ["a", "b"],
        ["c"],
        [
            helper.make_node("Constant", [], ["g"], value=helper.make_tensor("g", F, [8], np.linspace(0.5, 1.5, 8))),
            helper.make_node(
                "SkipSimplifiedLayerNormalization",
                ["a", "b", "g"],
                ["c"],
                domain="com.microsoft",
                name="in_function",
                epsilon=1e-6,
            ),
        ],
        OPSETS,
    )
    nodes = [
        _norm("x", "h", "in_main"),
        helper.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", F, [2, 8]),
            helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", F, None)],
        [helper.make_tensor("gamma", F, [8], np.linspace(1, 2, 8))],
        value_info=[helper.make_tensor_value_info("h", F, [2, 8])],  # as a producer's model declares it
    )
    return helper.make_model(
        graph, opset_imports=OPSETS + [helper.make_opsetid("local", 1)], functions=[function], ir_version=10
    )


def _run(proto: onnx.ModelProto, cond: bool) -> np.ndarray:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    return session.run(None, {"x": x, "cond": np.array(cond)})[0]


def test_nodes_in_branches_and_functions_are_decomposed_and_match_ort():
    proto = _model()
    model = ir.serde.deserialize_model(proto)
    assert {item.node.name for item in find_op_nodes(model)} == {"in_main", "in_then", "in_function"}
    result = rewrite(model)
    assert sorted(entry.scope.split()[0] for entry in result.ops) == ["function", "main", "subgraph"]
    assert not find_op_nodes(model)
    rewritten = ir.serde.serialize_model(model)
    for cond in (True, False):
        np.testing.assert_allclose(_run(rewritten, cond), _run(proto, cond), rtol=1e-6, atol=1e-6)


def test_a_refused_node_leaves_the_whole_model_untouched():
    proto = _model()
    proto.functions[0].node[1].attribute[0].f = -1.0  # the last node found (in the function) is refused
    model = ir.serde.deserialize_model(proto)
    before = _nodes(model)
    with pytest.raises(GqaDecomposeError, match="epsilon"):
        DecomposeOpsPass()(model)
    assert _nodes(model) == before  # (a function body may have gained types from its call site)


def _nodes(model: ir.Model) -> list[tuple[str, str]]:
    nodes = list(ir.traversal.RecursiveGraphIterator(model.graph))
    nodes += [node for function in model.functions.values() for node in function]
    return [(node.op_type, node.name) for node in nodes]
