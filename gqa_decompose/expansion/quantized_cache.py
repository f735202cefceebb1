"""Quantized KV cache: int8, or int4 packed two to a byte (semantics doc §13).

Dimension legend: B batch, Nkv KV heads, L rows, H head size.

::

    quantize:   q = clip(round_half_even(x * (1 / scale)), -128..127 | -8..7)    in fp32; scale 0 means 1
                int4: byte = (q[2i] + 8) + 16 * (q[2i+1] + 8)                      element 2i in the low nibble
    dequantize: q * scale                                                           int4: (nibble - 8) * scale

``scale`` has one element (PER_TENSOR) or Nkv*H laid out [kv_head][h] (PER_CHANNEL).
Attention then runs in fp32 on exactly the dequantized values, as ORT's kernel does.
"""

from __future__ import annotations

import onnx_ir as ir

from gqa_decompose.expansion.builder import OpBuilder
from gqa_decompose.expansion.head_size import HeadSize, halved, shape_of

__all__ = ["dequantize", "quantize"]


def _scale_1N1H(op: OpBuilder, scale: ir.Value, per_channel: bool, kv_num_heads: int, head_size: HeadSize):
    shape = [1, kv_num_heads, 1, head_size] if per_channel else [1, 1, 1, 1]
    return op.op("Reshape", scale, shape_of(op, shape))


def quantize(
    op: OpBuilder,
    x_BNLH: ir.Value,
    scale: ir.Value,
    *,
    per_channel: bool,
    bits: int,
    kv_num_heads: int,
    head_size: HeadSize,
) -> ir.Value:
    """fp32 [B, Nkv, L, H] -> int8 [B, Nkv, L, H] or uint8 [B, Nkv, L, H/2]."""
    scale_1N1H = _scale_1N1H(op, scale, per_channel, kv_num_heads, head_size)
    usable_scale = op.op("Where", op.op("Equal", scale_1N1H, op.float_scalar(0.0)), op.float_scalar(1.0), scale_1N1H)
    inverse = op.op("Div", op.float_scalar(1.0), usable_scale)
    levels = op.op("Round", op.op("Mul", x_BNLH, inverse))
    low, high = (-128.0, 127.0) if bits == 8 else (-8.0, 7.0)
    clipped = op.op("Clip", levels, op.float_scalar(low), op.float_scalar(high))
    if bits == 8:
        return op.cast(clipped, ir.DataType.INT8)
    nibbles = op.op("Add", clipped, op.float_scalar(8.0))
    pairs = op.op("Reshape", nibbles, shape_of(op, [0, 0, 0, halved(op, head_size), 2], like=nibbles))
    low_nibbles = op.slice(pairs, 0, 1, axis=4)
    high_nibbles = op.slice(pairs, 1, 2, axis=4)
    packed = op.op("Add", low_nibbles, op.op("Mul", high_nibbles, op.float_scalar(16.0)))
    packed_BNSh = op.op("Reshape", packed, shape_of(op, [0, 0, 0, halved(op, head_size)], like=packed))
    # Through int32: IREE 3.13's vectorized float -> uint8 Cast saturates at 127 (signless i8) on AVX2 hosts,
    # which wrote codes >= 128 as 127; int32 -> uint8 is a plain truncation everywhere (exact: codes are 0..255).
    return op.cast(op.cast(packed_BNSh, ir.DataType.INT32), ir.DataType.UINT8)


def dequantize(
    op: OpBuilder,
    q_BNLh: ir.Value,
    scale: ir.Value,
    *,
    per_channel: bool,
    bits: int,
    kv_num_heads: int,
    head_size: HeadSize,
) -> ir.Value:
    """int8 [B, Nkv, L, H] or uint8 [B, Nkv, L, H/2] -> fp32 [B, Nkv, L, H]."""
    scale_1N1H = _scale_1N1H(op, scale, per_channel, kv_num_heads, head_size)
    if bits == 8:
        levels = op.cast(q_BNLh, ir.DataType.FLOAT)
    else:
        packed = op.cast(q_BNLh, ir.DataType.INT32)
        high = op.op("Div", packed, op.op("Constant", value=ir.tensor(16, dtype=ir.DataType.INT32)))
        low = op.op("Sub", packed, op.op("Mul", high, op.op("Constant", value=ir.tensor(16, dtype=ir.DataType.INT32))))
        pairs = op.op("Concat", op.unsqueeze(low, [4]), op.unsqueeze(high, [4]), axis=4)
        nibbles = op.op("Reshape", pairs, shape_of(op, [0, 0, 0, head_size], like=pairs))
        levels = op.op("Sub", op.cast(nibbles, ir.DataType.FLOAT), op.float_scalar(8.0))
    return op.op("Mul", levels, scale_1N1H)
