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

Which key columns are read is chosen at run time (:class:`ReadPlan`), each
choice an If whose branches hold the whole attention (a large tensor passed
through a branch would be copied):

* S >= the row-block minimum (a long prompt): causal row blocks, block i
  attending only to the columns its last row can see, so the masked upper
  triangle is not computed; shorter S (decode) takes the other branch and
  pays nothing but the If;
* a buffer holding more than twice the rows any query sees (a max-length
  buffer early in generation): a copy of the first max_b t_b rows instead
  of attending over the whole buffer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import onnx_ir as ir

from gqa_decompose.expansion.builder import OpBuilder
from gqa_decompose.expansion.head_size import HeadSize, scale_scalar, shape_of, times
from gqa_decompose.expansion.mask import RowBlockTier

__all__ = ["AttentionResult", "ReadPlan", "Scoring", "attend"]


# Converts keys or values from the cache's type to the compute type, building with the builder given.
Decode = Callable[[OpBuilder, ir.Value], ir.Value]


def _unchanged(builder: OpBuilder, value: ir.Value) -> ir.Value:
    return value


@dataclasses.dataclass(frozen=True)
class AttentionResult:
    output_BSD: ir.Value  # [B, S, N*H]
    scores_BNSK: ir.Value | None  # scores after scale, softcap and bias, masked entries 0 (want_scores)
    probs_BNSK: ir.Value | None  # probabilities (want_probs)


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


@dataclasses.dataclass(frozen=True)
class ReadPlan:
    """Run-time choices of which key columns attention reads (all values shared per model).

    Attributes:
        cut: 0-D bool, or None: True when the keys hold many more rows than any
            query can see (a max-length buffer early in generation); attention
            then reads a copy of the first ``cut_end`` rows instead of them all.
        cut_end: 1-D int64 [1], the key columns read when ``cut``.
        row_block_tiers: causal row blocks per tier, longest first (for a
            prompt that reaches the shortest tier).
        row_blocks_known: S is static and reaches the one tier given: its
            blocks are used without an If.
    """

    cut: ir.Value | None = None
    cut_end: ir.Value | None = None
    row_block_tiers: tuple[RowBlockTier, ...] = ()
    row_blocks_known: bool = False


@dataclasses.dataclass(frozen=True)
class Scoring:
    """The node's attention arithmetic: how a query row's scores become probabilities and an output row.

    ``prescale`` scales the query instead of the scores: OpenVINO moves a scale of the
    scores onto the keys (a pass over every key read); ONNX Runtime fuses either into
    its MatMul. ``may_mask_whole_rows``: some row may see no key (a NaN softmax row that
    ONNX Runtime's fp32 kernel gives as 0).
    """

    num_heads: int
    kv_num_heads: int
    head_size: HeadSize  # an int, or a run-time 1-element vector (expansion/head_size.py)
    scale: float | ir.Value  # a run-time 0-D value: 1/sqrt(H) of a run-time H
    softcap: float = 0.0
    smooth_softmax: bool = False
    head_sink_N: ir.Value | None = None
    may_mask_whole_rows: bool = False
    dtype: ir.DataType = ir.DataType.FLOAT
    prescale: bool = False


def _attend_dense(
    op: OpBuilder,
    query_BNSH: ir.Value,
    keys_BNkvKH: ir.Value,
    values_BNkvKH: ir.Value,
    mask_bias_B1SK: ir.Value,
    bias_BNSK: ir.Value | None,
    scoring: Scoring,
) -> tuple[ir.Value, ir.Value, ir.Value]:
    """(output [B, S, N*H], scores [B, N, S, K] before the mask, probs [B, N, S, K])."""
    num_heads, kv_num_heads, head_size = scoring.num_heads, scoring.kv_num_heads, scoring.head_size
    scale, softcap, dtype = scoring.scale, scoring.softcap, scoring.dtype
    query_BNkvGSH = op.op("Reshape", query_BNSH, shape_of(op, [0, kv_num_heads, -1, head_size]))
    keys_BNkvHK = op.op("Transpose", keys_BNkvKH, perm=[0, 1, 3, 2])
    if scoring.prescale:
        query_BNkvGSH = op.op("Mul", query_BNkvGSH, scale_scalar(op, scale, dtype))
        scores_BNkvGSK = op.op("MatMul", query_BNkvGSH, keys_BNkvHK)
    else:
        products = op.op("MatMul", query_BNkvGSH, keys_BNkvHK)
        scores_BNkvGSK = op.op("Mul", products, scale_scalar(op, scale, dtype))
    scores_BNSK = op.op("Reshape", scores_BNkvGSK, op.ints([0, num_heads, -1, 0]))
    if softcap > 0:
        capped = op.op("Tanh", op.op("Div", scores_BNSK, op.float_scalar(softcap, dtype)))
        scores_BNSK = op.op("Mul", capped, op.float_scalar(softcap, dtype))
    if bias_BNSK is not None:
        scores_BNSK = op.op("Add", scores_BNSK, bias_BNSK)
    masked_BNSK = op.op("Add", scores_BNSK, mask_bias_B1SK)
    if scoring.smooth_softmax:
        probs_BNSK = _softmax_with_sink(op, masked_BNSK, scoring.head_sink_N, num_heads, dtype)
    else:
        probs_BNSK = op.op("Softmax", masked_BNSK, axis=-1)
        if scoring.may_mask_whole_rows:
            # A row with no finite score gives NaN; ONNX Runtime's fp32 kernel gives 0.
            probs_BNSK = op.op("Where", op.op("IsNaN", probs_BNSK), op.float_scalar(0.0, dtype), probs_BNSK)
    probs_BNkvGSK = op.op("Reshape", probs_BNSK, op.ints([0, kv_num_heads, -1, 0]))
    attended_BNkvGSH = op.op("MatMul", probs_BNkvGSK, values_BNkvKH)
    attended_BNSH = op.op("Reshape", attended_BNkvGSH, shape_of(op, [0, num_heads, -1, head_size]))
    attended_BSNH = op.op("Transpose", attended_BNSH, perm=[0, 2, 1, 3])
    output_BSD = op.op("Reshape", attended_BSNH, shape_of(op, [0, 0, times(op, num_heads, head_size)]))
    return output_BSD, scores_BNSK, probs_BNSK


def _attend_row_blocks(
    op: OpBuilder,
    query_BNSH: ir.Value,
    keys_BNkvKH: ir.Value,
    values_BNkvKH: ir.Value,
    mask_bias_B1SK: ir.Value,
    bias_BNSK: ir.Value | None,
    tier: RowBlockTier,
    scoring: Scoring,
) -> ir.Value:
    """Causal row blocks: each block of query rows attends only to the key columns it can see.

    Block i's rows see no column at or after its key end, so the columns after
    it (the masked upper triangle of a prompt) are never computed. Softmax
    rows are unchanged: the dropped columns had probability 0.
    """
    zero_1 = op.ints([0])
    pieces = op.ints([1] * (tier.count + 1))
    rows = op.op_multi("Split", tier.rows, pieces, axis=0, num_outputs=tier.count + 1)
    key_ends = op.op_multi("Split", tier.key_ends, pieces, axis=0, num_outputs=tier.count + 1)
    outputs = []
    for row_start, row_end, key_end in zip(rows[:-1], rows[1:], key_ends[1:]):
        query = op.op("Slice", query_BNSH, row_start, row_end, op.ints([2]))
        keys = op.op("Slice", keys_BNkvKH, zero_1, key_end, op.ints([2]))
        values = op.op("Slice", values_BNkvKH, zero_1, key_end, op.ints([2]))
        starts = op.op("Concat", row_start, zero_1, axis=0)
        ends = op.op("Concat", row_end, key_end, axis=0)
        mask = op.op("Slice", mask_bias_B1SK, starts, ends, op.ints([2, 3]))
        bias = None
        if bias_BNSK is not None:
            bias = op.op("Slice", bias_BNSK, starts, ends, op.ints([2, 3]))
        outputs.append(_attend_dense(op, query, keys, values, mask, bias, scoring)[0])
    return op.op("Concat", *outputs, axis=1)


@dataclasses.dataclass(frozen=True)
class _Attention:
    """One :func:`attend` call's inputs and wanted outputs.

    Its methods build the whole attention in whichever builder (graph or If
    branch) they are given, returning [output, scores?, probs?].
    """

    query_BNSH: ir.Value
    keys_BNkvKH: ir.Value
    values_BNkvKH: ir.Value
    visible_B1SK: ir.Value
    mask_bias_B1SK: ir.Value
    bias_BNSK: ir.Value | None
    scoring: Scoring
    want_scores: bool
    want_probs: bool
    plan: ReadPlan
    decode_keys: Decode
    decode_values: Decode

    def decoded_dense(self, builder: OpBuilder, keys: ir.Value, values: ir.Value) -> list[ir.Value]:
        """Full-width attention over ``keys`` / ``values`` in the cache's type."""
        keys, values = self.decode_keys(builder, keys), self.decode_values(builder, values)
        output, scores, probs = _attend_dense(
            builder, self.query_BNSH, keys, values, self.mask_bias_B1SK, self.bias_BNSK, self.scoring
        )
        results = [output]
        if self.want_scores:
            results.append(
                builder.op("Where", self.visible_B1SK, scores, builder.float_scalar(0.0, self.scoring.dtype))
            )
        if self.want_probs:
            results.append(probs)
        return results

    def full_width(self, builder: OpBuilder) -> list[ir.Value]:
        """Every key column, or (when ``plan.cut`` holds at run time) the first ``plan.cut_end``."""
        keys_BNkvKH, values_BNkvKH, plan = self.keys_BNkvKH, self.values_BNkvKH, self.plan
        if plan.cut is None:
            return self.decoded_dense(builder, keys_BNkvKH, values_BNkvKH)

        def cut(inner: OpBuilder) -> list[ir.Value]:
            keys = inner.slice(keys_BNkvKH, 0, plan.cut_end, axis=2)
            values = inner.slice(values_BNkvKH, 0, plan.cut_end, axis=2)
            return self.decoded_dense(inner, keys, values)

        return builder.if_else(plan.cut, cut, lambda inner: self.decoded_dense(inner, keys_BNkvKH, values_BNkvKH))

    def row_blocks(self, tier: RowBlockTier) -> Callable[[OpBuilder], list[ir.Value]]:
        """A builder of the causal row blocks of ``tier`` (output only)."""
        # Blocks read overlapping prefixes of the keys: decode all of them once.
        return lambda builder: [
            _attend_row_blocks(
                builder,
                self.query_BNSH,
                self.decode_keys(builder, self.keys_BNkvKH),
                self.decode_values(builder, self.values_BNkvKH),
                self.mask_bias_B1SK,
                self.bias_BNSK,
                tier,
                self.scoring,
            )
        ]

    def longest_tier_reached(self, tiers: tuple[RowBlockTier, ...]) -> Callable[[OpBuilder], list[ir.Value]]:
        """Tiers longest first: the first one S reaches; the last is reached (checked outside)."""
        tier, shorter = tiers[0], tiers[1:]
        if not shorter:
            return self.row_blocks(tier)
        return lambda builder: list(
            builder.if_else(tier.use, self.row_blocks(tier), self.longest_tier_reached(shorter))
        )

    def on_planned_path(self, builder: OpBuilder) -> list[ir.Value]:
        """Output (then scores, probabilities when wanted) by the path ``plan`` chooses: full width or row blocks."""
        tiers = self.plan.row_block_tiers
        if self.want_scores or self.want_probs or not tiers:
            return list(self.full_width(builder))
        if self.plan.row_blocks_known:
            return self.row_blocks(tiers[0])(builder)
        # Decode (S below the shortest tier) passes one If; only long prompts choose their tier.
        return list(builder.if_else(tiers[-1].use, self.longest_tier_reached(tiers), self.full_width))


def attend(
    op: OpBuilder,
    query_BNSH: ir.Value,
    keys_BNkvKH: ir.Value,
    values_BNkvKH: ir.Value,
    visible_B1SK: ir.Value,
    mask_bias_B1SK: ir.Value,
    scoring: Scoring,
    *,
    bias_BNSK: ir.Value | None = None,
    want_scores: bool = False,
    want_probs: bool = False,
    plan: ReadPlan | None = None,
    decode: tuple[Decode, Decode] | None = None,
) -> AttentionResult:
    """Attention of every query row over the key columns, chosen at run time by ``plan``.

    ``keys`` may hold more rows than the mask's K columns only when ``plan.cut``
    is given: then the mask has ``cut_end`` columns whenever ``cut`` holds.
    ``decode`` (keys, values) turns the cache's type into ``dtype`` (a cast, or a
    dequantization); it is applied after a cut, so only the rows read are converted.
    Scores and probabilities (for ``output_qk``) come from the full-width path;
    row blocks are only used when neither is wanted.
    """
    plan = plan or ReadPlan()
    decode_keys, decode_values = decode or (_unchanged, _unchanged)
    attention = _Attention(
        query_BNSH=query_BNSH,
        keys_BNkvKH=keys_BNkvKH,
        values_BNkvKH=values_BNkvKH,
        visible_B1SK=visible_B1SK,
        mask_bias_B1SK=mask_bias_B1SK,
        bias_BNSK=bias_BNSK,
        scoring=scoring,
        want_scores=want_scores,
        want_probs=want_probs,
        plan=plan,
        decode_keys=decode_keys,
        decode_values=decode_values,
    )
    results = attention.on_planned_path(op)
    output = results.pop(0)
    scores = results.pop(0) if want_scores else None
    probs = results.pop(0) if want_probs else None
    return AttentionResult(output, scores, probs)
