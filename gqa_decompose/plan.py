"""The planner: every node the rewrite will decompose, before anything is touched.

For a model and its options, :func:`plan_gqa` lists each GroupQueryAttention node (main graph, subgraphs,
functions) with its container, the opset its expansion takes (the container's own: a function's import),
the target it becomes (:func:`~gqa_decompose.spec.resolve_target`) and its parsed spec; :func:`plan_ops`
does the same for the companion-op nodes. Refusals are collected, not raised: the pass raises the first
(:meth:`GqaPlan.raise_first_refusal`), the CI gate (:func:`gqa_decompose.report.check`) reports them all.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection

import onnx_ir as ir

from gqa_decompose.errors import GqaDecomposeError
from gqa_decompose.expansion.gqa import Lowering
from gqa_decompose.passes.decompose import container_opset
from gqa_decompose.passes.graph_queries import default_opset, find_gqa_nodes, scope_name
from gqa_decompose.passes.infer_types import require_typed_query
from gqa_decompose.raise_opset import attention_opset
from gqa_decompose.spec import DecomposeOptions, GqaSpec, parse_gqa_node, resolve_target

__all__ = ["GqaPlan", "PlannedGqa", "PlannedOp", "plan_gqa", "plan_ops", "raise_first_op_refusal"]

# The order in which the pass has always raised a refusal: every node's typing is judged before any
# node is parsed, and every node is parsed before any target is resolved.
_TYPING, _PARSING, _TARGETING = range(3)


@dataclasses.dataclass(frozen=True)
class PlannedGqa:
    """One GQA node and what it will become; ``refusal`` set (and the rest None) when it cannot be."""

    container: ir.Graph | ir.Function
    node: ir.Node
    scope: str  # "main graph", "subgraph <name>", "function <domain>::<name>"
    opset: int  # the default-domain opset its expansion takes
    spec: GqaSpec | None = None
    lowering: Lowering | None = None  # how it is emitted: the options as they apply to it, the outputs read
    target: str | None = None  # "primitives" or "attention"
    fallback: str | None = None  # why it is not the target asked for
    refusal: GqaDecomposeError | None = None
    refused_at: int | None = None  # _TYPING, _PARSING or _TARGETING


@dataclasses.dataclass(frozen=True)
class GqaPlan:
    """The GQA nodes to decompose, in model order, and the default-domain opset the model takes."""

    nodes: tuple[PlannedGqa, ...]
    raised_opset: int | None  # the opset the model is raised to (--raise-opset), None: kept
    raise_obstacle: str | None = None  # why the opset could not be raised for the Attention op

    @property
    def refused(self) -> list[PlannedGqa]:
        return [item for item in self.nodes if item.refusal is not None]

    def raise_first_refusal(self) -> None:
        """Raise the refusal the pass has always raised first (typing, then parsing, then targets)."""
        refused = self.refused
        if refused:
            raise min(refused, key=lambda item: item.refused_at).refusal


def plan_gqa(model: ir.Model, options: DecomposeOptions, nodes=None) -> GqaPlan:
    """Every GQA node of ``model`` (of ``nodes``: (container, node) pairs, default all of them when
    ``options`` decomposes GQA) with its opset, target and spec. The model must be typed already
    (:class:`~gqa_decompose.passes.InferGqaTypesPass`); it is not modified."""
    if nodes is None:
        nodes = find_gqa_nodes(model) if options.decomposes("GroupQueryAttention") else []
    model_opset, raise_obstacle = attention_opset(model, options)
    raised = model_opset if nodes and model_opset != default_opset(model) else None
    planned = [_plan_node(model, container, node, options, raised, raise_obstacle) for container, node in nodes]
    return GqaPlan(tuple(planned), raised, raise_obstacle)


def _plan_node(
    model: ir.Model,
    container: ir.Graph | ir.Function,
    node: ir.Node,
    options: DecomposeOptions,
    raised: int | None,
    raise_obstacle: str | None,
) -> PlannedGqa:
    opset = container_opset(model, container, raised)
    item = PlannedGqa(container, node, scope_name(model, container), opset)
    stage = _TYPING
    try:
        require_typed_query(model, node)
        stage = _PARSING
        spec = parse_gqa_node(node, options)
        stage = _TARGETING
        target, fallback = resolve_target(spec, options, opset, raise_obstacle)
    except GqaDecomposeError as error:
        return dataclasses.replace(item, refusal=error, refused_at=stage)
    lowering = Lowering.of(node, spec, options, target, opset)
    return dataclasses.replace(item, spec=spec, lowering=lowering, target=target, fallback=fallback)


@dataclasses.dataclass(frozen=True)
class PlannedOp:
    """One companion-op node (:class:`~gqa_decompose.passes.decompose_ops.OpNode`) and its parsed spec;
    ``refusal`` set (and ``spec`` None) when it cannot be decomposed."""

    item: object  # OpNode: container, node, decomposer, opset
    spec: object = None
    refusal: GqaDecomposeError | None = None
    below_opset: bool = False  # refused for its container's opset (the pass judges these first)


def raise_first_op_refusal(planned: list[PlannedOp]) -> None:
    """Raise the refusal the pass has always raised first: an opset below the floor, then a parse."""
    refused = [p for p in planned if p.refusal is not None]
    if refused:
        raise min(refused, key=lambda p: not p.below_opset).refusal


def plan_ops(
    model: ir.Model,
    ops: Collection[str] | None = None,
    *,
    min_opset: int | None = None,
    runtime_profile: str = "portable",
) -> list[PlannedOp]:
    """Every companion-op node of ``model`` (of ``ops``, None: any), in model order, parsed for
    ``runtime_profile`` (:class:`~gqa_decompose.ops.OpContext`).

    ``min_opset``: refuse a node whose container's opset is below it (the pass's floor).
    """
    from gqa_decompose.ops import OpContext
    from gqa_decompose.passes.decompose_ops import find_op_nodes

    planned = []
    for item in find_op_nodes(model, ops):
        if min_opset is not None and item.opset < min_opset:
            reason = f"the default-domain opset is {item.opset}; the expansion needs >= {min_opset}"
            planned.append(PlannedOp(item, refusal=GqaDecomposeError(reason, item.node.name), below_opset=True))
            continue
        context = OpContext(item.opset, item.container, runtime_profile)
        try:
            planned.append(PlannedOp(item, item.decomposer.parse(item.node, context)))
        except GqaDecomposeError as error:
            planned.append(PlannedOp(item, refusal=error))
    return planned
