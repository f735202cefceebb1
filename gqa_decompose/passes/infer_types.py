"""Types for GQA inputs: ONNX shape inference taught what a GQA node outputs, function
bodies typed from their call sites, and ONNX Runtime's symbolic inference as a fallback."""

from __future__ import annotations

import logging

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from gqa_decompose.errors import GqaDecomposeError
from gqa_decompose.passes.graph_queries import default_opset, find_gqa_nodes

__all__ = ["InferGqaTypesPass", "quiet_shape_inference"]


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
            quiet_shape_inference(model)
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
    return _fill_untyped(model.graph, inferred.graph)


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


def _fill_untyped(container: ir.Graph | ir.Function, inferred: onnx.GraphProto) -> bool:
    """Give node outputs of ``container`` the type or shape ``inferred`` found, where they lack one."""
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
            if value.shape is None:
                value.shape = typed.shape
            changed = True
    return changed


def quiet_shape_inference(model: ir.Model) -> None:
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
