"""The head size H where the expansion needs it: a Python int, or read from the query at run time.

A node whose query hidden size is symbolic, with no other input of a static head dimension
(``spec.head_size`` is None), runs in ONNX Runtime, which reads H from the query. Its expansion
reads H the same way: ``Shape(query)[2] / (N + 2 Nkv)`` packed, ``/ N`` otherwise, a 1-element
int64 vector that takes the place of the int in every shape (:func:`shape_of`), width
(:func:`times`) and the default scale 1/sqrt(H) (:func:`default_scale`). Head counts stay static,
so every shape keeps its rank. With a static H every helper emits exactly what the int did.
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx_ir as ir

from gqa_decompose.expansion.builder import OpBuilder
from gqa_decompose.expansion.sequence import SharedSubgraphs

__all__ = ["HeadSize", "default_scale", "halved", "runtime_head_size", "scale_scalar", "shape_of", "times"]

# A static H, or H as a 1-element int64 vector computed at run time.
HeadSize = int | ir.Value


def runtime_head_size(shared: SharedSubgraphs, query: ir.Value, query_heads: int) -> ir.Value:
    """H as a 1-element int64 vector: the query's last dimension over its ``query_heads`` heads
    (N + 2 Nkv packed, N otherwise); built once per query."""

    def build(op: OpBuilder) -> ir.Value:
        hidden_1 = op.slice(op.op("Shape", query), 2, 3, axis=0)
        return op.op("Div", hidden_1, op.ints([query_heads]))

    return shared.get(("head_size", query, query_heads), build)


def shape_of(op: OpBuilder, dims: Sequence[int | ir.Value], like: ir.Value | None = None) -> ir.Value:
    """A 1-D int64 shape of ``dims``: one constant when every dim is an int (as ``op.ints``),
    else a Concat of constant runs and the run-time 1-element vectors.

    ``like``: the tensor to be reshaped, when it may have no elements (new keys of a KV-shared
    step). Its leading 0 ("copy") dims are then taken from its own shape: ORT's ReshapeFusion
    turns [0, 0, <run-time value>] into [0, 0, -1], which cannot be inferred for an empty tensor.
    """
    if all(isinstance(dim, int) for dim in dims):
        return op.ints(list(dims))
    pieces: list[ir.Value] = []
    run: list[int] = []
    copied = 0
    while like is not None and copied < len(dims) and isinstance(dims[copied], int) and dims[copied] == 0:
        copied += 1
    if copied:
        pieces.append(op.slice(op.op("Shape", like), 0, copied, axis=0))
    for dim in dims[copied:]:
        if isinstance(dim, int):
            run.append(dim)
            continue
        if run:
            pieces.append(op.ints(run))
            run = []
        pieces.append(dim)
    if run:
        pieces.append(op.ints(run))
    return op.op("Concat", *pieces, axis=0)


def times(op: OpBuilder, count: int, head_size: HeadSize) -> HeadSize:
    """``count * H``: an int for a static H, else a 1-element vector."""
    if isinstance(head_size, int):
        return count * head_size
    return op.op("Mul", head_size, op.ints([count]))


def halved(op: OpBuilder, head_size: HeadSize) -> HeadSize:
    """``H / 2`` (the width of a 4-bit cache row: two values a byte)."""
    if isinstance(head_size, int):
        return head_size // 2
    return op.op("Div", head_size, op.ints([2]))


def default_scale(shared: SharedSubgraphs, head_size_1: ir.Value, dtype: ir.DataType) -> ir.Value:
    """1/sqrt(H) of a run-time H as a 0-D ``dtype`` value, computed in fp32 as ORT does
    (``1.0f / sqrt(static_cast<float>(head_size))``) and then cast."""

    def build(op: OpBuilder) -> ir.Value:
        root = op.op("Sqrt", op.cast(op.op("Reshape", head_size_1, op.ints([])), ir.DataType.FLOAT))
        scale = op.op("Div", op.float_scalar(1.0), root)
        return scale if dtype == ir.DataType.FLOAT else op.cast(scale, dtype)

    return shared.get(("default_scale", head_size_1, dtype), build)


def scale_scalar(op: OpBuilder, scale: float | ir.Value, dtype: ir.DataType) -> ir.Value:
    """The scale as a 0-D ``dtype`` value: a constant, or the run-time one given."""
    return scale if isinstance(scale, ir.Value) else op.float_scalar(scale, dtype)
