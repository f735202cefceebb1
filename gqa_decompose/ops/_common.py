"""What the companion-op decomposers share: attribute and input reading, refusals, compute types."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from gqa_decompose.errors import GqaDecomposeError
from gqa_decompose.ops.base import Tolerance

__all__ = [
    "FLOAT_TYPES",
    "attribute",
    "compute_type",
    "float_attribute",
    "input_at",
    "int_attribute",
    "is_standard",
    "outputs_read",
    "reduce_mean",
    "require_float",
    "to_type",
    "tolerance_for",
]

# The element types ONNX Runtime's kernels of these ops accept.
FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)


def attribute(node: ir.Node, name: str, default: Any) -> Any:
    """The attribute's Python value, or ``default`` when the node does not set it."""
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def int_attribute(node: ir.Node, name: str, default: int) -> int:
    """An INT attribute's value (an attribute of another type is an error), or ``default`` when not set."""
    attr = node.attributes.get(name)
    return default if attr is None else int(attr.as_int())


def float_attribute(node: ir.Node, name: str, default: float) -> float:
    """A FLOAT attribute's value (an attribute of another type is an error), or ``default`` when not set."""
    attr = node.attributes.get(name)
    return default if attr is None else float(attr.as_float())


def input_at(node: ir.Node, index: int) -> ir.Value | None:
    """Input ``index``, or None when the node has fewer inputs or leaves it empty."""
    if index >= len(node.inputs):
        return None
    return node.inputs[index]


def outputs_read(node: ir.Node) -> tuple[bool, ...]:
    """Per output: whether it exists and something reads it (a node or a graph output)."""
    read = []
    for value in node.outputs:
        read.append(value is not None and value.name != "" and (bool(value.uses()) or value.is_graph_output()))
    return tuple(read)


def require_float(node: ir.Node, value: ir.Value | None, what: str) -> ir.DataType:
    """The element type of ``value``; refuses an unknown or non-floating one."""
    dtype = None if value is None else value.dtype
    if dtype not in FLOAT_TYPES:
        raise GqaDecomposeError(
            f"{what} has element type {dtype}; expected float, float16, bfloat16 or double", node.name
        )
    return dtype


def compute_type(dtype: ir.DataType) -> ir.DataType:
    """ONNX Runtime's CPU kernels compute fp16/bf16 in fp32 and round once at the end; double stays double."""
    return ir.DataType.DOUBLE if dtype == ir.DataType.DOUBLE else ir.DataType.FLOAT


def to_type(op, value: ir.Value, dtype: ir.DataType) -> ir.Value:
    """``value`` cast to ``dtype`` (no node when it already is)."""
    if value.dtype == dtype:
        return value
    cast = op.op("Cast", value, to=dtype)
    cast.dtype = dtype  # later steps read the compute type off it
    return cast


def reduce_mean(op, value: ir.Value, axes: list[int]) -> ir.Value:
    """ReduceMean over ``axes`` keeping them (axes moved from attribute to input in opset 18)."""
    if op.opset is not None and op.opset >= 18:
        return op.op("ReduceMean", value, op.ints(axes), keepdims=1)
    return op.op("ReduceMean", value, axes=axes, keepdims=1)


def is_standard(domain: str, op_type: str, opset: int) -> bool:
    """Whether ``domain::op_type`` is an ONNX op at default-domain ``opset`` (then it is not ours to rewrite)."""
    if domain not in ("", "ai.onnx"):
        return False
    return onnx.defs.has(op_type, max_inclusive_version=opset, domain="")


def tolerance_for(dtype: ir.DataType) -> Tolerance:
    """Elementwise bounds for an expansion computed like ORT's kernel: a few ulps of the output type
    (fp32: the order of a sum differs; fp16/bf16: one rounding of a value computed in fp32)."""
    if dtype == ir.DataType.DOUBLE:
        return Tolerance(atol=1e-12, rtol=1e-12)
    if dtype == ir.DataType.FLOAT16:
        return Tolerance(atol=2e-3, rtol=2e-3)
    if dtype == ir.DataType.BFLOAT16:
        return Tolerance(atol=2e-2, rtol=1.6e-2)
    return Tolerance(atol=2e-5, rtol=2e-5)


class DefaultOracle:
    """The oracle most decomposers share: random feeds by declared type and shape, and a few ulps of
    the output type (:func:`tolerance_for`). A decomposer overrides either where its op needs more."""

    def sample_feeds(self, node: ir.Node, spec: object, rng: np.random.Generator) -> None:
        return None

    def tolerance(self, spec: object, dtype: ir.DataType) -> Tolerance:
        return tolerance_for(dtype)
