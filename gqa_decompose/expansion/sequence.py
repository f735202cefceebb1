"""Per-row lengths, phase and offsets: the subgraph every layer of a model shares.

Dimension legend: B batch, S query length, T total sequence length (the
``total_sequence_length`` input), t_b = seqlens_k[b] + 1 (valid keys of row b
after this step).

ONNX Runtime decides the phase from S and T alone (semantics doc §3)::

    first prompt  <=>  S == T     (new K/V land at rows 0..S-1, past ignored)
    otherwise                     (new K/V land at rows t_b-S .. t_b-1)

so the phase is a run-time Where on ``S == T`` unless the node has no past,
where it is always a first prompt. The causal offset c_b equals the row where
the new keys are written: 0 in a first prompt, t_b - S otherwise.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from gqa_decompose.expansion.builder import OpBuilder

__all__ = ["SequenceInfo", "SharedSubgraphs", "build_sequence_info", "dim_key"]


class SharedSubgraphs:
    """Values built once per graph and reused by every GQA node that reads the same inputs."""

    def __init__(self, prefix: str = "gqa_shared") -> None:
        self.builder = OpBuilder(prefix)
        self._cache: dict[tuple, object] = {}

    def get(self, key: tuple, build):
        if key not in self._cache:
            self._cache[key] = build(self.builder)
        return self._cache[key]

    def take_nodes(self) -> list[ir.Node]:
        return self.builder.take_nodes()


def dim_key(value: ir.Value, axis: int) -> tuple:
    """A hashable identity for dimension ``axis`` of ``value``.

    Two values whose dimension is the same integer, or the same named symbol,
    share it; an anonymous dimension is only its own.
    """
    shape = value.shape
    if shape is not None:
        dim = shape[axis]
        if isinstance(dim, int):
            return ("static", dim)
        if dim.value is not None:
            return ("symbol", dim.value)
    return ("value", id(value), axis)


@dataclasses.dataclass(frozen=True)
class SequenceInfo:
    """Run-time sizes and per-row offsets (all int64).

    Attributes:
        total_lengths_B: t_b = seqlens_k + 1, shape [B].
        batch_size_1: B as a 1-element vector.
        query_length: S, 0-D.
        total_length: T, 0-D.
        is_first_prompt: 0-D bool, S == T; None when statically a first prompt.
        offsets_B: c_b, where row b's new keys start, shape [B].
        query_rows_S: Range(S), shape [S].
        new_length: Skv, the number of new key/value rows, 0-D: S itself, or
            Shape(key)[1] for a node whose key length is only known at run time
            (0 in a KV-shared layer, else S; semantics §11).
        new_rows: Range(Skv), shape [Skv].
    """

    total_lengths_B: ir.Value
    batch_size_1: ir.Value
    query_length: ir.Value
    total_length: ir.Value
    is_first_prompt: ir.Value | None
    offsets_B: ir.Value
    query_rows_S: ir.Value
    new_length: ir.Value
    new_rows: ir.Value


def build_sequence_info(
    shared: SharedSubgraphs,
    seqlens_k: ir.Value,
    total_sequence_length: ir.Value,
    query: ir.Value,
    always_first_prompt: bool,
    key: ir.Value | None = None,
) -> SequenceInfo:
    """The sizes of one node's step; ``key`` only when its length may be 0 or S (run time)."""
    key_length = None if key is None else dim_key(key, 1)
    cache_key = ("sequence", seqlens_k, total_sequence_length, dim_key(query, 1), always_first_prompt, key_length)

    def build(op: OpBuilder) -> SequenceInfo:
        seqlens_B = op.cast(op.op("Reshape", seqlens_k, op.ints([-1])), ir.DataType.INT64)
        total_lengths_B = op.op("Add", seqlens_B, op.int_scalar(1))
        batch_size_1 = op.op("Shape", total_lengths_B)
        if seqlens_k.shape is not None and all(isinstance(dim, int) for dim in seqlens_k.shape):
            batch_size_1 = op.ints([int(np.prod(list(seqlens_k.shape), dtype=np.int64))])  # B, for shape inference
        query_length = op.dim(query, 1)
        total_length = op.cast(op.op("Reshape", total_sequence_length, op.ints([])), ir.DataType.INT64)
        query_rows_S = op.op("Range", op.int_scalar(0), query_length, op.int_scalar(1))
        continuation_offsets_B = op.op("Sub", total_lengths_B, query_length)
        if always_first_prompt:
            is_first_prompt = None
            offsets_B = op.op("Mul", continuation_offsets_B, op.int_scalar(0))
        else:
            is_first_prompt = op.op("Equal", query_length, total_length)
            # 0 as a [B] vector, not a scalar: onnx2tf 2.6.9 converts the Where to TFLite's SELECT, which wants
            # equal shapes (batch 2: "select.cc:109 HaveSameShapes(input_x, input_y) was not true").
            zeros_B = op.op("Mul", continuation_offsets_B, op.int_scalar(0))
            offsets_B = op.op("Where", is_first_prompt, zeros_B, continuation_offsets_B)
        new_length, new_rows = query_length, query_rows_S
        if key is not None:
            new_length = op.dim(key, 1)
            new_rows = op.op("Range", op.int_scalar(0), new_length, op.int_scalar(1))
        return SequenceInfo(
            total_lengths_B=total_lengths_B,
            batch_size_1=batch_size_1,
            query_length=query_length,
            total_length=total_length,
            is_first_prompt=is_first_prompt,
            offsets_B=offsets_B,
            query_rows_S=query_rows_S,
            new_length=new_length,
            new_rows=new_rows,
        )

    return shared.get(cache_key, build)
