"""The KV cache update: where each row's new keys and values go (semantics doc §3-4).

Dimension legend: B batch, Nkv KV heads, S new rows, P past rows, H head size,
Lp = max(P, T) present rows, c_b the first new row of batch row b
(0 in a first prompt, t_b - S otherwise).

::

    base    = Pad(past, rows up to Lp)               [B, Nkv, Lp, H]
    present = ScatterND(base, (b, n, c_b + s), new)  new: [B, Nkv, S, H]

A plain Concat(past, new) is wrong for ragged batches and static buffers: the
new rows of row b go at c_b, never at P. Without a promise about the cache,
:func:`update_cache` picks one copy at run time: Concat when every row's new
rows go at P, ScatterND straight into past when T <= P (in place for a
runtime that binds present to past), Pad + ScatterND otherwise. Rows >= t_b keep whatever the base
held; no later step reads them (ONNX Runtime zeroes them, or keeps them when
present and past share one buffer).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from gqa_decompose.expansion.builder import OpBuilder
from gqa_decompose.expansion.sequence import SequenceInfo, SharedSubgraphs, dim_key

__all__ = [
    "CacheWrite",
    "append_aligned_rows",
    "concat_rows",
    "guard_aligned_rows",
    "longest_row",
    "present_length",
    "read_length",
    "scatter_indices",
    "update_cache",
    "write_into_buffer",
    "write_new_rows",
]


def present_length(
    shared: SharedSubgraphs, info: SequenceInfo, past: ir.Value, static_buffer: bool = False
) -> ir.Value:
    """Lp = max(P, T) as a 0-D int64: P for a static buffer, T = P + S for a growing one."""
    key = ("present_length", info, dim_key(past, 2), static_buffer)

    def build(op: OpBuilder) -> ir.Value:
        if static_buffer:
            return op.dim(past, 2)
        return op.op("Max", op.dim(past, 2), info.total_length)

    return shared.get(key, build)


def _growth_pads(
    shared: SharedSubgraphs, info: SequenceInfo, past: ir.Value, crop_past_in_first_prompt: bool = False
) -> ir.Value:
    """Pad's pads growing past's row axis to Lp: max(T - P, 0) rows at the end.

    With ``crop_past_in_first_prompt`` a first prompt with new rows pads -P rows at the start and Lp at the
    end instead: zeros of present's shape, as ORT copies no past row then (semantics §4; a static buffer's
    rows S .. t_b - 1 stay 0). Negative pads cost nothing on ORT and OpenVINO, but tract aborts on them and
    onnx.reference rejects them, so only the openvino profile asks for this.
    """

    def build(op: OpBuilder) -> ir.Value:
        # present_length before op.dim: the emitted names follow the order of the calls.
        total_rows = present_length(shared, info, past)
        past_length = op.dim(past, 2)
        rows_to_add = op.op("Max", op.op("Sub", total_rows, past_length), op.int_scalar(0))
        copies_no_past = _copies_no_past(shared, info) if crop_past_in_first_prompt else None
        if copies_no_past is None:
            return op.op("Concat", op.ints([0] * 6), op.to_vector(rows_to_add), op.ints([0]), axis=0)
        rows_dropped = op.op("Mul", past_length, op.cast(copies_no_past, ir.DataType.INT64))
        rows_at_start = op.to_vector(op.op("Neg", rows_dropped))
        rows_at_end = op.to_vector(op.op("Add", rows_to_add, rows_dropped))
        return op.op("Concat", op.ints([0, 0]), rows_at_start, op.ints([0] * 3), rows_at_end, op.ints([0]), axis=0)

    return shared.get(("growth_pads", info, dim_key(past, 2), crop_past_in_first_prompt), build)


def scatter_indices(shared: SharedSubgraphs, info: SequenceInfo, kv_num_heads: int) -> ir.Value:
    """ScatterND indices (b, n, c_b + s), int64 [B, Nkv, Skv, 3] (Skv = S, or 0 in a KV-shared layer)."""
    key = ("scatter_indices", info, kv_num_heads)

    def build(op: OpBuilder) -> ir.Value:
        index_shape = op.op(
            "Concat",
            info.batch_size_1,
            op.ints([kv_num_heads]),
            op.to_vector(info.new_length),
            op.ints([1]),
            axis=0,
        )
        batch_B111 = op.unsqueeze(
            op.op("Range", op.int_scalar(0), op.op("Squeeze", info.batch_size_1), op.int_scalar(1)),
            [1, 2, 3],
        )
        heads_1N11 = op.ints(list(range(kv_num_heads)))
        heads_1N11 = op.unsqueeze(heads_1N11, [0, 2, 3])
        rows_B1S1 = op.op(
            "Add",
            op.unsqueeze(info.offsets_B, [1, 2, 3]),
            op.unsqueeze(info.new_rows, [0, 1, 3]),
        )
        parts = [op.op("Expand", part, index_shape) for part in (batch_B111, heads_1N11, rows_B1S1)]
        return op.op("Concat", *parts, axis=3)

    return shared.get(key, build)


def _past_is_empty(shared: SharedSubgraphs, past: ir.Value) -> ir.Value | bool:
    """P == 0, read from past's shape only: a 0-D bool, or a Python bool when P is static."""
    shape = past.shape
    if shape is not None and isinstance(shape[2], int):
        return shape[2] == 0
    return shared.get(("past_is_empty", dim_key(past, 2)), lambda op: op.op("Equal", op.dim(past, 2), op.int_scalar(0)))


def unless_past_is_empty(
    op: OpBuilder,
    shared: SharedSubgraphs,
    past: ir.Value,
    when_empty: Callable[[OpBuilder], ir.Value],
    otherwise: Callable[[OpBuilder], ir.Value],
) -> ir.Value:
    """``otherwise(op)``, or ``when_empty(op)`` (which must not read ``past``) when past has 0 rows.

    The choice is an If on a condition read from past's shape only (none when P is
    static), which ONNX Runtime folds away once the session's dims are fixed.
    """
    empty = _past_is_empty(shared, past)
    if isinstance(empty, bool):
        return (when_empty if empty else otherwise)(op)
    (value,) = op.if_else(empty, lambda builder: [when_empty(builder)], lambda builder: [otherwise(builder)])
    return value


def _zero_rows(
    op: OpBuilder, shared: SharedSubgraphs, info: SequenceInfo, past: ir.Value, dtype: ir.DataType | None = None
) -> ir.Value:
    """[B, Nkv, Lp, H] zeros of past's type (or ``dtype``): Pad(past) of an empty past, built without reading past."""
    rows = present_length(shared, info, past)
    past_shape = op.op("Shape", past)
    shape = op.op("Concat", op.slice(past_shape, 0, 2, 0), op.to_vector(rows), op.slice(past_shape, 3, 4, 0), axis=0)
    return _zeros(op, shape, past, dtype)


def _zeros(op: OpBuilder, shape: ir.Value, like: ir.Value, dtype: ir.DataType | None = None) -> ir.Value:
    """Zeros of ``shape`` in ``like``'s type (or ``dtype``): zero codes for a quantized cache."""
    dtype = dtype or like.dtype
    if dtype is None:  # an untyped past (never from a typed model): the type read from past itself
        zero = op.op("CastLike", op.float_scalar(0.0), like)
    else:
        zero = op.op("Constant", value=ir.tensor(np.zeros((), dtype.numpy())))
    return op.op("Expand", zero, shape)


def concat_rows(
    op: OpBuilder, shared: SharedSubgraphs, past_BNPH: ir.Value, new_BNSH: ir.Value, skip_empty_past: bool = False
) -> ir.Value:
    """Concat(past, new) on the row axis; with ``skip_empty_past``, the new rows alone when P == 0."""
    if not skip_empty_past:
        return op.op("Concat", past_BNPH, new_BNSH, axis=2)
    return unless_past_is_empty(
        op,
        shared,
        past_BNPH,
        lambda builder: builder.op("Identity", new_BNSH),
        lambda builder: builder.op("Concat", past_BNPH, new_BNSH, axis=2),
    )


@dataclasses.dataclass(frozen=True)
class CacheWrite:
    """How a runtime profile spells the straight-line cache write (``Lowering.cache_write`` builds it).

    Attributes:
        skip_empty_past: webnn: no node reads an empty past (zeros of present's shape instead, inside an If
            ONNX Runtime folds; :func:`unless_past_is_empty`).
        widen_quantized: webnn, litert: int8/uint8 codes padded and written in int32, cast back after.
        crop_past_in_first_prompt: openvino: a first prompt's Pad keeps no past row (:func:`_growth_pads`).
    """

    skip_empty_past: bool = False
    widen_quantized: bool = False
    crop_past_in_first_prompt: bool = False


def write_new_rows(
    op: OpBuilder,
    shared: SharedSubgraphs,
    info: SequenceInfo,
    past_BNPH: ir.Value,
    new_BNSH: ir.Value,
    kv_num_heads: int,
    static_buffer: bool = False,
    tensor_scatter: bool = False,
    form: CacheWrite = CacheWrite(),
) -> ir.Value:
    """present [B, Nkv, Lp, H]: past padded to Lp rows with the new rows scattered at c_b.

    With ``static_buffer`` (T <= P promised) the new rows go straight into past: ScatterND's one copy
    is the only one. With ``tensor_scatter`` (opset >= 24) the write is TensorScatter(base, new,
    write_indices=c_b), which runtimes may do in place; exact because c_b + S <= t_b <= T <= Lp. With
    ``form`` (:class:`CacheWrite`) the runtime profile's spelling of the write."""
    widen = form.widen_quantized and past_BNPH.dtype in (ir.DataType.INT8, ir.DataType.UINT8)
    # Not for bfloat16: ORT's CPU ops run no bfloat16 Pad, so onnx.reference verifies that expansion, and it
    # rejects negative pads.
    crop = form.crop_past_in_first_prompt and past_BNPH.dtype != ir.DataType.BFLOAT16

    def written(builder: OpBuilder, base_BNLH: ir.Value) -> ir.Value:
        new = builder.cast(new_BNSH, ir.DataType.INT32) if widen else new_BNSH
        if tensor_scatter:
            present = builder.op("TensorScatter", base_BNLH, new, info.offsets_B, mode="linear")
        else:
            present = builder.op("ScatterND", base_BNLH, scatter_indices(shared, info, kv_num_heads), new)
        return builder.cast(present, past_BNPH.dtype) if widen else present

    def past(builder: OpBuilder) -> ir.Value:
        return builder.cast(past_BNPH, ir.DataType.INT32) if widen else past_BNPH

    if static_buffer:
        return written(op, past(op))

    def padded(builder: OpBuilder) -> ir.Value:
        padded_BNLH = builder.op("Pad", past(builder), _growth_pads(shared, info, past_BNPH, crop))
        return written(builder, builder.with_static_dims(padded_BNLH, past_BNPH, axis=2))

    if not form.skip_empty_past:
        return padded(op)

    def zeros(builder: OpBuilder) -> ir.Value:
        return written(builder, _zero_rows(builder, shared, info, past_BNPH, ir.DataType.INT32 if widen else None))

    # The write is inside each branch: ONNX Runtime infers the shape of a node's output once the If is
    # inlined, but not of a branch output it folds into a constant (the zeros), and WebNN needs the shape.
    return unless_past_is_empty(op, shared, past_BNPH, zeros, padded)


def _aligned_guard(shared: SharedSubgraphs, info: SequenceInfo, past: ir.Value) -> ir.Value:
    """bool: T == P + S and every row's new rows start at P (c_b == P for all b)."""

    def build(op: OpBuilder) -> ir.Value:
        past_length = op.dim(past, 2)
        grows = op.op("Equal", info.total_length, op.op("Add", past_length, info.query_length))
        rows_at_end = op.op("Equal", info.offsets_B, past_length)
        all_rows_at_end = op.op(
            "Equal",
            op.op("ReduceMin", op.cast(rows_at_end, ir.DataType.INT64), keepdims=0),
            op.int_scalar(1),
        )
        return op.op("And", grows, all_rows_at_end)

    return shared.get(("aligned_guard", info, dim_key(past, 2)), build)


def guard_aligned_rows(
    op: OpBuilder, shared: SharedSubgraphs, info: SequenceInfo, past_BNPH: ir.Value, new_BNSH: ir.Value
) -> ir.Value:
    """``new_BNSH`` unchanged while the growing-cache promise holds; a Reshape every runtime
    rejects otherwise, so a broken promise fails loudly instead of writing rows at P."""
    guard = _aligned_guard(shared, info, past_BNPH)
    target = op.op("Where", guard, op.op("Shape", new_BNSH), op.ints([-1, -1, -1, -1]))
    return op.op("Reshape", new_BNSH, target)


def append_aligned_rows(
    op: OpBuilder, shared: SharedSubgraphs, info: SequenceInfo, past_BNPH: ir.Value, new_BNSH: ir.Value
) -> ir.Value:
    """present = Concat(past, new) under the growing-cache promise: one copy of the cache.

    Exact only when every row's new rows go at P; otherwise the guard turns the
    new rows' Reshape target into [-1, -1, -1, -1], which every runtime rejects,
    so a broken promise fails loudly instead of writing rows at the wrong place.
    """
    return op.op("Concat", past_BNPH, guard_aligned_rows(op, shared, info, past_BNPH, new_BNSH), axis=2)


def write_into_buffer(
    op: OpBuilder,
    shared: SharedSubgraphs,
    info: SequenceInfo,
    past_BNPH: tuple[ir.Value, ir.Value],
    new_BNSH: tuple[ir.Value, ir.Value],
    kv_num_heads: int,
    tensor_scatter: bool = False,
) -> tuple[ir.Value, ir.Value]:
    """Present keys and values of a buffer holding T <= P rows, one copy chosen at run time (an If).

    A decode step scatters the new rows straight into past (in place for a runtime
    that binds present to past). A first prompt copies no past row, so ORT's present
    rows S .. t_b - 1 are 0 there (semantics doc §4): it scatters into zeros instead.
    """

    def scatter_into(bases: Callable[[OpBuilder], tuple[ir.Value, ir.Value]], scatter_op: bool):
        def build(builder: OpBuilder) -> list[ir.Value]:
            return [
                write_new_rows(builder, shared, info, base, new, kv_num_heads, True, scatter_op)
                for base, new in zip(bases(builder), new_BNSH, strict=True)
            ]

        return build

    def zeros(builder: OpBuilder) -> tuple[ir.Value, ir.Value]:
        return tuple(_zeros(builder, builder.op("Shape", past), past) for past in past_BNPH)

    into_zeros = scatter_into(zeros, False)
    copies_no_past = _copies_no_past(shared, info)
    if copies_no_past is None:
        return tuple(into_zeros(op))
    into_past = scatter_into(lambda builder: past_BNPH, tensor_scatter)
    present_key, present_value = op.if_else(copies_no_past, into_zeros, into_past)
    return present_key, present_value


def _copies_no_past(shared: SharedSubgraphs, info: SequenceInfo) -> ir.Value | None:
    """0-D bool: a first prompt with new rows (None when statically so).

    A KV-shared layer's first prompt (no new rows, §11) reads past: present is past then.
    """
    if info.new_length is info.query_length:
        return info.is_first_prompt

    def build(op: OpBuilder) -> ir.Value:
        has_new_rows = op.op("Greater", info.new_length, op.int_scalar(0))
        if info.is_first_prompt is None:
            return has_new_rows
        return op.op("And", info.is_first_prompt, has_new_rows)

    return shared.get(("copies_no_past", info), build)


def update_cache(
    op: OpBuilder,
    shared: SharedSubgraphs,
    info: SequenceInfo,
    past_BNPH: tuple[ir.Value, ir.Value],
    new_BNSH: tuple[ir.Value, ir.Value],
    kv_num_heads: int,
    fast_paths: bool = False,
    tensor_scatter: bool = False,
    form: CacheWrite = CacheWrite(),
) -> tuple[ir.Value, ir.Value]:
    """Present keys and values without a promise about the cache.

    Without ``fast_paths``: past padded to max(P, T) rows, then scattered (two
    copies, straight-line, spelled as ``form`` says).
    With it, one copy chosen at run time (one If per layer):

    * rows aligned at P (T = P + S, a growing cache): Concat(past, new);
    * T <= P (a max-length buffer): new rows scattered straight into past; a
      runtime that binds present to past makes it an in-place write. A first
      prompt scatters into zeros instead, as ORT copies no past row then;
    * otherwise (a ragged growing batch): past padded to T rows, then scattered.
    """
    if not fast_paths:
        return tuple(
            write_new_rows(op, shared, info, past, new, kv_num_heads, False, tensor_scatter, form)
            for past, new in zip(past_BNPH, new_BNSH)
        )
    return _update_cache_at_run_time(op, shared, info, past_BNPH, new_BNSH, kv_num_heads)


def _update_cache_at_run_time(
    op: OpBuilder,
    shared: SharedSubgraphs,
    info: SequenceInfo,
    past_BNPH: tuple[ir.Value, ir.Value],
    new_BNSH: tuple[ir.Value, ir.Value],
    kv_num_heads: int,
) -> tuple[ir.Value, ir.Value]:
    """update_cache's ``fast_paths`` form: Concat, a write into past, or Pad + ScatterND, chosen by two Ifs."""
    past_key, past_value = past_BNPH
    new_key, new_value = new_BNSH

    def fits_in_past(builder: OpBuilder) -> ir.Value:
        return builder.op("LessOrEqual", info.total_length, builder.dim(past_key, 2))

    fits = shared.get(("fits_in_past", info, dim_key(past_key, 2)), fits_in_past)

    def concat(builder: OpBuilder) -> list[ir.Value]:
        return [
            builder.op("Concat", past_key, new_key, axis=2),
            builder.op("Concat", past_value, new_value, axis=2),
        ]

    def pad_and_scatter(builder: OpBuilder) -> list[ir.Value]:
        return [
            write_new_rows(builder, shared, info, past, new, kv_num_heads)
            for past, new in ((past_key, new_key), (past_value, new_value))
        ]

    def into_past(builder: OpBuilder) -> list[ir.Value]:
        return list(write_into_buffer(builder, shared, info, past_BNPH, new_BNSH, kv_num_heads))

    def scatter_either(builder: OpBuilder) -> list[ir.Value]:
        return list(builder.if_else(fits, into_past, pad_and_scatter))

    present_key, present_value = op.if_else(_aligned_guard(shared, info, past_key), concat, scatter_either)
    return present_key, present_value


# Attention reads a copy of the first max_b t_b rows of a buffer holding more than this many
# times as many rows, and the whole buffer otherwise (the crossover measured on ORT CPU).
CUT_RATIO = 2


def longest_row(shared: SharedSubgraphs, info: SequenceInfo) -> ir.Value:
    """max_b t_b, 0-D int64: no query of this step sees a key row at or after it."""
    return shared.get(("longest_row", info), lambda op: op.op("ReduceMax", info.total_lengths_B, keepdims=0))


def read_length(
    shared: SharedSubgraphs, info: SequenceInfo, buffer_rows: ir.Value, key: tuple
) -> tuple[ir.Value, ir.Value, ir.Value]:
    """(cut, K, cut end): how many rows of a buffer of ``buffer_rows`` rows attention reads.

    A max-length buffer early in generation holds far more rows than any
    query sees; attending over all of them costs the whole buffer every step,
    while a Slice to the longest row costs a copy of that many rows. ``cut``
    (0-D bool) chooses the copy when it reads less than half the buffer; K
    (0-D) is the number of key columns read, ``cut end`` (1-D) the rows kept
    when cutting.
    """

    def build(op: OpBuilder):
        longest = longest_row(shared, info)
        cut = op.op("Greater", buffer_rows, op.op("Mul", longest, op.int_scalar(CUT_RATIO)))
        return cut, op.op("Where", cut, longest, buffer_rows), op.to_vector(longest)

    return shared.get(("read_length", info, key), build)
