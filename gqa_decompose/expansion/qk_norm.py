"""Per-head RMS normalization of Q and the new K before rotary (semantics doc §16).

Dimension legend: B batch, S query length, n heads (N or Nkv), H head size.

    y = x / sqrt(mean_H(x^2) + epsilon) * weight[H]        in fp32, rounded to the model's type

ONNX Runtime's CPU kernel rejects the norm inputs; the oracle (see ``verify``) is
its own RMS normalization op feeding the same node without them, which computes
in fp32 and rounds to the model's type before rotary. Opset 23 has that op as
RMSNormalization; older opsets get the same arithmetic from primitives.
"""

from __future__ import annotations

import onnx_ir as ir

from gqa_decompose.expansion.builder import OpBuilder
from gqa_decompose.opsets import ATTENTION_MIN_OPSET

__all__ = ["rms_normalize_heads"]

_FLOAT = ir.DataType.FLOAT


def rms_normalize_heads(
    op: OpBuilder, x_BSnH: ir.Value, weight_H: ir.Value, epsilon: float, dtype: ir.DataType, norm_op: bool = True
) -> ir.Value:
    """``x_BSnH`` normalized over its last axis (H), scaled by ``weight_H``, in ``dtype``: RMSNormalization
    at opset >= 23 unless ``norm_op`` is False, primitives otherwise."""
    if norm_op and op.opset is not None and op.opset >= ATTENTION_MIN_OPSET:
        return op.op("RMSNormalization", x_BSnH, weight_H, axis=-1, epsilon=epsilon, stash_type=1)
    x = x_BSnH if dtype == _FLOAT else op.cast(x_BSnH, _FLOAT)
    weight = weight_H if dtype == _FLOAT else op.cast(weight_H, _FLOAT)
    mean_square = op.reduce_mean_last_axis(op.op("Mul", x, x))
    root = op.op("Sqrt", op.op("Add", mean_square, op.float_scalar(epsilon)))
    normalized = op.op("Mul", op.op("Div", x, root), weight)
    return normalized if dtype == _FLOAT else op.cast(normalized, dtype)
