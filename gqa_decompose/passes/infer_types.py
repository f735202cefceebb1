"""Types for GQA inputs: ONNX shape inference taught what a GQA node outputs, function
bodies typed from their call sites, and ONNX Runtime's symbolic inference as a fallback."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Callable, Collection, Iterator

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnx_ir.passes.common import _c_api_utils  # onnx-ir's ShapeInferencePass calls the ONNX C API this way

from gqa_decompose.errors import GqaDecomposeError
from gqa_decompose.passes.graph_queries import default_opset, find_gqa_nodes
from gqa_decompose.spec import is_gqa_node

__all__ = ["InferGqaTypesPass", "quiet_shape_inference", "require_typed_query"]

# Where ONNX Runtime's symbolic inference failed, and why (kept for the refusal's message).
_SYMBOLIC_FAILURE = "gqa_decompose.symbolic_inference_failure"


class InferGqaTypesPass(ir.passes.InPlacePass):
    """ONNX shape inference, taught what a GQA node outputs.

    ONNX's inference does not know com.microsoft ops, so everything after the
    first GQA layer would stay untyped: while it runs, a GQA schema whose
    inference function types the outputs from the query is registered, so one
    round types every layer. Each further round types the outputs of every GQA
    node whose query is typed (where ONNX's inference could not), then infers
    again, until nothing changes.

    Where a query stays untyped (ORT-only ops ONNX does not know, no value_info),
    ONNX Runtime's symbolic inference is tried, and then, where it failed, rounds
    that type ORT's normalizations, RotaryEmbedding, MatMulNBits and the like from
    their inputs (:func:`_type_known_contrib_outputs`) between ONNX inferences.
    Why typing failed is kept for the refusal (:func:`require_typed_query`).
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        found = find_gqa_nodes(model)
        gqa_nodes = [node for _, node in found]
        modified = False
        for function in {id(c): c for c, _ in found if isinstance(c, ir.Function)}.values():
            modified |= _type_function_body(model, function)
        for _ in range(len(gqa_nodes) + 1):
            with _gqa_schema_registered():
                quiet_shape_inference(model)
            progress = False
            for node in gqa_nodes:
                progress |= _type_gqa_outputs(node)
            modified |= progress
            if not progress:
                break
        # The companion ops read their inputs' types too (a MultiHeadAttention fed by RotaryEmbedding
        # outputs without value_info, in a torch dynamo export with no GQA at all).
        companions = _companion_nodes(model)

        def untyped() -> bool:
            return any(_untyped_query(node) for node in gqa_nodes) or any(_untyped_inputs(node) for node in companions)

        # Exact rounds first: they keep the inputs' symbolic dims. ORT's symbolic inference, for what they
        # leave, merges symbols it cannot tell apart (the query's length and the total length), so only its
        # types and static dims are taken.
        modified |= _type_known_ops_in_rounds(model, gqa_nodes, untyped)
        if untyped() and _ort_symbolic_inference(model):
            modified = True
            _type_known_ops_in_rounds(model, gqa_nodes, untyped)
        return ir.passes.PassResult(model, modified=modified)


def _type_known_ops_in_rounds(model: ir.Model, gqa_nodes: list[ir.Node], untyped: Callable[[], bool]) -> bool:
    """Type GQA and known ORT ops' outputs from their inputs, then infer again, while ``untyped()`` and typing
    progresses."""
    modified = False
    for _ in range(len(model.graph) + 1):
        if not untyped():
            break
        progress = False
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            progress |= _type_gqa_outputs(node) if is_gqa_node(node) else _type_known_contrib_outputs(node)
        if not progress:
            break
        modified = True
        with _gqa_schema_registered():
            quiet_shape_inference(model)
    return modified


def _infer_gqa_outputs(context: onnx.shape_inference.InferenceContext) -> None:
    """ONNX inference function: GQA output types and shapes from the query (as ``_type_gqa_outputs``)."""
    query = context.get_input_type(0)
    if query is None or not query.tensor_type.HasField("shape"):
        return
    dims = query.tensor_type.shape.dim
    num_heads, kv_num_heads = context.get_attribute("num_heads"), context.get_attribute("kv_num_heads")
    if len(dims) != 3 or not dims[2].HasField("dim_value") or num_heads is None or kv_num_heads is None:
        return
    num_heads, kv_num_heads = num_heads.i, kv_num_heads.i
    if num_heads <= 0 or kv_num_heads <= 0:
        return
    packed = context.get_num_inputs() < 2 or not context.has_input(1)
    head_size = dims[2].dim_value // (num_heads + 2 * kv_num_heads if packed else num_heads)
    dtype = cache_dtype = query.tensor_type.elem_type
    past = context.get_input_type(3) if context.get_num_inputs() > 3 and context.has_input(3) else None
    if past is not None and past.tensor_type.elem_type:
        cache_dtype = past.tensor_type.elem_type
    cache_width = head_size // 2 if cache_dtype == onnx.TensorProto.UINT8 else head_size  # int4: 2 a byte
    batch, sequence = dims[0], dims[1]

    def tensor_type(elem_type: int, shape: list) -> onnx.TypeProto:
        type_proto = onnx.TypeProto()
        type_proto.tensor_type.elem_type = elem_type
        for dim in shape:
            entry = type_proto.tensor_type.shape.dim.add()
            if isinstance(dim, onnx.TensorShapeProto.Dimension):
                entry.CopyFrom(dim)
            elif dim is not None:
                entry.dim_value = dim
        return type_proto

    outputs = [
        tensor_type(dtype, [batch, sequence, num_heads * head_size]),
        tensor_type(cache_dtype, [batch, kv_num_heads, None, cache_width]),
        tensor_type(cache_dtype, [batch, kv_num_heads, None, cache_width]),
        tensor_type(dtype, [batch, num_heads, sequence, None]),
    ]
    for index, output in enumerate(outputs[: context.get_num_outputs()]):
        if context.has_output(index):
            context.set_output_type(index, output)


_TENSOR_TYPES = ("float", "float16", "bfloat16", "double", "int8", "uint8", "int16", "uint16", "int32", "int64", "bool")


@contextlib.contextmanager
def _gqa_schema_registered() -> Iterator[None]:
    """com.microsoft::GroupQueryAttention in ONNX's schema registry, with ``_infer_gqa_outputs``, for the
    duration of one shape inference; nothing is registered when a schema is already there."""
    if onnx.defs.has("GroupQueryAttention", "com.microsoft"):
        yield
        return
    # Any number of inputs and outputs of any tensor type: strict-mode inference must accept every GQA form.
    variadic = onnx.defs.OpSchema.FormalParameterOption.Variadic
    schema = onnx.defs.OpSchema(
        "GroupQueryAttention",
        "com.microsoft",
        1,
        inputs=[
            onnx.defs.OpSchema.FormalParameter("inputs", "T", param_option=variadic, is_homogeneous=False, min_arity=0)
        ],
        outputs=[
            onnx.defs.OpSchema.FormalParameter("outputs", "T", param_option=variadic, is_homogeneous=False, min_arity=0)
        ],
        type_constraints=[("T", [f"tensor({t})" for t in _TENSOR_TYPES], "any tensor")],
    )
    schema.set_type_and_shape_inference_function(_infer_gqa_outputs)
    onnx.defs.register_schema(schema)
    try:
        yield
    finally:
        onnx.defs.deregister_schema("GroupQueryAttention", 1, "com.microsoft")


def _untyped_query(node: ir.Node) -> bool:
    query = node.inputs[0]
    return query is not None and (query.dtype is None or query.shape is None)


def _companion_nodes(model: ir.Model) -> list[ir.Node]:
    """Every node a companion-op decomposer owns (a registered contrib op), subgraphs included."""
    from gqa_decompose.ops import lookup  # the decomposers import the expansion, which imports the passes

    return [
        node
        for node in ir.traversal.RecursiveGraphIterator(model.graph)
        if not is_gqa_node(node) and lookup(node.domain, node.op_type) is not None
    ]


def _untyped_inputs(node: ir.Node) -> bool:
    """Whether a node output feeding ``node`` lacks a type or shape (graph inputs are the spec's to judge)."""
    return any(
        value is not None and value.producer() is not None and (value.dtype is None or value.shape is None)
        for value in node.inputs
    )


def _ort_symbolic_inference(model: ir.Model) -> bool:
    """Type values with ONNX Runtime's symbolic shape inference, which knows its contrib ops.

    ONNX's own inference stops at ops it does not know (SkipLayerNormalization,
    a builder's SimplifiedLayerNormalization, ...) when the model carries no
    value_info. Initializers become typed graph inputs and large ones lose their
    values first (onnx-ir's own way to call the ONNX C APIs), so no weight is
    read. Only values without a type are filled in.

    It runs in a temporary working folder: when it cannot type everything, it
    saves ``sym_shape_infer_temp.onnx`` (and its data) into the working folder.
    """
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    except ImportError:
        return False

    merged: set[str] = set()

    def infer(proto: onnx.ModelProto) -> onnx.ModelProto | None:
        with tempfile.TemporaryDirectory(prefix="gqa-decompose-") as folder:
            previous = os.getcwd()
            os.chdir(folder)  # contextlib.chdir needs Python 3.11
            try:
                inferred, merges = _symbolic_inference(SymbolicShapeInference, proto)
                merged.update(merges)
                return inferred
            finally:
                os.chdir(previous)

    logging.getLogger("onnxruntime.tools.symbolic_shape_infer").setLevel(logging.CRITICAL)
    try:
        inferred = _c_api_utils.call_onnx_api(infer, model)
    except Exception as error:  # partial typing is still useful; what stays unknown is refused, with this
        model.meta[_SYMBOLIC_FAILURE] = f"{type(error).__name__}: {error}".splitlines()[0]
        return False
    if inferred is None:
        model.meta[_SYMBOLIC_FAILURE] = "it returned nothing"
        return False
    return _fill_untyped(model.graph, inferred.graph, untrusted_dims=merged)


def _symbolic_inference(engine_class, proto: onnx.ModelProto) -> tuple[onnx.ModelProto, set[str]]:
    """``SymbolicShapeInference.infer_shapes(proto, auto_merge=True, guess_output_rank=True)``, step by step as
    it runs, to read which symbols it merged (``suggested_merge_``): a dim named by one of them may be another
    symbol's length (a query's length merged with the total length), so it is not trusted. If ORT's internals
    differ, every symbol counts as merged."""
    engine = engine_class(2**31 - 1, True, True, 0)
    steps = ("_preprocess", "_infer_impl", "_update_output_from_vi")
    if not all(hasattr(engine, step) for step in steps) or not hasattr(engine, "suggested_merge_"):
        return engine_class.infer_shapes(proto, auto_merge=True, guess_output_rank=True), {_ALL_SYMBOLS}
    complete = False
    engine._preprocess(proto)
    while engine.run_:
        complete = engine._infer_impl()
    engine._update_output_from_vi()
    if not complete:
        raise RuntimeError("Incomplete symbolic shape inference")
    merges = engine.suggested_merge_
    return engine.out_mp_, {str(name) for name in (*merges, *merges.values())}


_ALL_SYMBOLS = "*"  # in an untrusted-dims set: no symbolic dim is trusted


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
        opsets.append(onnx.helper.make_opsetid("", default_opset(model)))
    probe = onnx.helper.make_model(body, opset_imports=opsets, ir_version=model.ir_version)
    try:
        inferred = onnx.shape_inference.infer_shapes(probe)
    except Exception:  # a partial typing is still useful; the spec refuses what stays unknown
        return False
    return _fill_untyped(function, inferred.graph)


def _fill_untyped(
    container: ir.Graph | ir.Function, inferred: onnx.GraphProto, untrusted_dims: Collection[str] = ()
) -> bool:
    """Give node outputs of ``container`` the type or shape ``inferred`` found, where they lack one; symbolic
    dims named in ``untrusted_dims`` become anonymous."""
    by_name = {info.name: info for info in inferred.value_info}
    changed = False
    for node in container:
        for value in node.outputs:
            info = by_name.get(value.name)
            if info is None or (value.type is not None and value.shape is not None):
                continue
            typed = ir.serde.deserialize_value_info_proto(info, None)
            if value.type is None:
                value.type = typed.type
            if value.shape is None and typed.shape is not None:
                dims = [None if _untrusted(d, untrusted_dims) else d for d in typed.shape]
                value.shape = ir.Shape(dims)
            changed = True
    return changed


def _untrusted(dim: int | ir.SymbolicDim, untrusted_dims: Collection[str]) -> bool:
    if isinstance(dim, int) or dim.value is None:
        return False
    return _ALL_SYMBOLS in untrusted_dims or dim.value in untrusted_dims


def quiet_shape_inference(model: ir.Model) -> None:
    inference_logger = logging.getLogger(common_passes.ShapeInferencePass.__module__)
    level = inference_logger.level
    inference_logger.setLevel(logging.CRITICAL)
    try:
        # Not strict: one exporter value_info at odds with ONNX's inference (a builder Constant declared 0-D)
        # must not leave every other value of the model unshaped.
        common_passes.ShapeInferencePass(strict_mode=False)(model)
    finally:
        inference_logger.setLevel(level)


def _type_gqa_outputs(node: ir.Node) -> bool:
    """Set the type and shape of a GQA node's untyped outputs from its inputs."""
    query = node.inputs[0]
    # A query without a shape is (B, S, hidden) in every run ORT accepts.
    if query is None or query.dtype is None or (query.shape is not None and len(query.shape) != 3):
        return False
    attrs = node.attributes
    num_heads = attrs["num_heads"].as_int() if "num_heads" in attrs else 0
    kv_num_heads = attrs["kv_num_heads"].as_int() if "kv_num_heads" in attrs else 0
    if num_heads <= 0 or kv_num_heads <= 0:
        return False
    unknown = ir.SymbolicDim(None)
    batch, sequence, hidden = query.shape if query.shape is not None else (unknown, unknown, unknown)
    packed = len(node.inputs) < 2 or node.inputs[1] is None
    # A hidden size known only at run time leaves the head dims unknown; the ranks are known all the same.
    head_size = None
    if isinstance(hidden, int):
        head_size = hidden // (num_heads + 2 * kv_num_heads) if packed else hidden // num_heads
    width = unknown if head_size is None else head_size
    shapes = [
        ir.Shape([batch, sequence, unknown if head_size is None else num_heads * head_size]),
        ir.Shape([batch, kv_num_heads, unknown, width]),
        ir.Shape([batch, kv_num_heads, unknown, width]),
        ir.Shape([batch, num_heads, sequence, unknown]),
    ]
    past = node.inputs[3] if len(node.inputs) > 3 else None
    cache_dtype = past.dtype if past is not None and past.dtype is not None else query.dtype
    if cache_dtype == ir.DataType.UINT8 and head_size is not None:  # int4 cache: two values a byte
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


# ORT ops whose first output has the type and shape of their first input (the normalizations' other
# outputs, mean and inv_std_var, are left alone; Skip*'s input_skip_bias_sum, output 3, is typed too).
_SAME_AS_INPUT = {
    "SimplifiedLayerNormalization": (0,),
    "LayerNormalization": (0,),
    "SkipSimplifiedLayerNormalization": (0, 3),
    "SkipLayerNormalization": (0, 3),
    "RotaryEmbedding": (0,),
    "FastGelu": (0,),
    "BiasGelu": (0,),
    "Gelu": (0,),
    "QuickGelu": (0,),
}


def _type_known_contrib_outputs(node: ir.Node) -> bool:
    """Type the untyped outputs of an ORT op ONNX's inference does not know, from its inputs
    (default domain or com.microsoft): see ``_SAME_AS_INPUT``; MatMulNBits gives A's type and
    A's shape with the last dim N, MultiHeadAttention the query's type and :func:`_attention_shape`."""
    if node.domain not in ("", "ai.onnx", "com.microsoft") or not node.inputs or node.inputs[0] is None:
        return False
    source = node.inputs[0]
    if source.dtype is None:
        return False
    if node.op_type == "MatMulNBits" and "N" in node.attributes:
        shape = None
        if source.shape is not None and len(source.shape) >= 1:
            shape = ir.Shape([*source.shape[:-1], node.attributes["N"].as_int()])
        return _set_untyped(node.outputs[0] if node.outputs else None, source.dtype, shape)
    if (node.domain, node.op_type) == ("com.microsoft", "MultiHeadAttention"):
        return _set_untyped(node.outputs[0] if node.outputs else None, source.dtype, _attention_shape(node))
    changed = False
    for index in _SAME_AS_INPUT.get(node.op_type, ()):
        if index < len(node.outputs):
            changed |= _set_untyped(node.outputs[index], source.dtype, source.shape)
    return changed


def _attention_shape(node: ir.Node) -> ir.Shape | None:
    """MultiHeadAttention's output in the BSD form: the query's [B, S] and the value's hidden size."""
    query, value = node.inputs[0], node.inputs[2] if len(node.inputs) > 2 else None
    if query.shape is None or query.shape.rank() != 3 or value is None or value.shape is None:
        return None
    return ir.Shape([*query.shape[:2], value.shape[2]]) if value.shape.rank() == 3 else None


def _set_untyped(value: ir.Value | None, dtype: ir.DataType, shape: ir.Shape | None) -> bool:
    if value is None or not value.name:
        return False
    changed = False
    if value.type is None:
        value.type = ir.TensorType(dtype)
        changed = True
    if value.shape is None and shape is not None:
        value.shape = ir.Shape(list(shape))
        changed = True
    return changed


def require_typed_query(model: ir.Model, node: ir.Node) -> None:
    """Refuse a GQA node whose query typing left without a type or shape, saying where typing stopped.

    Raises:
        GqaDecomposeError: the query has no type or no shape.
    """
    query = node.inputs[0] if node.inputs else None
    if query is None or query.producer() is None or (query.dtype is not None and query.shape is not None):
        return  # a graph input's declaration is the spec's to judge
    missing = "type" if query.dtype is None else "shape"
    where = _where_typing_stops(query)
    reason = f"typing failed: the query '{query.name}' has no {missing}"
    if where is not None and where is not query.producer():
        reason += f"; typing stops at node '{where.name or '<unnamed>'}' ({_op_name(where)}), whose inputs are typed"
    elif where is not None:
        reason += f"; its producer '{where.name or '<unnamed>'}' ({_op_name(where)}) could not be typed from its inputs"
    failure = model.meta.get(_SYMBOLIC_FAILURE)
    if failure:
        reason += f" (ONNX Runtime's symbolic shape inference failed: {failure})"
    raise GqaDecomposeError(reason, node.name or "<unnamed GroupQueryAttention>")


def _op_name(node: ir.Node) -> str:
    return f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type


def _where_typing_stops(value: ir.Value) -> ir.Node | None:
    """The first node upstream of ``value`` with typed inputs but an untyped output (depth-first)."""
    seen: set[ir.Node] = set()
    node = value.producer()
    while node is not None and node not in seen:
        seen.add(node)
        untyped = [v for v in node.inputs if v is not None and (v.dtype is None or v.shape is None)]
        if not untyped or untyped[0].producer() is None:
            return node
        node = untyped[0].producer()
    return node
