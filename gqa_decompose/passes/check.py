"""The ONNX checker on the rewritten model, or on our nodes only when foreign ops remain."""

from __future__ import annotations

from collections.abc import Callable

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from gqa_decompose.errors import GqaDecomposeError
from gqa_decompose.passes.graph_queries import default_opset, non_standard_nodes

__all__ = ["CheckEmittedPass"]


class CheckEmittedPass(ir.passes.InPlacePass):
    """The ONNX checker on the whole model, or on our nodes only when foreign ops remain.

    Models from onnxruntime-genai's builder hold ORT-only ops in the default
    domain (SimplifiedLayerNormalization) that the full checker rejects; those
    are not ours to fix, so each node we emitted is checked on its own instead.
    """

    def __init__(self, emitted_prefixes: Callable[[], list[str]]) -> None:
        super().__init__()
        self._emitted_prefixes = emitted_prefixes
        self.full_model_checked = False

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        foreign = [n for n in non_standard_nodes(model) if n.domain in ("", "ai.onnx")]
        if not foreign:
            try:
                common_passes.CheckerPass(full_check=False)(model)
            except Exception as error:
                raise GqaDecomposeError(f"the rewritten model fails the ONNX checker: {error}") from error
            self.full_model_checked = True
            return ir.passes.PassResult(model, modified=False)
        opset = default_opset(model)
        context = onnx.checker.C.CheckerContext()
        context.ir_version = model.ir_version
        context.opset_imports = {"": opset}
        prefixes = tuple(f"{prefix}/" for prefix in self._emitted_prefixes())
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            if node.name and node.name.startswith(prefixes):
                if any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for attr in node.attributes.values()):
                    # The checker sees a branch alone, without the outer values it reads;
                    # the iterator visits every node inside it instead.
                    continue
                proto = ir.serde.serialize_node(node)
                try:
                    onnx.checker.check_node(proto, context)
                except Exception as error:
                    raise GqaDecomposeError(
                        f"emitted node fails the ONNX checker: {error}".splitlines()[0], node.name
                    ) from error
        return ir.passes.PassResult(model, modified=False)
