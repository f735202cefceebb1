"""The pass that replaces every GroupQueryAttention node with standard ONNX ops."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import onnx_ir as ir

from gqa_decompose.errors import GqaDecomposeError
from gqa_decompose.expansion import OpBuilder, SharedSubgraphs, expand_gqa
from gqa_decompose.expansion.gqa import Lowering
from gqa_decompose.opsets import MIN_OPSET
from gqa_decompose.passes.graph_queries import default_opset, find_gqa_nodes
from gqa_decompose.passes.infer_types import InferGqaTypesPass
from gqa_decompose.raise_opset import raise_default_opset
from gqa_decompose.spec import PRESENT_KEY, PRESENT_VALUE, DecomposeOptions, GqaSpec, output_is_read

__all__ = ["MIN_OPSET", "DecomposeGqaPass", "DecomposedNode"]

logger = logging.getLogger("gqa_decompose")


@dataclasses.dataclass(frozen=True)
class DecomposedNode:
    """What happened to one GQA node."""

    name: str
    scope: str  # "main graph", "subgraph <name>", "function <domain>::<name>"
    spec: GqaSpec
    new_node_count: int
    target: str = "primitives"  # what the node became: "primitives" or "attention"
    fallback: str | None = None  # why it is not the target asked for
    lowering: Lowering | None = None  # how it was emitted


def container_opset(model: ir.Model, container: ir.Graph | ir.Function, model_opset: int | None = None) -> int:
    """The default-domain opset the expansion's ops take in ``container`` (``model_opset``: the
    model's when it is being raised; a function's own import is raised with it)."""
    if model_opset is not None:
        return model_opset
    if isinstance(container, ir.Function) and "" in container.opset_imports:
        return container.opset_imports[""]
    return default_opset(model)


def _declared_against(value: ir.Value, spec: GqaSpec) -> bool:
    """Whether present's declared shape contradicts the (B, Nkv, rows, H) the node writes (ORT runs such a node)."""
    if value.shape is None:
        return False
    width = spec.head_size // 2 if spec.kv_bits == 4 and spec.head_size else spec.head_size
    dims = list(value.shape)
    if len(dims) != 4:
        return True
    written = ((1, spec.kv_num_heads), (3, width))  # width None: known only at run time
    return any(isinstance(dims[axis], int) and size is not None and dims[axis] != size for axis, size in written)


class DecomposeGqaPass(ir.passes.InPlacePass):
    """Replace every com.microsoft.GroupQueryAttention node with standard ONNX ops.

    All nodes are parsed (and any refusal raised) before the model is touched,
    so a refused model is left as it was. ``decomposed`` lists what was done.
    """

    def __init__(
        self,
        options: DecomposeOptions | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        super().__init__()
        self.options = options or DecomposeOptions()
        self.progress = progress
        self.decomposed: list[DecomposedNode] = []
        self.emitted: list[ir.Node] = []  # every node the expansions added (the clean-up's scope)

    def requires(self, model: ir.Model) -> None:
        opset = default_opset(model)
        if find_gqa_nodes(model) and opset < MIN_OPSET:
            raise GqaDecomposeError(
                f"the model's default-domain opset is {opset}; the expansion needs >= {MIN_OPSET}. "
                "Convert it first (onnx.version_converter)."
            )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from gqa_decompose.plan import plan_gqa  # not at the top: the planner imports this module

        self.decomposed = []
        self.emitted = []
        found = find_gqa_nodes(model) if self.options.decomposes("GroupQueryAttention") else []
        if any(node.inputs[0] is not None and node.inputs[0].dtype is None for _, node in found):
            InferGqaTypesPass()(model)  # a bare PassManager([DecomposeGqaPass()]) works too
        plan = plan_gqa(model, self.options, found)
        plan.raise_first_refusal()  # before the model is touched
        if plan.raised_opset is not None:
            logger.info("default-domain opset raised from %d to %d", default_opset(model), plan.raised_opset)
            raise_default_opset(model, plan.raised_opset)
        shared_by_container: dict[int, SharedSubgraphs] = {}
        for index, item in enumerate(plan.nodes):
            container, spec = item.container, item.spec
            if isinstance(container, ir.Function) and "" not in container.opset_imports:
                container.opset_imports[""] = default_opset(model)
            shared = shared_by_container.setdefault(id(container), SharedSubgraphs())
            new_nodes = self._replace(container, item.node, spec, shared, index, item.opset, item.lowering)
            self.emitted.extend(new_nodes)
            self.decomposed.append(
                DecomposedNode(
                    spec.node_name, item.scope, spec, len(new_nodes), item.target, item.fallback, item.lowering
                )
            )
            if self.progress is not None:
                self.progress(index + 1, len(found))
        return ir.passes.PassResult(model, modified=bool(found))

    @staticmethod
    def _replace(
        container: ir.Graph | ir.Function,
        node: ir.Node,
        spec: GqaSpec,
        shared: SharedSubgraphs,
        index: int,
        opset: int,
        lowering: Lowering,
    ) -> list[ir.Node]:
        op = OpBuilder(node.name or f"GroupQueryAttention_{index}", opset)
        expanded = expand_gqa(op, shared, node, spec, lowering)
        new_nodes = shared.take_nodes() + op.take_nodes()
        old_values, new_values = [], []
        for position, old in enumerate(node.outputs):
            if not output_is_read(node, position):
                continue
            new = expanded.outputs[position] if position < len(expanded.outputs) else None
            if new is None:
                raise GqaDecomposeError(f"output {position} ('{old.name}') is read but not produced", spec.node_name)
            if position in (PRESENT_KEY, PRESENT_VALUE) and _declared_against(old, spec):
                # The expansion reads present back; the declaration it gets must not reach those reads.
                new = op.op("Identity", new)
                new_nodes += op.take_nodes()
            old_values.append(old)
            new_values.append(new)
        # The new values take the old ones' names, types and shapes, and their readers.
        ir.convenience.replace_nodes_and_values(container, node, [node], new_nodes, old_values, new_values)
        return new_nodes
