"""The windowed KV cache of ``sliding_window_cache=1`` (semantics doc §12).

Dimension legend: B batch, Nkv KV heads, C cache capacity (past rows), S new
rows, W window, H head size. P_b = t_b - S tokens came before this step
(0 in a first prompt). The cache keeps only the latest tokens, dropping the
oldest G' = C - W + 1 at a time once it is full::

    L(x) = x                              if x <= C
         = x - G' * ceil((x - C) / G')    otherwise
    past rows    [0, L(P_b)) hold positions P_b - L(P_b) .. P_b - 1
    present rows [0, L(t_b)) hold positions t_b - L(t_b) .. t_b - 1   (rows >= L(t_b) unspecified)

Attention is ordinary causal attention with window W over absolute positions;
L(P_b) >= W - 1 whenever tokens were dropped, so every visible key is kept.
So the keys are the columns of Concat(past, new), each with its absolute
position (the shared mask does the rest), and present is a gather of the
columns that hold the last L(t_b) positions.
"""

from __future__ import annotations

import onnx_ir as ir

from gqa_decompose.expansion.builder import OpBuilder
from gqa_decompose.expansion.mask import concat_key_positions
from gqa_decompose.expansion.sequence import SequenceInfo, SharedSubgraphs, dim_key

__all__ = ["present_columns", "sliding_key_positions"]


def _kept(op: OpBuilder, lengths_B: ir.Value, capacity: ir.Value, gap: ir.Value, int32_div: bool) -> ir.Value:
    """L(x) for each x in ``lengths_B``: how many of the latest x tokens the cache holds."""
    overflow = op.op("Sub", lengths_B, capacity)
    # ceil(a / g) for a > 0; Div of int64 truncates. The other branch is discarded.
    dividend = op.op("Add", overflow, op.op("Sub", gap, op.int_scalar(1)))
    if int32_div:  # the WebNN EP has no int64 Div; exact, GQA's lengths are int32
        quotient = op.op("Div", op.cast(dividend, ir.DataType.INT32), op.cast(gap, ir.DataType.INT32))
        drops = op.cast(quotient, ir.DataType.INT64)
    else:
        drops = op.op("Div", dividend, gap)
    return op.op(
        "Where",
        op.op("LessOrEqual", lengths_B, capacity),
        lengths_B,
        op.op("Sub", lengths_B, op.op("Mul", gap, drops)),
    )


def _layout(shared: SharedSubgraphs, info: SequenceInfo, past: ir.Value, window: int, int32_div: bool = False):
    """(C, first position held in past, L(P_b), L(t_b)) shared per capacity and window."""

    def build(op: OpBuilder):
        capacity = op.dim(past, 2)
        gap = op.op("Add", op.op("Sub", capacity, op.int_scalar(window)), op.int_scalar(1))
        past_kept_B = _kept(op, info.offsets_B, capacity, gap, int32_div)
        present_kept_B = _kept(op, info.total_lengths_B, capacity, gap, int32_div)
        return capacity, past_kept_B, present_kept_B

    return shared.get(("sliding_layout", info, dim_key(past, 2), window, int32_div), build)


def sliding_key_positions(
    shared: SharedSubgraphs, info: SequenceInfo, past: ir.Value, window: int, int32_div: bool = False
) -> ir.Value:
    """Absolute positions of the columns of Concat(past, new), int64 [B, 1, 1, C + S]
    (``int32_div``: the webnn profile's integer division, see :func:`_kept`)."""
    _, past_kept_B, _ = _layout(shared, info, past, window, int32_div)
    return concat_key_positions(shared, info, past, past_kept_B)


def present_columns(
    shared: SharedSubgraphs,
    info: SequenceInfo,
    past: ir.Value,
    window: int,
    kv_num_heads: int,
    int32_div: bool = False,
    full_indices: bool = False,
) -> ir.Value:
    """GatherND indices [B, Nkv, C, 1] (batch_dims=2): which column of Concat(past, new) each present row copies.

    With ``full_indices`` the indices (b, n, column) [B, Nkv, C, 3] for batch_dims=0 instead (the webnn
    profile: the WebNN EP takes no GatherND with batch_dims)."""
    capacity, past_kept_B, present_kept_B = _layout(shared, info, past, window, int32_div)

    def build(op: OpBuilder) -> ir.Value:
        rows_1C = op.unsqueeze(op.op("Range", op.int_scalar(0), capacity, op.int_scalar(1)), [0])
        offsets_B1 = op.unsqueeze(info.offsets_B, [1])
        present_kept_B1 = op.unsqueeze(present_kept_B, [1])
        positions_BC = op.op("Add", op.op("Sub", op.unsqueeze(info.total_lengths_B, [1]), present_kept_B1), rows_1C)
        first_held_B1 = op.op("Sub", offsets_B1, op.unsqueeze(past_kept_B, [1]))
        from_past = op.op("Sub", positions_BC, first_held_B1)
        from_new = op.op("Add", capacity, op.op("Sub", positions_BC, offsets_B1))
        columns_BC = op.op("Where", op.op("Less", positions_BC, offsets_B1), from_past, from_new)
        # Rows past L(t_b) are unspecified; any valid column will do. Column 0 as a [B, C] tensor, not a
        # scalar: onnx2tf 2.6.9 makes a Where whose condition has its first branch's shape TFLite's SELECT,
        # which broadcasts neither branch ("select.cc:104 data->has_low_rank_input_condition was not true").
        zeros_BC = op.op("Mul", columns_BC, op.int_scalar(0))
        columns_BC = op.op("Where", op.op("Less", rows_1C, present_kept_B1), columns_BC, zeros_BC)
        columns_B1C1 = op.unsqueeze(columns_BC, [1, 3])
        shape = op.op(
            "Concat",
            info.batch_size_1,
            op.ints([kv_num_heads]),
            op.to_vector(capacity),
            op.ints([1]),
            axis=0,
        )
        if not full_indices:
            return op.op("Expand", columns_B1C1, shape)
        batch_B111 = op.unsqueeze(
            op.op("Range", op.int_scalar(0), op.op("Squeeze", info.batch_size_1), op.int_scalar(1)), [1, 2, 3]
        )
        heads_1N11 = op.unsqueeze(op.ints(list(range(kv_num_heads))), [0, 2, 3])
        parts = [op.op("Expand", part, shape) for part in (batch_B111, heads_1N11, columns_B1C1)]
        return op.op("Concat", *parts, axis=3)

    key = ("sliding_present_columns", info, dim_key(past, 2), window, kv_num_heads, int32_div, full_indices)
    return shared.get(key, build)
