"""Scaled dot-product attention with grouped KV heads folded into the GEMM rows (semantics doc §6).

Dimension legend: B batch, N query heads, Nkv KV heads, G = N / Nkv,
S query length, K key columns, H head size. All in the compute type (fp32 by default).

::

    query [B, N, S, H] --Reshape--> [B, Nkv, G*S, H]      (query head n = kv*G + g)
    keys  [B, Nkv, K, H] --Transpose--> [B, Nkv, H, K]
    scores = MatMul(query, keysT) * scale               [B, Nkv, G*S, K]  -> view [B, N, S, K]
    softcap: c * tanh(x / c)             bias: + attention_bias (after softcap)
    masked = x + mask_bias (0 / -inf)    probs = Softmax(masked)  (smooth: extra sink column)
    out = MatMul(probs [B, Nkv, G*S, K], values [B, Nkv, K, H])   -> [B, S, N*H]

No KV head is ever repeated: each group's G query heads become G*S rows of
one GEMM against its shared KV head, and the key Transpose feeds the MatMul
directly so ONNX Runtime fuses it with the scale into one FusedMatMul.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from gqa_decompose.expansion.builder import OpBuilder

__all__ = ["AttentionResult", "attend"]


@dataclasses.dataclass(frozen=True)
class AttentionResult:
    output_BSD: ir.Value  # [B, S, N*H]
    scores_BNSK: ir.Value  # scores after scale, softcap and bias, masked entries 0
    probs_BNSK: ir.Value  # probabilities


def _softmax_with_sink(
    op: OpBuilder, masked_BNSK: ir.Value, sink_N: ir.Value | None, num_heads: int, dtype: ir.DataType
) -> ir.Value:
    """Softmax with one extra logit (the sink, or 0) in the denominator only."""
    shape_BNS = op.slice(op.op("Shape", masked_BNSK), 0, 3, axis=0)
    sink_shape = op.op("Concat", shape_BNS, op.ints([1]), axis=0)
    if sink_N is None:
        sink_BNS1 = op.op("Expand", op.float_scalar(0.0, dtype), sink_shape)
    else:
        if sink_N.dtype != dtype:
            sink_N = op.cast(sink_N, dtype)
        sink_1N11 = op.op("Reshape", sink_N, op.ints([1, num_heads, 1, 1]))
        sink_BNS1 = op.op("Expand", sink_1N11, sink_shape)
    with_sink = op.op("Concat", masked_BNSK, sink_BNS1, axis=3)
    probs_with_sink = op.op("Softmax", with_sink, axis=-1)
    return op.slice(probs_with_sink, 0, -1, axis=3)


def attend(
    op: OpBuilder,
    query_BNSH: ir.Value,
    keys_BNkvKH: ir.Value,
    values_BNkvKH: ir.Value,
    visible_B1SK: ir.Value,
    mask_bias_B1SK: ir.Value,
    *,
    num_heads: int,
    kv_num_heads: int,
    head_size: int,
    scale: float,
    softcap: float,
    bias_BNSK: ir.Value | None,
    smooth_softmax: bool,
    head_sink_N: ir.Value | None,
    may_mask_whole_rows: bool,
    want_scores: bool,
    dtype: ir.DataType = ir.DataType.FLOAT,
) -> AttentionResult:
    query_BNkvGSH = op.op("Reshape", query_BNSH, op.ints([0, kv_num_heads, -1, head_size]))
    keys_BNkvHK = op.op("Transpose", keys_BNkvKH, perm=[0, 1, 3, 2])
    products = op.op("MatMul", query_BNkvGSH, keys_BNkvHK)
    scores_BNkvGSK = op.op("Mul", products, op.float_scalar(scale, dtype))
    scores_BNSK = op.op("Reshape", scores_BNkvGSK, op.ints([0, num_heads, -1, 0]))
    if softcap > 0:
        capped = op.op("Tanh", op.op("Div", scores_BNSK, op.float_scalar(softcap, dtype)))
        scores_BNSK = op.op("Mul", capped, op.float_scalar(softcap, dtype))
    if bias_BNSK is not None:
        scores_BNSK = op.op("Add", scores_BNSK, bias_BNSK)
    masked_BNSK = op.op("Add", scores_BNSK, mask_bias_B1SK)
    if smooth_softmax:
        probs_BNSK = _softmax_with_sink(op, masked_BNSK, head_sink_N, num_heads, dtype)
    else:
        probs_BNSK = op.op("Softmax", masked_BNSK, axis=-1)
        if may_mask_whole_rows:
            # A row with no finite score gives NaN; ONNX Runtime's fp32 kernel gives 0.
            probs_BNSK = op.op(
                "Where", op.op("IsNaN", probs_BNSK), op.float_scalar(0.0, dtype), probs_BNSK
            )
    probs_BNkvGSK = op.op("Reshape", probs_BNSK, op.ints([0, kv_num_heads, -1, 0]))
    attended_BNkvGSH = op.op("MatMul", probs_BNkvGSK, values_BNkvKH)
    attended_BNSH = op.op("Reshape", attended_BNkvGSH, op.ints([0, num_heads, -1, head_size]))
    attended_BSNH = op.op("Transpose", attended_BNSH, perm=[0, 2, 1, 3])
    output_BSD = op.op("Reshape", attended_BSNH, op.ints([0, 0, num_heads * head_size]))
    scores_out = None
    if want_scores:
        scores_out = op.op("Where", visible_B1SK, scores_BNSK, op.float_scalar(0.0, dtype))
    return AttentionResult(output_BSD, scores_out, probs_BNSK)
