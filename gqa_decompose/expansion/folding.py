"""Rewrite-time folding of small integer computations (issue 14: a shape-clean output).

ONNX shape inference reads a Split's sizes, a Reshape's target or a Pad's amounts only from a constant: a
``Concat(Constant, Constant)`` leaves every value downstream without a shape (and crashed IREE's Reshape
lowering). :class:`~gqa_decompose.expansion.builder.OpBuilder` asks :func:`fold` before emitting such an op, and
emits one Constant when every input is known. :func:`known_value` also reads through the model's own shape
arithmetic (``Cast(Gather(Shape(mask)))``) when the shapes it reads are static.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

__all__ = ["fold", "known_value"]

_MAX_ELEMENTS = 64  # only shape-sized tensors are folded: never weights
_MAX_DEPTH = 12


def known_value(value: ir.Value | None, depth: int = 0) -> np.ndarray | None:
    """The contents of a small int/bool ``value`` when fixed at rewrite time, else None."""
    if value is None or depth > _MAX_DEPTH:
        return None
    if value.const_value is not None:
        return _small(value.const_value.numpy())
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx") or len(node.outputs) != 1:
        return None
    if node.op_type == "Constant":
        attribute = node.attributes.get("value")
        return None if attribute is None else _small(attribute.as_tensor().numpy())
    attributes = {name: attr.value for name, attr in node.attributes.items()}
    if node.op_type == "Shape":
        return fold("Shape", list(node.inputs), attributes)
    inputs = [None if v is None else known_value(v, depth + 1) for v in node.inputs]
    if any(v is None and i is not None for v, i in zip(inputs, node.inputs)):
        return None
    return _evaluate(node.op_type, inputs, attributes, list(node.inputs))


def fold(op_type: str, inputs: list[ir.Value | None], attributes: dict) -> np.ndarray | None:
    """The result of ``op_type`` on ``inputs`` when all are known and the op is one we fold, else None."""
    if op_type not in _FOLDABLE:
        return None
    if op_type == "Shape":
        shape = inputs[0].shape
        if shape is None or not all(isinstance(dim, int) for dim in shape):
            return None
        dims = list(shape)
        return np.array(dims[attributes.get("start", 0) : attributes.get("end", len(dims))], dtype=np.int64)
    values = [None if v is None else known_value(v) for v in inputs]
    if any(v is None and i is not None for v, i in zip(values, inputs)):
        return None
    return _evaluate(op_type, values, attributes, inputs)


def _small(array: np.ndarray) -> np.ndarray | None:
    # Shape arithmetic is int64/int32/bool: a small uint8/int4 tensor is a weight (MatMulNBits zero points).
    if array.size > _MAX_ELEMENTS or array.dtype not in (np.int64, np.int32, np.bool_):
        return None
    return array


def _evaluate(op_type: str, values: list, attributes: dict, inputs: list) -> np.ndarray | None:
    if op_type not in _FOLDABLE:
        return None
    try:
        result = _FOLDABLE[op_type](values, attributes, inputs)
    except (ValueError, IndexError, TypeError):  # an op we cannot mirror exactly: leave it to run time
        return None
    return None if result is None else _small(np.asarray(result))


def _reshape(values, attributes, inputs):
    data, target = values[0], [int(v) for v in values[1]]
    if attributes.get("allowzero", 0) == 0:
        target = [data.shape[i] if size == 0 else size for i, size in enumerate(target)]
    return data.reshape(target)


def _squeeze(values, attributes, inputs):
    axes = values[1] if len(values) > 1 and values[1] is not None else attributes.get("axes")
    return np.squeeze(values[0], axis=None if axes is None else tuple(int(a) for a in axes))


def _unsqueeze(values, attributes, inputs):
    axes = values[1] if len(values) > 1 and values[1] is not None else attributes["axes"]
    return np.expand_dims(values[0], tuple(int(a) for a in axes))


def _cast(values, attributes, inputs):
    dtype = ir.DataType(attributes["to"])
    if not (dtype.is_integer() or dtype == ir.DataType.BOOL):
        return None
    return values[0].astype(dtype.numpy())


_FOLDABLE = {
    "Shape": None,  # handled by fold: it reads the input's shape, not its contents
    "Concat": lambda v, a, i: np.concatenate(v, axis=a["axis"]),
    "Add": lambda v, a, i: np.add(v[0], v[1]),
    "Sub": lambda v, a, i: np.subtract(v[0], v[1]),
    "Mul": lambda v, a, i: np.multiply(v[0], v[1]),
    "Max": lambda v, a, i: np.maximum.reduce(np.broadcast_arrays(*v)),
    "Min": lambda v, a, i: np.minimum.reduce(np.broadcast_arrays(*v)),
    "Neg": lambda v, a, i: np.negative(v[0]),
    "Equal": lambda v, a, i: np.equal(v[0], v[1]),
    "Where": lambda v, a, i: np.where(v[0], v[1], v[2]),
    "Gather": lambda v, a, i: np.take(v[0], v[1], axis=a.get("axis", 0)),
    "Reshape": _reshape,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Cast": _cast,
    "Identity": lambda v, a, i: v[0],
}
