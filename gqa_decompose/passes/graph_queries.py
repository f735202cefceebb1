"""Questions about a model every pass asks: where the GQA nodes are, which ops are standard."""

from __future__ import annotations

import onnx
import onnx_ir as ir

from gqa_decompose.errors import GqaDecomposeError
from gqa_decompose.spec import is_gqa_node

__all__ = ["default_opset", "find_gqa_nodes", "non_standard_nodes", "scope_name"]


def scope_name(model: ir.Model, container: ir.Graph | ir.Function) -> str:
    if isinstance(container, ir.Function):
        return f"function {container.domain}::{container.name}"
    if container is model.graph:
        return "main graph"
    return f"subgraph {container.name or '<unnamed>'}"


def find_gqa_nodes(model: ir.Model) -> list[tuple[ir.Graph | ir.Function, ir.Node]]:
    """Every GQA node with the graph or function that holds it, in model order."""
    found = []
    containers: list[ir.Graph | ir.Function] = [model.graph, *model.graph.subgraphs()]
    for function in model.functions.values():
        containers.append(function)
        containers.extend(function.subgraphs())
    for container in containers:
        found.extend((container, node) for node in container if is_gqa_node(node))
    return found


def default_opset(model: ir.Model) -> int:
    version = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    if version is None:
        raise GqaDecomposeError("the model imports no default-domain (ai.onnx) opset")
    return version


def _is_standard(node: ir.Node, opset: int) -> bool:
    if node.domain not in ("", "ai.onnx"):
        return False
    return onnx.defs.has(node.op_type, max_inclusive_version=opset, domain="")


def non_standard_nodes(model: ir.Model) -> list[ir.Node]:
    """Nodes a runtime without ONNX Runtime's contrib ops would not know."""
    opset = default_opset(model)
    nodes = []
    containers: list[ir.Graph | ir.Function] = [model.graph, *model.graph.subgraphs()]
    local_functions = set(model.functions)
    for function in model.functions.values():
        containers.append(function)
    for container in containers:
        for node in container:
            if (node.domain, node.op_type, node.overload) in local_functions:
                continue
            if not _is_standard(node, opset):
                nodes.append(node)
    return nodes
