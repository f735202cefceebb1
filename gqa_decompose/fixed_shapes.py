"""A fixed-shape copy of a model, for compilers that want static shapes (TVM's Relax frontend, onnx2tf).

:func:`fixed_shape_copy` sets the inputs' dims to one run's shapes, infers every
shape (ONNX shape inference with data propagation), and folds the shape
arithmetic that now has one answer (``Cast(Gather(Shape(mask)))``, a Reshape's
target, ...) into Constants, with the rewrite's own folding rules
(:mod:`gqa_decompose.expansion.folding`). What is left computes on data only.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
import onnx.numpy_helper
import onnx_ir as ir
import onnx_ir.passes.common

from gqa_decompose.expansion.folding import known_value

__all__ = ["fixed_shape_copy"]

_MAX_FOLD_ROUNDS = 8


def fixed_shape_copy(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]]) -> onnx.ModelProto:
    """A copy of ``model`` whose inputs have ``shapes`` (by name) and whose shape arithmetic is folded.

    An input of size 0 (the empty past of a first prompt) becomes an empty initializer: feed the copy only
    its remaining inputs (``copy.graph.input``)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    # Symbolic dims elsewhere would survive the fixed inputs: inference recomputes them all.
    del copy.graph.value_info[:]
    for output in copy.graph.output:
        output.type.tensor_type.ClearField("shape")
    for value in list(copy.graph.input):
        if value.name not in shapes:
            continue
        if 0 in shapes[value.name]:  # an empty input has one possible value: it becomes a constant
            dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
            copy.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros(shapes[value.name], dtype), value.name))
            copy.graph.input.remove(value)
            continue
        dims = value.type.tensor_type.shape
        dims.ClearField("dim")
        for size in shapes[value.name]:
            dims.dim.add().dim_value = size
    result = copy
    # Inferred again after each fold: a Pad's amounts or a Range's limit, now constant, give the shapes downstream,
    # and those the next fold. onnx2tf 2.6.9 converts ops of unknown dims wrongly: the head sink's column,
    # Expand(sink, Concat(Shape(scores)[:3], [1])) of scores known only after a fold, left the softmax's last
    # dim unknown; LiteRT crashed ("double free or corruption") or gave output_qk off by 0.9 (qk_output=2).
    for _ in range(_MAX_FOLD_ROUNDS):
        folded = ir.from_proto(onnx.shape_inference.infer_shapes(result, data_prop=True))
        changed = _fold_shape_arithmetic(folded.graph)
        ir.passes.common.RemoveUnusedNodesPass()(folded)
        result = ir.to_proto(folded)
        del result.graph.value_info[:]
        if not changed:
            break
    inferred = onnx.shape_inference.infer_shapes(result, data_prop=True)
    _spell_out_reshape_targets(inferred.graph)
    return inferred


def _spell_out_reshape_targets(graph: onnx.GraphProto) -> None:
    """Each Reshape's target as its (static) output shape, without 0 (keep the dim) or -1: onnx2tf 2.6.9's
    conversion of a Reshape to [0, 2, 0, 16] after a Pad of the empty past failed in XNNPack ("XNNPack
    delegate failed to reshape runtime")."""
    shapes = {value.name: value.type.tensor_type.shape for value in [*graph.value_info, *graph.output]}
    for node in graph.node:
        shape = shapes.get(node.output[0]) if node.op_type == "Reshape" else None
        if shape is None or not all(dim.HasField("dim_value") for dim in shape.dim):
            continue
        dims = [dim.dim_value for dim in shape.dim]
        allow_zero = any(a.name == "allowzero" and a.i for a in node.attribute)
        if 0 in dims and not allow_zero:  # a 0 in the target would keep the input's dim
            continue
        name = f"{node.output[0]}__target"
        graph.initializer.append(onnx.numpy_helper.from_array(np.array(dims, dtype=np.int64), name))
        node.input[1] = name


def _fold_shape_arithmetic(graph: ir.Graph) -> bool:
    """Replace each node whose (single, small integer) output is known by a Constant; whether any was."""
    changed = False
    for node in list(graph):
        if node.op_type == "Constant" or node.domain not in ("", "ai.onnx") or len(node.outputs) != 1:
            continue
        output = node.outputs[0]
        value = _known_slice(node) if node.op_type == "Slice" else known_value(output)
        if value is None or output.is_graph_output():
            continue
        constant = ir.node("Constant", [], {"value": ir.tensor(value)}, name=f"{node.name}__fixed")
        constant.outputs[0].shape, constant.outputs[0].type = ir.Shape(value.shape), output.type
        graph.insert_before(node, constant)
        ir.convenience.replace_all_uses_with(output, constant.outputs[0])
        graph.remove(node, safe=True)
        changed = True
    return changed


def _known_slice(node: ir.Node) -> np.ndarray | None:
    """A Slice of known contents by known positive steps (the rewrite does not fold Slices: a shape's
    ``[:3]`` here), else None."""
    values = [None if value is None else known_value(value) for value in node.inputs]
    if len(values) < 3 or any(value is None for value in values):
        return None
    data, starts, ends = values[:3]
    axes = values[3] if len(values) > 3 else range(len(starts))
    steps = values[4] if len(values) > 4 else [1] * len(starts)
    index = [slice(None)] * data.ndim
    for start, end, axis, step in zip(starts, ends, axes, steps):
        if step <= 0:
            return None
        index[int(axis)] = slice(int(start), int(end), int(step))
    return data[tuple(index)]
