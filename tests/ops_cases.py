"""One-node models of companion ops, checked the way the pipeline checks them (shared by tests/test_ops_*.py)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper

from gqa_decompose.ops import lookup
from gqa_decompose.passes.decompose_ops import DecomposeOpsPass
from gqa_decompose.verify_ops import OpVerification, verify_op_node

FLOAT = onnx.TensorProto.FLOAT
FLOAT16 = onnx.TensorProto.FLOAT16
INT64 = onnx.TensorProto.INT64


def node_model(domain, op_type, inputs, outputs, attributes=None, opset=22) -> ir.Model:
    """``inputs``: (name, elem_type, shape) or None (an empty optional); ``outputs``: (name, elem_type[, shape]) or None."""
    node = helper.make_node(
        op_type,
        ["" if spec is None else spec[0] for spec in inputs],
        ["" if spec is None else spec[0] for spec in outputs],
        domain=domain,
        **(attributes or {}),
    )
    graph = helper.make_graph(
        [node],
        "node",
        [helper.make_tensor_value_info(*spec) for spec in inputs if spec is not None],
        [
            helper.make_tensor_value_info(*spec, *([None] if len(spec) == 2 else []))
            for spec in outputs
            if spec is not None
        ],
    )
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)]
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=opsets, ir_version=10))


def verify(model: ir.Model, seed: int = 0) -> OpVerification:
    """The node against ORT CPU (asserting it matched) after checking its expansion is standard and valid."""
    node = next(iter(model.graph))
    opset = model.opset_imports[""]
    result = verify_op_node(node, lookup(node.domain, node.op_type), opset, np.random.default_rng(seed))
    assert result.ok, result
    expanded = expand(model)
    assert not [n for n in expanded.graph if n.domain not in ("", "ai.onnx")]
    proto = ir.serde.serialize_model(expanded)
    proto.opset_import.pop()  # com.microsoft: nothing uses it any more
    # The test model declares its outputs without shapes, which the full checker wants.
    onnx.checker.check_model(onnx.shape_inference.infer_shapes(proto), full_check=True)
    return result


def expand(model: ir.Model) -> ir.Model:
    """A decomposed copy of ``model``."""
    copy = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    DecomposeOpsPass()(copy)
    return copy


def op_types(model: ir.Model) -> set[str]:
    return {node.op_type for node in model.graph}
