"""The ONNX checker on the rewritten model, or on our nodes only when foreign ops remain."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from gqa_decompose.errors import GqaDecomposeError
from gqa_decompose.passes.graph_queries import non_standard_nodes, opset_scopes, with_branches

__all__ = ["CheckEmittedPass"]


class CheckEmittedPass(ir.passes.InPlacePass):
    """The ONNX checker on the whole model, or on our nodes only when foreign ops remain.

    Models from onnxruntime-genai's builder hold ORT-only ops in the default
    domain (SimplifiedLayerNormalization) that the full checker rejects; those
    are not ours to fix, so each node we emitted (in the main graph, its
    subgraphs and the model's functions, at each one's opset) is checked on its own instead.
    """

    def __init__(self, emitted: Callable[[], Iterable[ir.Node]]) -> None:
        super().__init__()
        self._emitted = emitted

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        foreign = [n for n in non_standard_nodes(model) if n.domain in ("", "ai.onnx")]
        if not foreign:
            try:
                common_passes.CheckerPass(full_check=False)(model)
            except Exception as error:
                raise GqaDecomposeError(f"the rewritten model fails the ONNX checker: {error}") from error
            return ir.passes.PassResult(model, modified=False)
        emitted = with_branches(self._emitted())
        for container, opset in opset_scopes(model):
            context = onnx.checker.C.CheckerContext()
            context.ir_version = model.ir_version
            context.opset_imports = {"": opset}
            for node in ir.traversal.RecursiveGraphIterator(container):
                if node in emitted:
                    _check_node(node, context)
        return ir.passes.PassResult(model, modified=False)


def _check_node(node: ir.Node, context: onnx.checker.C.CheckerContext) -> None:
    if any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for attr in node.attributes.values()):
        # The checker sees a branch alone, without the outer values it reads;
        # the iterator visits every node inside it instead.
        return
    try:
        onnx.checker.check_node(ir.serde.serialize_node(node), context)
    except Exception as error:
        raise GqaDecomposeError(f"emitted node fails the ONNX checker: {error}".splitlines()[0], node.name) from error
