"""The contrib activations: QuickGelu, FastGelu, BiasGelu, Gelu and BiasAdd (com.microsoft), elementwise.

Computed in fp32 for fp16/bf16 (one rounding at the end), in the input type otherwise::

    QuickGelu(x; alpha=1.702)  = x * sigmoid(alpha * x)
    Gelu(x)                    = 0.5 * x * (1 + erf(x / sqrt(2)))          opset >= 20: Gelu-20
    BiasGelu(a, b)             = Gelu(a + b)
    FastGelu(x[, bias])        = 0.5 * v * (1 + tanh(sqrt(2/pi) * (v + 0.044715 * v³))),  v = x (+ bias)
                                                                            opset >= 20: Gelu-20(approximate="tanh")
    BiasAdd(x, bias, skip)     = x + bias + skip                            (no ORT CPU kernel: checked against numpy)

Before / after (e.g. FastGelu below opset 20)::

    X, bias ──FastGelu──> Y

    X ─Cast─ Add(bias) ─┬─ Mul(v, v) ─ Mul(0.044715) ─ Add(1) ─ Mul(v) ─ Mul(sqrt(2/pi)) ─ Tanh ─ Add(1) ─┐
                        └──────────────────────────────────────────────── Mul(0.5) ─────────── Mul ◄──────┘─Cast─> Y

Contract: floating-point inputs of one type; bias/skip broadcast as ORT takes them (validated by ORT at run time).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx_ir as ir

from gqa_decompose.errors import GqaDecomposeError
from gqa_decompose.ops import register
from gqa_decompose.ops._common import (
    DefaultOracle,
    attribute,
    compute_type,
    input_at,
    require_float,
    to_type,
)
from gqa_decompose.ops.base import OpContext

__all__ = ["ActivationSpec", "BiasAdd", "BiasGelu", "FastGelu", "Gelu", "QuickGelu"]

GELU_OPSET = 20


@dataclasses.dataclass(frozen=True)
class ActivationSpec:
    node_name: str
    dtype: ir.DataType
    inputs: int  # non-empty inputs, in order
    alpha: float = 1.0


def _parse(node: ir.Node, required: int, optional: int = 0, alpha: float = 1.0) -> ActivationSpec:
    present = [value for value in node.inputs if value is not None]
    if any(input_at(node, index) is None for index in range(required)):
        raise GqaDecomposeError(f"{node.op_type} needs {required} input(s)", node.name)
    if len(node.inputs) > required + optional or any(value is None for value in node.inputs[: len(present)]):
        raise GqaDecomposeError(f"unexpected inputs of {node.op_type}", node.name)
    dtype = require_float(node, present[0], "X")
    for value in present[1:]:
        if value.dtype != dtype:
            raise GqaDecomposeError(f"input '{value.name}' has type {value.dtype}; X has {dtype}", node.name)
    return ActivationSpec(node.name or "", dtype, len(present), alpha)


def _summed(op, node: ir.Node, spec: ActivationSpec, ctype: ir.DataType) -> ir.Value:
    """The node's inputs in the compute type, added (x, x + bias, x + bias + skip)."""
    total = to_type(op, node.inputs[0], ctype)
    for value in node.inputs[1 : spec.inputs]:
        total = op.op("Add", total, to_type(op, value, ctype))
    return total


def _gelu(op, v: ir.Value, ctype: ir.DataType, tanh: bool) -> ir.Value:
    if (op.opset or 0) >= GELU_OPSET:
        return op.op("Gelu", v, approximate="tanh") if tanh else op.op("Gelu", v)
    if tanh:
        cubic = op.op("Mul", op.op("Mul", v, v), op.float_scalar(0.044715, ctype))
        inner = op.op(
            "Mul",
            op.op("Mul", op.op("Add", cubic, op.float_scalar(1.0, ctype)), v),
            op.float_scalar(math.sqrt(2.0 / math.pi), ctype),
        )
        gate = op.op("Tanh", inner)
    else:
        gate = op.op("Erf", op.op("Mul", v, op.float_scalar(1.0 / math.sqrt(2.0), ctype)))
    half_v = op.op("Mul", v, op.float_scalar(0.5, ctype))
    return op.op("Mul", half_v, op.op("Add", gate, op.float_scalar(1.0, ctype)))


class _Activation(DefaultOracle):
    domain = "com.microsoft"
    required = 1
    optional = 0

    def parse(self, node: ir.Node, context: OpContext) -> ActivationSpec:
        return _parse(node, self.required, self.optional)

    def expand(self, op, node: ir.Node, spec: ActivationSpec) -> list[ir.Value]:
        ctype = compute_type(spec.dtype)
        return [to_type(op, self.compute(op, _summed(op, node, spec, ctype), spec, ctype), spec.dtype)]

    def compute(self, op, v: ir.Value, spec: ActivationSpec, ctype: ir.DataType) -> ir.Value:
        raise NotImplementedError


class QuickGelu(_Activation):
    op_type = "QuickGelu"

    def parse(self, node: ir.Node, context: OpContext) -> ActivationSpec:
        return _parse(node, 1, alpha=float(attribute(node, "alpha", 1.702)))

    def compute(self, op, v, spec, ctype):
        return op.op("Mul", v, op.op("Sigmoid", op.op("Mul", v, op.float_scalar(spec.alpha, ctype))))


class Gelu(_Activation):
    op_type = "Gelu"

    def compute(self, op, v, spec, ctype):
        return _gelu(op, v, ctype, tanh=False)


class BiasGelu(Gelu):
    op_type = "BiasGelu"
    required = 2


class FastGelu(_Activation):
    op_type = "FastGelu"
    optional = 1

    def compute(self, op, v, spec, ctype):
        return _gelu(op, v, ctype, tanh=True)


class BiasAdd(_Activation):
    op_type = "BiasAdd"
    required = 3

    def compute(self, op, v, spec, ctype):
        return v

    def reference(self, node: ir.Node, spec: ActivationSpec, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """ORT has no CPU kernel: x + bias + skip in fp32, rounded once."""
        x, bias, skip = (feeds[value.name].astype(np.float32) for value in node.inputs[:3])
        return [(x + bias + skip).astype(feeds[node.inputs[0].name].dtype)]


for _decomposer in (QuickGelu(), Gelu(), BiasGelu(), FastGelu(), BiasAdd()):
    register(_decomposer)
