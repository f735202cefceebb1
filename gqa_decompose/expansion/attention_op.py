"""Scaled dot-product attention as one standard ONNX ``Attention`` op (opset 23/24).

Dimension legend: B batch, N query heads, Nkv KV heads, S query length,
K key columns, H head size, P past rows. All in the compute type (fp32 by default).

::

    query [B, N, S, H], keys/values [B, Nkv, K, H]      (4-D: no q_num_heads/kv_num_heads)
    Y = Attention(query, keys, values, attn_mask, [past_key, past_value],
                  scale, softcap, is_causal, qk_matmul_output_mode)    [B, N, S, H]
    output = Reshape(Transpose(Y)) [B, S, N*H]

What ONNX Runtime 1.31 CPU computes (pinned by tests/test_onnx_attention_op.py):
softmax(softcap(scale * Q K^T) + attn_mask) V, softcap before the mask as GQA
does; query head n reads KV head n // (N / Nkv) as GQA does; a row with no
visible key gives 0; qk_matmul_output_mode 2 is the scores after softcap and
mask, 3 the probabilities; is_causal is top-left without past and bottom-right
(offset P) with past. ORT rejects scale <= 0: a negative GQA scale is applied
by negating the query (exact) and passing |scale|.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from gqa_decompose.expansion.builder import OpBuilder
from gqa_decompose.expansion.head_size import HeadSize, shape_of, times

__all__ = ["AttentionOpResult", "attention_op", "with_sink_column"]

# qk_matmul_output_mode values (Attention-23).
QK_AFTER_MASK = 2
QK_AFTER_SOFTMAX = 3


@dataclasses.dataclass(frozen=True)
class AttentionOpResult:
    output_BSD: ir.Value  # [B, S, N*H]
    qk_BNSK: ir.Value | None  # qk_matmul_output of the requested mode
    present_key: ir.Value | None  # with past inputs: Concat(past, new) made by the op
    present_value: ir.Value | None


def attention_op(
    op: OpBuilder,
    query_BNSH: ir.Value,
    keys_BNkvKH: ir.Value,
    values_BNkvKH: ir.Value,
    attn_mask: ir.Value | None,
    *,
    num_heads: int,
    head_size: HeadSize,
    scale: float | None,
    softcap: float,
    is_causal: bool,
    past: tuple[ir.Value, ir.Value] | None = None,
    qk_mode: int | None = None,
) -> AttentionOpResult:
    """One Attention node and the reshape of its output to [B, S, N*H].

    Args:
        attn_mask: bool (True = attend) or float added to the scores, broadcastable
            to [B, N, S, K]; its last axis must be exactly K (ORT rejects shorter masks).
        past: (past_key, past_value): keys/values are then only the new rows and the op
            returns present = Concat(past, new), with bottom-right causal alignment.
        qk_mode: qk_matmul_output_mode to expose, or None for no qk output.
    """
    query_BNSH, attributes = _attention_attributes(op, query_BNSH, scale, softcap, is_causal, qk_mode)
    inputs: list[ir.Value | None] = [query_BNSH, keys_BNkvKH, values_BNkvKH, attn_mask]
    outputs = 1
    if past is not None:
        inputs += list(past)
        outputs = 3
    if qk_mode is not None:
        outputs = 4
    while inputs[-1] is None:
        inputs.pop()
    if outputs == 1:
        results = [op.op("Attention", *inputs, **attributes)]
    else:
        results = list(op.op_multi("Attention", *inputs, num_outputs=outputs, **attributes))
    attended_BNSH = results[0]
    attended_BSNH = op.op("Transpose", attended_BNSH, perm=[0, 2, 1, 3])
    output_BSD = op.op("Reshape", attended_BSNH, shape_of(op, [0, 0, times(op, num_heads, head_size)]))
    present_key = results[1] if past is not None else None
    present_value = results[2] if past is not None else None
    qk = results[3] if qk_mode is not None else None
    return AttentionOpResult(output_BSD, qk, present_key, present_value)


def _attention_attributes(
    op: OpBuilder,
    query_BNSH: ir.Value,
    scale: float | None,
    softcap: float,
    is_causal: bool,
    qk_mode: int | None,
) -> tuple[ir.Value, dict]:
    """The Attention node's attributes, and the query to feed it (negated for a negative scale)."""
    attributes: dict = {}
    if scale is not None:  # None: the op's default 1/sqrt(H), for a head size known at run time
        if scale < 0:  # ORT rejects scale <= 0; -scale * (Q K^T) == scale * ((-Q) K^T) exactly
            query_BNSH = op.op("Neg", query_BNSH)
            scale = -scale
        attributes["scale"] = float(scale)
    if softcap > 0:
        attributes["softcap"] = float(softcap)
    if is_causal:
        attributes["is_causal"] = 1
    if qk_mode is not None:
        attributes["qk_matmul_output_mode"] = qk_mode
    return query_BNSH, attributes


def with_sink_column(
    op: OpBuilder,
    keys_BNkvKH: ir.Value,
    values_BNkvKH: ir.Value,
    mask_BnSK: ir.Value,
    sink_N: ir.Value | None,
    num_heads: int,
    dtype: ir.DataType,
) -> tuple[ir.Value, ir.Value, ir.Value]:
    """Keys, values and float mask with one more column that carries a softmax sink.

    Smooth softmax and head sinks add one logit to each softmax denominator; the op
    has none. The extra column has a zero key (score softcap(scale * 0) = 0), a mask
    entry equal to the head's sink (0 for smooth softmax) and a zero value (adds
    nothing to the output): exactly GQA's extra logit. Costs one copy of the key and
    value columns. Keys/values and the mask are of ``dtype``.
    """

    def append_zero_row(x_BNkvKH: ir.Value) -> ir.Value:
        shape = op.op("Shape", x_BNkvKH)
        row_shape = op.op("Concat", op.slice(shape, 0, 2, axis=0), op.ints([1]), op.slice(shape, 3, 4, axis=0), axis=0)
        zeros = op.op("ConstantOfShape", row_shape, value=ir.tensor([0.0], dtype=dtype))
        return op.op("Concat", x_BNkvKH, zeros, axis=2)

    if sink_N is None:
        sink_1N11 = op.op("Expand", op.float_scalar(0.0, dtype), op.ints([1, num_heads, 1, 1]))
    else:
        sink = sink_N if sink_N.dtype == dtype else op.cast(sink_N, dtype)
        sink_1N11 = op.op("Reshape", sink, op.ints([1, num_heads, 1, 1]))
    # The mask may broadcast over heads ([B, 1, S, K]); the sink column differs per head.
    mask_BNSK = op.op("Expand", mask_BnSK, op.op("Max", op.op("Shape", mask_BnSK), op.ints([1, num_heads, 1, 1])))
    column_shape = op.op("Concat", op.slice(op.op("Shape", mask_BNSK), 0, 3, axis=0), op.ints([1]), axis=0)
    mask_with_sink = op.op("Concat", mask_BNSK, op.op("Expand", sink_1N11, column_shape), axis=3)
    return append_zero_row(keys_BNkvKH), append_zero_row(values_BNkvKH), mask_with_sink
