"""The normalization core shared by the LayerNormalization family, computed as ONNX Runtime's CPU kernel does.

Over the normalized axes (the last ``len(axes)``), in the compute type (fp32 for fp16/bf16, see
``layer_norm_impl.cc`` and ``skip_layer_norm.cc``)::

    simplified (RMS):  std = sqrt(mean(x²) + eps)                y = x / std * scale
    layer norm:        std = sqrt(mean(x²) - mean(x)² + eps)     y = (x - mean(x)) / std * scale + bias
    inv_std = 1 / std

ORT's variance is E[x²] - E[x]², not E[(x - E[x])²]; the primitives keep its form. Where the opset
has the standard op (RMSNormalization-23, LayerNormalization-17) Y comes from it instead::

    x ──Cast──> RMSNormalization-23(axis, epsilon) ──Cast──> y          (opset >= 23, simplified)
    x ──Cast──> LayerNormalization-17(axis, epsilon) ─┬─Cast──> y       (opset >= 17)
                                                      └──> mean, inv_std
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from gqa_decompose.ops._common import reduce_mean, to_type

__all__ = ["NormValues", "normalize"]

RMS_NORMALIZATION_OPSET = 23
LAYER_NORMALIZATION_OPSET = 17


@dataclasses.dataclass(frozen=True)
class NormValues:
    """The normalized tensor and the per-row statistics, all in the compute type (None: not asked for)."""

    y: ir.Value
    mean: ir.Value | None
    inv_std: ir.Value | None


def normalize(
    op,
    x: ir.Value,
    scale: ir.Value,
    bias: ir.Value | None,
    *,
    axes: list[int],
    epsilon: float,
    simplified: bool,
    want_mean: bool,
    want_inv_std: bool,
    rms_op: bool = True,
) -> NormValues:
    """Normalize ``x`` (already in the compute type) over ``axes`` (negative, trailing, contiguous); with
    ``rms_op`` False (OpContext.norm_by_primitives) the simplified norm by primitives at any opset."""
    dtype = x.dtype
    if dtype is None:
        raise ValueError("normalize() needs x's compute type set")
    scale = to_type(op, scale, dtype)
    bias = None if bias is None else to_type(op, bias, dtype)
    opset = op.opset or 0
    if simplified and rms_op and opset >= RMS_NORMALIZATION_OPSET and not want_inv_std:
        y = op.op("RMSNormalization", x, scale, axis=axes[0], epsilon=epsilon, stash_type=1)
        return _typed(NormValues(y, None, None), dtype)
    if not simplified and opset >= LAYER_NORMALIZATION_OPSET:
        attributes = {"axis": axes[0], "epsilon": epsilon, "stash_type": 1}
        # No trailing empty B: ORT 1.31 CPU crashes (SIGSEGV) creating a session with one.
        inputs = [x, scale] if bias is None else [x, scale, bias]
        if not (want_mean or want_inv_std):
            return _typed(NormValues(op.op("LayerNormalization", *inputs, **attributes), None, None), dtype)
        y, mean, inv_std = op.op_multi("LayerNormalization", *inputs, num_outputs=3, **attributes)
        return _typed(NormValues(y, mean, inv_std), dtype)
    return _typed(_primitives(op, x, scale, bias, axes, epsilon, simplified), dtype)


def _typed(values: NormValues, dtype: ir.DataType) -> NormValues:
    """The compute type set on the values (casts after them read it)."""
    for value in (values.y, values.mean, values.inv_std):
        if value is not None:
            value.dtype = dtype
    return values


def _primitives(
    op, x: ir.Value, scale: ir.Value, bias: ir.Value | None, axes: list[int], epsilon: float, simplified: bool
) -> NormValues:
    dtype = x.dtype
    mean_square = reduce_mean(op, op.op("Mul", x, x), axes)
    mean = None
    if simplified:
        variance = mean_square
        centered = x
    else:
        mean = reduce_mean(op, x, axes)
        variance = op.op("Sub", mean_square, op.op("Mul", mean, mean))
        centered = op.op("Sub", x, mean)
    std = op.op("Sqrt", op.op("Add", variance, op.float_scalar(epsilon, dtype)))
    y = op.op("Mul", op.op("Div", centered, std), scale)
    if bias is not None:
        y = op.op("Add", y, bias)
    inv_std = op.op("Reciprocal", std)
    return NormValues(y, mean, inv_std)
