"""The pass that replaces every node with a registered decomposer (the companion contrib ops) with standard ops."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection

import onnx_ir as ir

from gqa_decompose.errors import GqaDecomposeError
from gqa_decompose.expansion.builder import OpBuilder
from gqa_decompose.ops import Decomposer, lookup
from gqa_decompose.ops._common import is_standard
from gqa_decompose.passes.graph_queries import default_opset, scope_name
from gqa_decompose.passes.infer_types import _type_function_body

__all__ = ["ConstantShapesPass", "DecomposeOpsPass", "DecomposedOp", "OpNode", "find_op_nodes"]

logger = logging.getLogger("gqa_decompose")

# Split/Squeeze/Unsqueeze with their axes as inputs, as every expansion emits them.
MIN_OPSET = 13


@dataclasses.dataclass(frozen=True)
class OpNode:
    """A node some decomposer owns, where it sits and the opset its expansion takes."""

    container: ir.Graph | ir.Function
    node: ir.Node
    decomposer: Decomposer
    opset: int


@dataclasses.dataclass(frozen=True)
class DecomposedOp:
    """What happened to one node."""

    name: str
    domain: str
    op_type: str
    scope: str  # "main graph", "subgraph <name>", "function <domain>::<name>"
    new_node_count: int
    prefix: str  # the name prefix of the nodes it became


def _containers(model: ir.Model) -> list[ir.Graph | ir.Function]:
    containers: list[ir.Graph | ir.Function] = [model.graph, *model.graph.subgraphs()]
    for function in model.functions.values():
        containers.append(function)
        containers.extend(function.subgraphs())
    return containers


def _opset(model: ir.Model, container: ir.Graph | ir.Function) -> int:
    if isinstance(container, ir.Function) and "" in container.opset_imports:
        return container.opset_imports[""]
    return default_opset(model)


def find_op_nodes(model: ir.Model, ops: Collection[str] | None = None) -> list[OpNode]:
    """Every node with a registered decomposer (of an op type in ``ops``, None: any), in model order.

    A default-domain node that is a standard op at its container's opset (LayerNormalization at
    opset >= 17) is left alone.
    """
    found = []
    for container in _containers(model):
        opset = None
        for node in container:
            decomposer = lookup(node.domain, node.op_type)
            if decomposer is None or (ops is not None and node.op_type not in ops):
                continue
            opset = _opset(model, container) if opset is None else opset
            if is_standard(node.domain, node.op_type, opset):
                continue
            found.append(OpNode(container, node, decomposer, opset))
    return found


class DecomposeOpsPass(ir.passes.InPlacePass):
    """Replace every node owned by a registered decomposer with its standard-op expansion.

    All nodes are parsed (and any refusal raised) before the model is touched, so a refused
    model is left as it was. ``decomposed`` lists what was done, one entry per node. The
    expansions are ``runtime_profile``'s (spec.RUNTIME_PROFILES: ops.OpContext).
    """

    def __init__(self, ops: Collection[str] | None = None, runtime_profile: str = "portable") -> None:
        super().__init__()
        self.ops = None if ops is None else frozenset(ops)
        self.runtime_profile = runtime_profile
        self.decomposed: list[DecomposedOp] = []
        self.emitted: list[ir.Node] = []  # every node the expansions added (the clean-up's scope)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from gqa_decompose.plan import plan_ops, raise_first_op_refusal  # the planner imports the passes

        self.decomposed = []
        self.emitted = []
        found = find_op_nodes(model, self.ops)
        functions = {id(item.container): item.container for item in found if isinstance(item.container, ir.Function)}
        for function in functions.values():
            # Function bodies are untyped in ONNX: type them from the call sites, as the GQA pass does.
            _type_function_body(model, function)
        planned = plan_ops(model, self.ops, min_opset=MIN_OPSET, runtime_profile=self.runtime_profile)
        raise_first_op_refusal(planned)  # before the model is touched
        for index, (item, spec) in enumerate((p.item, p.spec) for p in planned):
            name, domain, op_type = item.node.name or "", item.node.domain, item.node.op_type
            prefix = name or f"{op_type}_{index}"
            new_nodes = _replace(item, spec, prefix)
            self.emitted.extend(new_nodes)
            count = len(new_nodes)
            self.decomposed.append(
                DecomposedOp(name, domain, op_type, scope_name(model, item.container), count, prefix)
            )
        if found:
            logger.info("decomposed %d companion-op node(s)", len(found))
        return ir.passes.PassResult(model, modified=bool(found))


def _replace(item: OpNode, spec, prefix: str) -> list[ir.Node]:
    """Expand one node and splice the expansion in its place; returns the new nodes."""
    node, container = item.node, item.container
    if isinstance(container, ir.Function) and "" not in container.opset_imports:
        container.opset_imports[""] = item.opset
    op = OpBuilder(prefix, item.opset)
    expanded = list(item.decomposer.expand(op, node, spec))
    old_values, new_values = [], []
    for position, old in enumerate(node.outputs):
        new = expanded[position] if position < len(expanded) else None
        read = old.name != "" and (bool(old.uses()) or old.is_graph_output())
        if not read:
            continue  # an empty or unread optional output stays away
        if new is None:
            raise GqaDecomposeError(f"output {position} ('{old.name}') is read but not produced", node.name)
        old_values.append(old)
        new_values.append(new)
    new_nodes = op.take_nodes()
    made = {value for new_node in new_nodes for value in new_node.outputs}
    # A graph input or outer value passed through is not ours to rename: give it an Identity.
    new_values = [value if value in made else op.op("Identity", value) for value in new_values]
    new_nodes += op.take_nodes()
    ir.convenience.replace_nodes_and_values(container, node, [node], new_nodes, old_values, new_values)
    return new_nodes


class ConstantShapesPass(ir.passes.InPlacePass):
    """Give every Constant's output the shape of its tensor.

    onnxruntime-genai's builder declares some 1-D constants (``/model/constants/INT64/[1]``) as 0-D
    in value_info; common-subexpression elimination then hands that wrong shape to our equal
    constants, and the full checker rejects the model. The tensor is the truth.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            attr = node.attributes.get("value")
            if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or attr is None:
                continue
            if attr.type != ir.AttributeType.TENSOR:
                continue
            shape = ir.Shape(attr.value.shape.numpy())
            output = node.outputs[0]
            if output.shape is not None and output.shape != shape:
                output.shape = shape
                modified = True
        return ir.passes.PassResult(model, modified=modified)
