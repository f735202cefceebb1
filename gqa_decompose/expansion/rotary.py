"""Rotary embedding of Q and the new K (semantics doc §9).

Dimension legend: B batch, S query length, n heads (N or Nkv), H head size,
R rotary dims (2 * cos_cache.shape[1]; R < H is partial rotary, dims >= R are
copied).

Positions, shared by every layer::

    first prompt (S == T):  pos[b, s] = base + s        base = position_ids[0, 0] or 0
    otherwise:              pos[b, s] = position_ids[b, s]  or  t_b - S + s

ONNX Runtime reads position_ids flat as ``data[b*S + s]`` (bug 2 of §19), which
equals position_ids[b, s] when its second dimension is S; we read it the same way.

Rotation, in fp32::

    half layout:        x1 = x[i],  x2 = x[i + R/2]
    interleaved layout: x1 = x[2i], x2 = x[2i + 1]
    x1' = x1*cos - x2*sin ;  x2' = x1*sin + x2*cos
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from gqa_decompose.expansion.builder import OpBuilder
from gqa_decompose.expansion.head_size import HeadSize, shape_of, times
from gqa_decompose.expansion.sequence import SequenceInfo, SharedSubgraphs

__all__ = [
    "RotaryOpInputs",
    "RotaryTables",
    "apply_rotary",
    "apply_rotary_op",
    "build_rotary_op_inputs",
    "build_rotary_tables",
    "new_rows_tables",
]


@dataclasses.dataclass(frozen=True)
class RotaryTables:
    """cos/sin gathered at each token's position in the compute type, [B or 1, S, 1, R/2]."""

    cos_BS1R: ir.Value
    sin_BS1R: ir.Value
    half_1: ir.Value  # R/2 as a 1-element int64 vector
    half: int | None  # R/2 when static


def _positions_BS(op: OpBuilder, info: SequenceInfo, position_ids: ir.Value | None) -> ir.Value:
    if position_ids is None and info.is_first_prompt is None:
        # A Reshape to a stated [1, S], not an Unsqueeze of the Range: onnx2tf 2.6.9 types the tables gathered at
        # Unsqueeze(Range) as [1, 1, R/2] and converts their Unsqueeze to a Reshape to [1, 1, 1, R/2] (no past,
        # S > 1: "XNNPack delegate failed to reshape runtime"; its reference kernels: "reshape.cc:94
        # num_input_elements != num_output_elements (40 != 8)"). A view on ORT.
        shape_1S = op.op("Concat", op.ints([1]), op.to_vector(info.query_length), axis=0)
        return op.op("Reshape", info.query_rows_S, shape_1S)
    rows_1S = op.unsqueeze(info.query_rows_S, [0])
    # [B, S] from the query's shape, not [-1, S]: ONNX's inference then knows both dims of the continuation's
    # positions, and IREE 3.13 fails to compile the rotation's Mul of [B, S, ..] by unknown dims ("expected sizes
    # to be non-negative, but got -1").
    shape_BS = op.op("Concat", info.batch_size_1, op.to_vector(info.query_length), axis=0)
    if position_ids is not None:
        flat_positions = op.op("Reshape", position_ids, op.ints([-1]))
        base = op.op("Gather", flat_positions, op.int_scalar(0), axis=0)
        first_prompt_1S = op.op("Add", rows_1S, base)
        row_count = op.op("Mul", info.batch_size_1, op.to_vector(info.query_length))
        continuation_BS = op.op("Reshape", op.slice(flat_positions, 0, row_count, axis=0), shape_BS)
    else:
        first_prompt_1S = rows_1S
        starts_B1 = op.unsqueeze(op.op("Sub", info.total_lengths_B, info.query_length), [1])
        continuation_BS = op.op("Add", starts_B1, rows_1S)
    if info.is_first_prompt is None:
        return first_prompt_1S
    # Both branches [B, S]: onnx2tf 2.6.9 converts this Where to TFLite's SELECT, which wants equal shapes
    # (batch 2: "select.cc:109 HaveSameShapes(input_x, input_y) was not true").
    return op.op("Where", info.is_first_prompt, op.op("Expand", first_prompt_1S, shape_BS), continuation_BS)


def build_rotary_tables(
    shared: SharedSubgraphs,
    info: SequenceInfo,
    cos_cache: ir.Value,
    sin_cache: ir.Value,
    position_ids: ir.Value | None,
    half: int | None,
    dtype: ir.DataType = ir.DataType.FLOAT,
) -> RotaryTables:
    key = ("rotary", info, cos_cache, sin_cache, position_ids, dtype)

    def build(op: OpBuilder) -> RotaryTables:
        positions_BS = _positions_BS(op, info, position_ids)

        def table(cache: ir.Value) -> ir.Value:
            gathered_BSR = op.op("Gather", cache, positions_BS, axis=0)
            if cache.dtype != dtype:
                gathered_BSR = op.cast(gathered_BSR, dtype)
            return op.unsqueeze(gathered_BSR, [2])

        if half is not None:
            half_1 = op.ints([half])
        else:
            half_1 = op.slice(op.op("Shape", cos_cache), 1, 2, axis=0)
        return RotaryTables(table(cos_cache), table(sin_cache), half_1, half)

    return shared.get(key, build)


def _rotation_tables(shared: SharedSubgraphs, tables: RotaryTables, interleaved: bool) -> tuple[ir.Value, ir.Value]:
    """(cos, sign·sin) laid out like the rotated dims, built once per model and layout.

    With ``swapped`` the pair-swapped dims (x2, x1), the rotation is
    ``x * cos + swapped * (-sin, sin)``: x1*cos + x2*(-sin) and x2*cos + x1*sin,
    bit for bit the x1*cos - x2*sin and x1*sin + x2*cos of the definition
    (negation is exact, and so is the order of a two-term sum).
    """

    def build(op: OpBuilder) -> tuple[ir.Value, ir.Value]:
        cos, sin = tables.cos_BS1R, tables.sin_BS1R
        minus_sin = op.op("Neg", sin)
        axis = 3
        if interleaved:
            cos, sin, minus_sin = (op.unsqueeze(table, [4]) for table in (cos, sin, minus_sin))
            axis = 4
        return op.op("Concat", cos, cos, axis=axis), op.op("Concat", minus_sin, sin, axis=axis)

    return shared.get(("rotation_tables", tables, interleaved), build)


def apply_rotary(
    op: OpBuilder,
    shared: SharedSubgraphs,
    x_BSnH: ir.Value,
    tables: RotaryTables,
    head_size: HeadSize,
    interleaved: bool,
    may_be_empty: bool = False,
) -> ir.Value:
    """Rotate the first R dims of every head of a [B, S, n, H] tensor (the tables' type).

    ``may_be_empty``: S may be 0 (new keys of a KV-shared step), where a Reshape's -1
    cannot be inferred, so the interleaved layout's pair axis is sized explicitly.
    When R or H is known only at run time, the rotation is partial: dims [R, H) are
    copied, a part of width 0 when R = H (Slice and Concat take it).
    """
    partial = tables.half is None or not isinstance(head_size, int) or 2 * tables.half != head_size
    rotary_dims_1 = op.op("Mul", tables.half_1, op.ints([2]))
    rotated_part = op.slice(x_BSnH, 0, rotary_dims_1, axis=3) if partial else x_BSnH
    cos, signed_sin = _rotation_tables(shared, tables, interleaved)

    def pair_shape(tail: list[ir.Value]) -> ir.Value:
        return op.op("Concat", op.ints([0, 0, 0]), *tail, axis=0)

    if interleaved:
        pairs = pair_shape([tables.half_1, op.ints([2])]) if may_be_empty else op.ints([0, 0, 0, -1, 2])
        rotated_part = op.op("Reshape", rotated_part, pairs)
        x1, x2 = op.op_multi("Split", rotated_part, op.ints([1, 1]), axis=4, num_outputs=2)
        swapped = op.op("Concat", x2, x1, axis=4)
    else:
        halves = shared.get(
            ("rotary_halves", tables), lambda builder: builder.op("Concat", tables.half_1, tables.half_1, axis=0)
        )
        x1, x2 = op.op_multi("Split", rotated_part, halves, axis=3, num_outputs=2)
        swapped = op.op("Concat", x2, x1, axis=3)
    rotated = op.op("Add", op.op("Mul", rotated_part, cos), op.op("Mul", swapped, signed_sin))
    if interleaved:
        rotated = op.op("Reshape", rotated, pair_shape([rotary_dims_1]) if may_be_empty else op.ints([0, 0, 0, -1]))
    if not partial:
        return rotated
    untouched = op.slice(x_BSnH, rotary_dims_1, head_size, axis=3)
    return op.op("Concat", rotated, untouched, axis=3)


@dataclasses.dataclass(frozen=True)
class RotaryOpInputs:
    """What RotaryEmbedding-23 needs besides X: tables in the compute type and positions [B, S]."""

    cos_cache: ir.Value
    sin_cache: ir.Value
    positions_BS: ir.Value
    half: int  # R/2, static: it becomes the rotary_embedding_dim attribute


def build_rotary_op_inputs(
    shared: SharedSubgraphs,
    info: SequenceInfo,
    cos_cache: ir.Value,
    sin_cache: ir.Value,
    position_ids: ir.Value | None,
    half: int,
    dtype: ir.DataType = ir.DataType.FLOAT,
) -> RotaryOpInputs:
    """Shared by every layer: the tables cast once, the positions of :func:`_positions_BS`."""
    key = ("rotary_op", info, cos_cache, sin_cache, position_ids, dtype)

    def build(op: OpBuilder) -> RotaryOpInputs:
        positions = _positions_BS(op, info, position_ids)
        # A first prompt's positions are [1, S]; the op wants [B, S].
        shape = op.op("Concat", info.batch_size_1, op.to_vector(info.query_length), axis=0)
        positions_BS = op.op("Expand", positions, shape)

        def table(cache: ir.Value) -> ir.Value:
            return cache if cache.dtype == dtype else op.cast(cache, dtype)

        return RotaryOpInputs(table(cos_cache), table(sin_cache), positions_BS, half)

    return shared.get(key, build)


def apply_rotary_op(
    op: OpBuilder,
    x_BSnH: ir.Value,
    inputs: RotaryOpInputs,
    heads: int,
    head_size: HeadSize,
    interleaved: bool,
) -> ir.Value:
    """RotaryEmbedding-23 on a [B, S, n, H] tensor of the tables' type (3-D form, num_heads = n).

    A run-time H always gets rotary_embedding_dim (R, which may equal H), and reshapes that work
    without rows (the new keys of a KV-shared step)."""
    x_BSD = op.op("Reshape", x_BSnH, shape_of(op, [0, 0, times(op, heads, head_size)], like=x_BSnH))
    attributes = {"num_heads": heads, "interleaved": int(interleaved)}
    if not isinstance(head_size, int) or 2 * inputs.half != head_size:
        attributes["rotary_embedding_dim"] = 2 * inputs.half
    rotated_BSD = op.op("RotaryEmbedding", x_BSD, inputs.cos_cache, inputs.sin_cache, inputs.positions_BS, **attributes)
    return op.op("Reshape", rotated_BSD, shape_of(op, [0, 0, heads, head_size], like=rotated_BSD))


def new_rows_tables(
    shared: SharedSubgraphs, info: SequenceInfo, tables: RotaryTables | RotaryOpInputs
) -> RotaryTables | RotaryOpInputs:
    """The tables of the first Skv query positions, for the new K rows of a node whose key
    length is decided at run time (Skv = S, or 0 in a KV-shared layer, where nothing rotates)."""
    if info.new_length is info.query_length:
        return tables

    def build(op: OpBuilder) -> RotaryTables | RotaryOpInputs:
        rows_1 = op.to_vector(info.new_length)
        if isinstance(tables, RotaryOpInputs):
            return dataclasses.replace(tables, positions_BS=op.slice(tables.positions_BS, 0, rows_1, axis=1))
        return dataclasses.replace(
            tables,
            cos_BS1R=op.slice(tables.cos_BS1R, 0, rows_1, axis=1),
            sin_BS1R=op.slice(tables.sin_BS1R, 0, rows_1, axis=1),
        )

    return shared.get(("new_rows_tables", info, tables), build)
