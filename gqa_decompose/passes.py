"""The rewrite pipeline on onnx-ir: find -> spec -> expand -> replace -> clean up -> check.

``DecomposeGqaPass`` replaces every com.microsoft.GroupQueryAttention node in
the main graph, in subgraphs (If/Loop bodies) and in model-local functions.
``build_pipeline`` wraps it with onnx-ir's own passes: common-subexpression
elimination (merges the per-layer constants and anything two layers compute
alike), unused-node and unused-opset removal (drops the com.microsoft import
when nothing else uses it), topological sort, unique names, shape inference and a checker
that checks the whole model when every op is standard, and otherwise only the
nodes we emitted (a builder's own ORT-only ops in the default domain would
fail the checker before any rewrite).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from gqa_decompose.errors import GqaDecomposeError
from gqa_decompose.expansion import OpBuilder, SharedSubgraphs, expand_gqa
from gqa_decompose.spec import (
    DecomposeOptions,
    GqaSpec,
    is_gqa_node,
    parse_gqa_node,
)

__all__ = [
    "MIN_OPSET",
    "CheckEmittedPass",
    "DecomposeGqaPass",
    "DecomposedNode",
    "build_pipeline",
    "find_gqa_nodes",
    "non_standard_nodes",
]

logger = logging.getLogger(__name__)

# Unsqueeze/Split/Squeeze with axes as inputs and Softmax over one axis.
MIN_OPSET = 13


@dataclasses.dataclass(frozen=True)
class DecomposedNode:
    """What happened to one GQA node."""

    name: str
    scope: str  # "main graph", "subgraph <name>", "function <domain>::<name>"
    spec: GqaSpec
    new_node_count: int


def _scope_name(model: ir.Model, container: ir.Graph | ir.Function) -> str:
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


def _default_opset(model: ir.Model) -> int:
    version = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    if version is None:
        raise GqaDecomposeError("the model imports no default-domain (ai.onnx) opset")
    return version


def _graph_outputs(container: ir.Graph | ir.Function) -> frozenset[ir.Value]:
    return frozenset(container.outputs)


class InferGqaTypesPass(ir.passes.InPlacePass):
    """ONNX shape inference, taught what a GQA node outputs.

    ONNX's inference does not know com.microsoft ops, so everything after the
    first GQA layer stays untyped. Each round types the outputs of every GQA
    node whose query is typed, then infers again, until nothing changes.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        found = find_gqa_nodes(model)
        gqa_nodes = [node for _, node in found]
        modified = False
        for function in {id(c): c for c, _ in found if isinstance(c, ir.Function)}.values():
            modified |= _type_function_body(model, function)
        for _ in range(len(gqa_nodes) + 1):
            _quiet_shape_inference(model)
            progress = False
            for node in gqa_nodes:
                progress |= _type_gqa_outputs(node)
            modified |= progress
            if not progress:
                break
        if any(_untyped_query(node) for node in gqa_nodes):
            modified |= _ort_symbolic_inference(model)
        return ir.passes.PassResult(model, modified=modified)


def _untyped_query(node: ir.Node) -> bool:
    query = node.inputs[0]
    return query is not None and (query.dtype is None or query.shape is None)


def _ort_symbolic_inference(model: ir.Model) -> bool:
    """Type values with ONNX Runtime's symbolic shape inference, which knows its contrib ops.

    ONNX's own inference stops at ops it does not know (SkipLayerNormalization,
    a builder's SimplifiedLayerNormalization, ...) when the model carries no
    value_info. Large and external initializers become typed graph inputs
    first, so no weight is read. Only values without a type are filled in.
    """
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    except ImportError:
        return False
    proto = ir.serde.serialize_model(model)
    inputs = {value.name for value in proto.graph.input}
    kept = []
    for tensor in proto.graph.initializer:
        external = tensor.data_location == onnx.TensorProto.EXTERNAL
        if external or tensor.ByteSize() > 1024:
            if tensor.name not in inputs:
                proto.graph.input.append(
                    onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))
                )
        else:
            kept.append(tensor)
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    logging.getLogger("onnxruntime.tools.symbolic_shape_infer").setLevel(logging.CRITICAL)
    try:
        inferred = SymbolicShapeInference.infer_shapes(proto, auto_merge=True, guess_output_rank=True)
    except Exception:  # partial typing is still useful; the spec refuses what stays unknown
        return False
    if inferred is None:
        return False
    by_name = {info.name: info for info in inferred.graph.value_info}
    changed = False
    for node in model.graph:
        for value in node.outputs:
            info = by_name.get(value.name)
            if info is None or (value.type is not None and value.shape is not None):
                continue
            typed = ir.serde.deserialize_value_info_proto(info, None)
            if value.type is None:
                value.type = typed.type
            if value.shape is None:
                value.shape = typed.shape
            changed = True
    return changed


def _type_function_body(model: ir.Model, function: ir.Function) -> bool:
    """Type a function's values from its call sites, which must agree on input types.

    Function bodies are untyped in ONNX; the expansion needs the query's type
    and hidden size, so the body is inferred as a graph whose inputs take the
    types and shapes of the (first) call's arguments.
    """
    calls = [
        node
        for node in ir.traversal.RecursiveGraphIterator(model.graph)
        if (node.domain, node.op_type, node.overload) == function.identifier()
    ]
    if not calls:
        return False
    for index, parameter in enumerate(function.inputs):
        arguments = [call.inputs[index] if index < len(call.inputs) else None for call in calls]
        dtypes = {argument.dtype for argument in arguments if argument is not None}
        if len(dtypes) > 1:
            raise GqaDecomposeError(
                f"function {function.domain}::{function.name} is called with different types for "
                f"input '{parameter.name}'; inline it first"
            )
        first = arguments[0]
        if first is not None and parameter.type is None:
            parameter.type = first.type
            shapes = {str(argument.shape) for argument in arguments if argument is not None}
            parameter.shape = first.shape if len(shapes) == 1 else None
    body = onnx.helper.make_graph(
        [ir.serde.serialize_node(node) for node in function],
        "function_body",
        [ir.serde.serialize_value(value) for value in function.inputs if value.type is not None],
        [onnx.helper.make_value_info(value.name, onnx.TypeProto()) for value in function.outputs],
    )
    opsets = [onnx.helper.make_opsetid(domain, version) for domain, version in function.opset_imports.items()]
    if "" not in function.opset_imports:
        opsets.append(onnx.helper.make_opsetid("", _default_opset(model)))
    probe = onnx.helper.make_model(body, opset_imports=opsets, ir_version=model.ir_version)
    try:
        inferred = onnx.shape_inference.infer_shapes(probe)
    except Exception:  # a partial typing is still useful; the spec refuses what stays unknown
        return False
    by_name = {info.name: info for info in inferred.graph.value_info}
    changed = False
    for node in function:
        for value in node.outputs:
            info = by_name.get(value.name)
            if info is None or value.type is not None:
                continue
            typed = ir.serde.deserialize_value_info_proto(info, None)
            value.type, value.shape = typed.type, typed.shape
            changed = True
    return changed


def _quiet_shape_inference(model: ir.Model) -> None:
    inference_logger = logging.getLogger(common_passes.ShapeInferencePass.__module__)
    level = inference_logger.level
    inference_logger.setLevel(logging.CRITICAL)
    try:
        common_passes.ShapeInferencePass()(model)
    finally:
        inference_logger.setLevel(level)


def _type_gqa_outputs(node: ir.Node) -> bool:
    """Set the type and shape of a GQA node's untyped outputs from its inputs."""
    query = node.inputs[0]
    if query is None or query.dtype is None or query.shape is None or len(query.shape) != 3:
        return False
    attrs = node.attributes
    num_heads = attrs["num_heads"].as_int() if "num_heads" in attrs else 0
    kv_num_heads = attrs["kv_num_heads"].as_int() if "kv_num_heads" in attrs else 0
    hidden = query.shape[2]
    if num_heads <= 0 or kv_num_heads <= 0 or not isinstance(hidden, int):
        return False
    packed = len(node.inputs) < 2 or node.inputs[1] is None
    head_size = hidden // (num_heads + 2 * kv_num_heads) if packed else hidden // num_heads
    batch, sequence = query.shape[0], query.shape[1]
    unknown = ir.SymbolicDim(None)
    shapes = [
        ir.Shape([batch, sequence, num_heads * head_size]),
        ir.Shape([batch, kv_num_heads, unknown, head_size]),
        ir.Shape([batch, kv_num_heads, unknown, head_size]),
        ir.Shape([batch, num_heads, sequence, unknown]),
    ]
    past = node.inputs[3] if len(node.inputs) > 3 else None
    cache_dtype = past.dtype if past is not None and past.dtype is not None else query.dtype
    if cache_dtype == ir.DataType.UINT8:  # int4 cache: two values a byte
        for index in (1, 2):
            shapes[index] = ir.Shape([batch, kv_num_heads, unknown, head_size // 2])
    dtypes = [query.dtype, cache_dtype, cache_dtype, query.dtype]
    changed = False
    for output, shape, dtype in zip(node.outputs, shapes, dtypes):
        if output is None or not output.name:
            continue
        if output.type is None:
            output.type = ir.TensorType(dtype)
            changed = True
        if output.shape is None:
            output.shape = shape
            changed = True
    return changed


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

    def requires(self, model: ir.Model) -> None:
        opset = _default_opset(model)
        if find_gqa_nodes(model) and opset < MIN_OPSET:
            raise GqaDecomposeError(
                f"the model's default-domain opset is {opset}; the expansion needs >= {MIN_OPSET}. "
                "Convert it first (onnx.version_converter)."
            )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.decomposed = []
        found = find_gqa_nodes(model)
        if any(node.inputs[0] is not None and node.inputs[0].dtype is None for _, node in found):
            InferGqaTypesPass()(model)  # a bare PassManager([DecomposeGqaPass()]) works too
        specs = [
            parse_gqa_node(node, self.options, _graph_outputs(container))
            for container, node in found
        ]
        shared_by_container: dict[int, SharedSubgraphs] = {}
        for index, ((container, node), spec) in enumerate(zip(found, specs)):
            if isinstance(container, ir.Function) and "" not in container.opset_imports:
                container.opset_imports[""] = _default_opset(model)
            shared = shared_by_container.setdefault(id(container), SharedSubgraphs())
            count = self._replace(container, node, spec, shared, index)
            self.decomposed.append(DecomposedNode(spec.node_name, _scope_name(model, container), spec, count))
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
    ) -> int:
        op = OpBuilder(node.name or f"GroupQueryAttention_{index}")
        expanded = expand_gqa(op, shared, node, spec)
        new_nodes = shared.take_nodes() + op.take_nodes()
        graph_outputs = _graph_outputs(container)
        for position, old in enumerate(node.outputs):
            if old is None or (not old.uses() and old not in graph_outputs):
                continue
            new = expanded.outputs[position] if position < len(expanded.outputs) else None
            if new is None:
                raise GqaDecomposeError(f"output {position} ('{old.name}') is read but not produced", spec.node_name)
            new.type = old.type if old.type is not None else new.type
            new.shape = old.shape if old.shape is not None else new.shape
            ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
            old_name, old.name = old.name, None
            new.name = old_name
        container.insert_before(node, new_nodes)
        container.remove(node, safe=True)
        return len(new_nodes)


def _is_standard(node: ir.Node, opset: int) -> bool:
    if node.domain not in ("", "ai.onnx"):
        return False
    return onnx.defs.has(node.op_type, max_inclusive_version=opset, domain="")


def non_standard_nodes(model: ir.Model) -> list[ir.Node]:
    """Nodes a runtime without ONNX Runtime's contrib ops would not know."""
    opset = _default_opset(model)
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
        opset = _default_opset(model)
        context = onnx.checker.C.CheckerContext()
        context.ir_version = model.ir_version
        context.opset_imports = {"": opset}
        prefixes = tuple(f"{prefix}/" for prefix in self._emitted_prefixes())
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            if node.name and node.name.startswith(prefixes):
                proto = ir.serde.serialize_node(node)
                try:
                    onnx.checker.check_node(proto, context)
                except Exception as error:
                    raise GqaDecomposeError(
                        f"emitted node fails the ONNX checker: {error}".splitlines()[0], node.name
                    ) from error
        return ir.passes.PassResult(model, modified=False)


class _QuietShapeInferencePass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        _quiet_shape_inference(model)
        return ir.passes.PassResult(model, modified=True)


def build_pipeline(
    decompose_pass: DecomposeGqaPass, *, check: bool = True, infer_shapes: bool = True
) -> ir.passes.PassManager:
    """The full rewrite: decompose, clean up, sort, infer shapes and check."""

    def emitted_prefixes() -> list[str]:
        names = [entry.name for entry in decompose_pass.decomposed]
        return [*names, "gqa_shared"]

    passes: list[ir.passes.PassBase] = [
        InferGqaTypesPass(),
        decompose_pass,
        common_passes.CommonSubexpressionEliminationPass(),
        common_passes.RemoveUnusedNodesPass(),
        common_passes.RemoveUnusedOpsetsPass(),
        common_passes.TopologicalSortPass(),
        # Expansion names derive from GQA node names, which models do not always keep
        # unique, and every graph's shared subgraph is "gqa_shared/...": values must stay SSA.
        common_passes.NameFixPass(),
    ]
    if infer_shapes:
        passes.append(_QuietShapeInferencePass())
    if check:
        passes.append(CheckEmittedPass(emitted_prefixes))
    return ir.passes.PassManager(passes)
