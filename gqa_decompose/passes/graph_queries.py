"""Questions about a model every pass asks: where the GQA nodes are, which ops are standard."""

from __future__ import annotations

from collections.abc import Iterable

import onnx
import onnx_ir as ir

from gqa_decompose.errors import GqaDecomposeError
from gqa_decompose.spec import is_gqa_node

__all__ = ["default_opset", "find_gqa_nodes", "non_standard_nodes", "opset_scopes", "scope_name", "with_branches"]


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


def opset_scopes(model: ir.Model) -> list[tuple[ir.Graph | ir.Function, int]]:
    """The main graph and each model-local function with the default-domain opset its nodes
    (and those of its subgraphs) are read at: a function's own import, else the model's."""
    opset = default_opset(model)
    scopes: list[tuple[ir.Graph | ir.Function, int]] = [(model.graph, opset)]
    for function in model.functions.values():
        scopes.append((function, function.opset_imports.get("", function.opset_imports.get("ai.onnx", opset))))
    return scopes


def non_standard_nodes(model: ir.Model) -> list[ir.Node]:
    """Nodes a runtime without ONNX Runtime's contrib ops would not know, in the main graph,
    subgraphs and function bodies (a call of a model-local function is not one: its body is looked at)."""
    nodes = []
    local_functions = set(model.functions)
    for container, opset in opset_scopes(model):
        for node in ir.traversal.RecursiveGraphIterator(container):
            if (node.domain, node.op_type, node.overload) in local_functions:
                continue
            if not _is_standard(node, opset):
                nodes.append(node)
    return nodes


def with_branches(nodes: Iterable[ir.Node]) -> set[ir.Node]:
    """``nodes`` and every node inside their graph attributes (the branches of an emitted If)."""
    found: set[ir.Node] = set()
    for node in nodes:
        found.add(node)
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                found.update(ir.traversal.RecursiveGraphIterator(attr.as_graph()))
            elif attr.type == ir.AttributeType.GRAPHS:
                for graph in attr.as_graphs():
                    found.update(ir.traversal.RecursiveGraphIterator(graph))
    return found
