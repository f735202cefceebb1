"""Which keys each query sees (semantics doc §5), built once per model.

Dimension legend: B batch, S query length, K key columns of the score matrix.
Each key column has an absolute position kpos; query s of row b sees it when::

    causal=1:  L = min(c_b + s + 1, t_b)
               kpos < L  and  (W < 0  or  kpos >= L - W)     exactly W keys, the current one included
    causal=0:  kpos < t_b

The result is a bool ``visible_B1SK`` shared by every layer with the same
inputs, window and key layout. Key columns are either the present rows
(kpos = column index) or, for a layer whose present nobody reads, the columns
of Concat(past, new), whose positions are computed by
:func:`concat_key_positions`.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from gqa_decompose.expansion.builder import OpBuilder
from gqa_decompose.expansion.sequence import SequenceInfo, SharedSubgraphs, dim_key

__all__ = [
    "ROW_BLOCK_TIERS",
    "RowBlockTier",
    "causal_row_blocks",
    "row_block_min_queries",
    "concat_key_positions",
    "dense_key_positions",
    "mask_bias",
    "visibility_mask",
]

# (minimum S, blocks), longest first: a prompt of S queries is split into the blocks of the
# first tier it reaches. More blocks skip more of the masked triangle ((n - 1) / 2n of it)
# but cost more ops; below the last tier (and in decode) one block is cheapest.
ROW_BLOCK_TIERS = ((1024, 16), (128, 4))

# Larger than any real position, so an unused past row is never visible: positions
# and lengths are int32 in GQA (t_b = seqlens_k + 1 <= 2**31, and a key at 2**31 - 1
# would need a 2**31-row cache). Not 2**62: tract 0.23 narrows this Where's int64
# result to int32 when the other branch derives from shapes, and 2**62 became 0.
_NEVER_VISIBLE = 2**31 - 1


def dense_key_positions(shared: SharedSubgraphs, key_length: ir.Value, length_key: tuple) -> ir.Value:
    """kpos = 0..K-1, int64 [1, 1, 1, K]."""

    def build(op: OpBuilder) -> ir.Value:
        columns_K = op.op("Range", op.int_scalar(0), key_length, op.int_scalar(1))
        return op.unsqueeze(columns_K, [0, 1, 2])

    return shared.get(("dense_key_positions", length_key), build)


def concat_key_positions(
    shared: SharedSubgraphs,
    info: SequenceInfo,
    past: ir.Value,
    past_kept_B: ir.Value | None = None,
) -> ir.Value:
    """Positions of the columns of Concat(past, new), int64 [B, 1, 1, P + S].

    Past rows [0, k_b) hold the k_b tokens just before c_b, positions
    c_b - k_b .. c_b - 1 (other past rows are never visible); new column P + i
    holds position c_b + i. k_b = c_b for an ordinary cache (past row j is
    position j); a windowed cache passes its own count of kept rows.
    """

    def build(op: OpBuilder) -> ir.Value:
        past_length = op.dim(past, 2)
        columns_K = op.op(
            "Range",
            op.int_scalar(0),
            op.op("Add", past_length, info.query_length),
            op.int_scalar(1),
        )
        columns_11K = op.unsqueeze(columns_K, [0, 1])
        offsets_B11 = op.unsqueeze(info.offsets_B, [1, 2])
        if past_kept_B is None:
            kept_B11, held_positions = offsets_B11, columns_11K
        else:
            kept_B11 = op.unsqueeze(past_kept_B, [1, 2])
            first_held_B11 = op.op("Sub", offsets_B11, kept_B11)
            held_positions = op.op("Add", first_held_B11, columns_11K)
        is_held = op.op("Less", columns_11K, kept_B11)
        never_visible = op.int_scalar(_NEVER_VISIBLE)
        if past_kept_B is not None:
            # [B, 1, K] like the condition and the first branch, not a scalar: onnx2tf 2.6.9 makes such a
            # Where TFLite's SELECT, which broadcasts neither branch ("select.cc:104
            # data->has_low_rank_input_condition was not true").
            never_visible = op.op("Add", op.op("Mul", held_positions, op.int_scalar(0)), never_visible)
        past_positions = op.op("Where", is_held, held_positions, never_visible)
        new_positions = op.op("Add", offsets_B11, op.op("Sub", columns_11K, past_length))
        positions_B1K = op.op("Where", op.op("Less", columns_11K, past_length), past_positions, new_positions)
        return op.unsqueeze(positions_B1K, [1])

    return shared.get(("concat_key_positions", info, dim_key(past, 2), past_kept_B), build)


def visibility_mask(
    shared: SharedSubgraphs,
    info: SequenceInfo,
    key_positions: ir.Value,
    window: int,
    causal: bool,
) -> ir.Value:
    """bool [B, 1, S, K]: True where query s of row b attends to key column k."""

    def build(op: OpBuilder) -> ir.Value:
        if causal:
            causal_ends_BS = op.op(
                "Add",
                op.unsqueeze(info.offsets_B, [1]),
                op.op("Add", op.unsqueeze(info.query_rows_S, [0]), op.int_scalar(1)),
            )
            limits_BS = op.op("Min", causal_ends_BS, op.unsqueeze(info.total_lengths_B, [1]))
            limits_B1S1 = op.unsqueeze(limits_BS, [1, 3])
        else:
            limits_B1S1 = op.unsqueeze(info.total_lengths_B, [1, 2, 3])
        visible = op.op("Less", key_positions, limits_B1S1)
        if window >= 0:
            window_starts = op.op("Sub", limits_B1S1, op.int_scalar(window))
            in_window = op.op("GreaterOrEqual", key_positions, window_starts)
            visible = op.op("And", visible, in_window)
        return visible

    return shared.get(("visibility", info, key_positions, window, causal), build)


def mask_bias(shared: SharedSubgraphs, visible_B1SK: ir.Value, dtype: ir.DataType = ir.DataType.FLOAT) -> ir.Value:
    """[B, 1, S, K] of ``dtype``: 0 where visible, -inf elsewhere, added to every layer's scores.

    An Add of a shared bias costs less per layer than a Where on the scores.
    """

    def build(op: OpBuilder) -> ir.Value:
        return op.op("Where", visible_B1SK, op.float_scalar(0.0, dtype), op.float_scalar(float("-inf"), dtype))

    return shared.get(("mask_bias", visible_B1SK, dtype), build)


def row_block_min_queries() -> int:
    """The shortest query block split into causal row blocks."""
    return min(max(minimum, blocks) for minimum, blocks in ROW_BLOCK_TIERS)


@dataclasses.dataclass(frozen=True)
class RowBlockTier:
    """One tier of causal row blocks (values built once per model, split by each layer's branch).

    Attributes:
        use: 0-D bool, S reaches the tier.
        minimum: the shortest S the tier is used for (at least n).
        count: n, the number of blocks.
        rows: int64 [n + 1], block i holds query rows [rows[i], rows[i + 1]).
        key_ends: int64 [n + 1], block i sees no key column at or after key_ends[i + 1].
    """

    use: ir.Value
    minimum: int
    count: int
    rows: ir.Value
    key_ends: ir.Value


def causal_row_blocks(shared: SharedSubgraphs, info: SequenceInfo, key_length: ir.Value) -> tuple[RowBlockTier, ...]:
    """Per tier of :data:`ROW_BLOCK_TIERS`, longest first.

    For dense key columns (column j holds position j). Block i of n holds query
    rows [floor(i*S/n), floor((i+1)*S/n)), never empty since S >= n when used.
    Row s of batch row b sees no column at or after c_b + s + 1, so the block
    needs only the columns before min(K, max_b c_b + row end).

    Every step (decode included) runs these few vector ops once per model; the
    Split into the 1-element starts and ends Slice takes happens in each layer's
    row-block branch, which only long prompts run.
    """

    def build(op: OpBuilder) -> tuple[RowBlockTier, ...]:
        largest_offset_1 = op.op("ReduceMax", info.offsets_B, keepdims=1)
        key_length_1 = op.to_vector(key_length)
        tiers = []
        for lowest, count in ROW_BLOCK_TIERS:
            minimum = max(lowest, count)
            use = op.op("GreaterOrEqual", info.query_length, op.int_scalar(minimum))
            rows = op.op("Div", op.op("Mul", info.query_length, op.ints(range(count + 1))), op.int_scalar(count))
            key_ends = op.op("Min", key_length_1, op.op("Add", largest_offset_1, rows))
            tiers.append(RowBlockTier(use, minimum, count, rows, key_ends))
        return tuple(tiers)

    return shared.get(("row_blocks", info, key_length), build)
