"""The pipeline's own passes: what they look at (function bodies, their subgraphs, each one's opset)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from gqa_decompose.errors import GqaDecomposeError
from gqa_decompose.passes import CheckEmittedPass, non_standard_nodes

IR_VERSION = 10


def _model_with_function(body: list[onnx.NodeProto], function_opset: int, model_opset: int = 13) -> ir.Model:
    """main: y = local::f(x) and a default-domain SimplifiedLayerNormalization (an ORT-only op)."""
    function = helper.make_function(
        "local",
        "f",
        ["a"],
        ["b"],
        body,
        opset_imports=[helper.make_opsetid("", function_opset), helper.make_opsetid("com.microsoft", 1)],
    )
    nodes = [
        helper.make_node("f", ["x"], ["y"], domain="local", name="call"),
        helper.make_node("SimplifiedLayerNormalization", ["y", "scale"], ["z"], name="norm"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 4])],
        [onnx.numpy_helper.from_array(np.ones(4, np.float32), "scale")],
    )
    model = helper.make_model(
        graph,
        functions=[function],
        ir_version=IR_VERSION,
        opset_imports=[helper.make_opsetid("", model_opset), helper.make_opsetid("local", 1)],
    )
    return ir.serde.deserialize_model(model)


def _if_with(node: onnx.NodeProto, output: str) -> onnx.NodeProto:
    then = helper.make_graph([node], "then", [], [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)])
    other = helper.make_graph(
        [helper.make_node("Identity", ["a"], ["other"])],
        "else",
        [],
        [helper.make_tensor_value_info("other", TensorProto.FLOAT, None)],
    )
    return helper.make_node("If", ["flag"], ["b"], then_branch=then, else_branch=other, name="if")


def test_non_standard_nodes_look_inside_a_functions_subgraphs():
    inner = helper.make_node("FusedMatMul", ["a", "a"], ["inner"], domain="com.microsoft", name="fused")
    body = [
        helper.make_node("Constant", [], ["flag"], value=helper.make_tensor("t", TensorProto.BOOL, [], [True])),
        _if_with(inner, "inner"),
    ]
    found = {node.name for node in non_standard_nodes(_model_with_function(body, 13))}
    assert found == {"fused", "norm"}


def test_non_standard_nodes_read_a_function_at_its_own_opset():
    """LayerNormalization exists from opset 17: standard in a function importing 17, in a model at 13."""
    body = [helper.make_node("LayerNormalization", ["a", "a"], ["b"], axis=-1, name="ln")]
    assert {node.name for node in non_standard_nodes(_model_with_function(body, 17))} == {"norm"}


def test_check_emitted_pass_checks_emitted_nodes_in_function_bodies():
    body = [helper.make_node("Relu", ["a"], ["b"], name="relu", bogus=1)]
    model = _model_with_function(body, 13)
    (function,) = model.functions.values()
    emitted = list(function)
    with pytest.raises(GqaDecomposeError, match="emitted node fails the ONNX checker"):
        CheckEmittedPass(lambda: emitted)(model)
    CheckEmittedPass(lambda: [])(model)  # the model's own node is not ours to check
