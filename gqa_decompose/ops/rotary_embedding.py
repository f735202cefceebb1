"""com.microsoft.RotaryEmbedding: rotary position embedding of one tensor (ORT's contrib form).

Legend: B batch, S sequence, N heads, H head size, R rotated dims (``rotary_embedding_dim``, or
H = 2 * cos_cache.shape[1] when 0), M cache rows. Input [B, S, N*H] (3-D) or [B, N, S, H] (4-D);
position_ids [1] (pos[b, s] = position_ids[0] + s) or [B, S]; caches [M, R/2]. ORT's CPU kernel
(``rotary_embedding.cc``), fp16 in fp32 with one rounding, dims >= R copied::

    half layout:        x1 = x[i],  x2 = x[i + R/2]        interleaved: x1 = x[2i], x2 = x[2i+1]
    x1' = x1*cos[pos] - x2*sin[pos] ;  x2' = x1*sin[pos] + x2*cos[pos]

``scale`` only matters to a kernel that rebuilds the caches (ORT's CPU one does not): ignored.

Before / after::

    input, position_ids, cos_cache, sin_cache ──RotaryEmbedding(contrib)──> output

    opset >= 23:  input ─Cast─ RotaryEmbedding-23(num_heads, rotary_embedding_dim, interleaved) ─Cast─> output
                  position_ids [1] ─ Add(Range(S)) ─ Expand [B, S] ──┘
    below:        Gather(cos/sin, pos) ─ Unsqueeze(head axis) ─┐
                  input ─Cast─ [Reshape B,S,N,H] ─ Split ─ swap ─ x*cos + swapped*(-sin, sin) ─ [Reshape] ─Cast─> output

Contract: input rank 3 or 4 with a static last dim, caches [M, R/2] with static R/2, position_ids of
rank 0-2 (known), R <= H and even, num_heads > 0 with rotary_embedding_dim (ORT enforces it),
is_packed_batching 0.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from gqa_decompose.errors import GqaDecomposeError
from gqa_decompose.expansion.rotary import RotaryTables, apply_rotary
from gqa_decompose.expansion.sequence import SharedSubgraphs
from gqa_decompose.ops import register
from gqa_decompose.ops._common import (
    DefaultOracle,
    attribute,
    compute_type,
    input_at,
    require_float,
    to_type,
)
from gqa_decompose.ops.base import OpContext

__all__ = ["RotaryEmbedding", "RotarySpec"]

ROTARY_EMBEDDING_OPSET = 23
INPUT, POSITION_IDS, COS_CACHE, SIN_CACHE = range(4)
SYMBOLIC_SIZE = 3  # what verify_ops gives a symbolic dimension
SYMBOLIC_CACHE_ROWS = 8  # rows of the tables fed for caches whose row count is symbolic


@dataclasses.dataclass(frozen=True)
class RotarySpec:
    node_name: str
    dtype: ir.DataType
    four_d: bool  # [B, N, S, H] rather than [B, S, N*H]
    heads: int
    head_size: int
    rotary_dims: int
    interleaved: bool
    positions_per_token: bool  # position_ids [B, S] rather than one start
    opset: int


def _static(node: ir.Node, value: ir.Value, axis: int, what: str) -> int:
    dim = None if value.shape is None else value.shape[axis]
    if not isinstance(dim, int):
        raise GqaDecomposeError(f"{what} must be static", node.name)
    return dim


def parse_rotary(node: ir.Node, context: OpContext) -> RotarySpec:
    x, positions, cos = input_at(node, INPUT), input_at(node, POSITION_IDS), input_at(node, COS_CACHE)
    if x is None or positions is None or cos is None or input_at(node, SIN_CACHE) is None:
        raise GqaDecomposeError("input, position_ids, cos_cache and sin_cache are required", node.name)
    dtype = require_float(node, x, "input")
    if attribute(node, "is_packed_batching", 0):
        raise GqaDecomposeError("is_packed_batching=1 is not supported", node.name)
    if x.shape is None or len(x.shape) not in (3, 4):
        raise GqaDecomposeError("input must have a known rank of 3 or 4", node.name)
    if positions.shape is None:
        raise GqaDecomposeError("position_ids must have a known rank", node.name)
    four_d = len(x.shape) == 4
    half = _static(node, cos, 1, "cos_cache's second dimension")
    heads = int(attribute(node, "num_heads", 0))
    rotary_dims = int(attribute(node, "rotary_embedding_dim", 0))
    if rotary_dims > 0 and heads <= 0:
        raise GqaDecomposeError("num_heads must be provided with rotary_embedding_dim", node.name)
    if four_d:
        heads_in, head_size = _static(node, x, 1, "input's head axis"), _static(node, x, 3, "input's head size")
        hidden = heads_in * head_size
    else:
        hidden = _static(node, x, 2, "input's hidden size")
    if rotary_dims == 0:
        head_size = 2 * half
    else:
        head_size = hidden // heads
    heads = heads or hidden // head_size
    rotary_dims = rotary_dims or head_size
    if heads * head_size != hidden or (four_d and head_size != x.shape[3]):
        raise GqaDecomposeError(f"hidden size {hidden} is not num_heads {heads} x head size {head_size}", node.name)
    if rotary_dims > head_size or rotary_dims % 2 or rotary_dims != 2 * half:
        raise GqaDecomposeError(
            f"rotary dims {rotary_dims} must be even, <= head size {head_size} and 2 x cos_cache's {half}", node.name
        )
    per_token = len(positions.shape) == 2
    return RotarySpec(
        node.name or "",
        dtype,
        four_d,
        heads,
        head_size,
        rotary_dims,
        bool(attribute(node, "interleaved", 0)),
        per_token,
        context.opset,
    )


def _positions_BS(op, node: ir.Node, spec: RotarySpec, x: ir.Value) -> ir.Value:
    """[B, S] positions, or [1, S] for one start (broadcast)."""
    positions = node.inputs[POSITION_IDS]
    if spec.positions_per_token:
        return positions
    length = op.dim(x, 2 if spec.four_d else 1)
    rows_S = op.op("Range", op.int_scalar(0), length, op.int_scalar(1))
    start = op.op("Reshape", positions, op.ints([]))
    return op.unsqueeze(op.op("Add", rows_S, start), [0])


def expand_rotary(op, node: ir.Node, spec: RotarySpec) -> list[ir.Value]:
    ctype = compute_type(spec.dtype)
    x = node.inputs[INPUT]
    positions_BS = _positions_BS(op, node, spec, x)
    if spec.opset >= ROTARY_EMBEDDING_OPSET:
        rotated = _standard_op(op, node, spec, positions_BS, ctype)
    else:
        rotated = _primitives(op, node, spec, positions_BS, ctype)
    return [to_type(op, rotated, spec.dtype)]


def _standard_op(op, node: ir.Node, spec: RotarySpec, positions_BS: ir.Value, ctype: ir.DataType) -> ir.Value:
    x = node.inputs[INPUT]
    if not spec.positions_per_token:
        batch_1 = op.to_vector(op.dim(x, 0))
        positions_BS = op.op("Expand", positions_BS, op.op("Concat", batch_1, op.ints([1]), axis=0))
    attributes = {"interleaved": int(spec.interleaved)}
    if not spec.four_d:
        attributes["num_heads"] = spec.heads
    if spec.rotary_dims != spec.head_size:
        attributes["rotary_embedding_dim"] = spec.rotary_dims
    rotated = op.op(
        "RotaryEmbedding",
        to_type(op, x, ctype),
        to_type(op, node.inputs[COS_CACHE], ctype),
        to_type(op, node.inputs[SIN_CACHE], ctype),
        positions_BS,
        **attributes,
    )
    rotated.dtype = ctype
    return rotated


def _primitives(op, node: ir.Node, spec: RotarySpec, positions_BS: ir.Value, ctype: ir.DataType) -> ir.Value:
    x = to_type(op, node.inputs[INPUT], ctype)
    # The tables broadcast over the head axis: [B, S, 1, R/2] against [B, S, N, H], [B, 1, S, R/2] against 4-D.
    head_axis = 1 if spec.four_d else 2

    def table(cache: ir.Value) -> ir.Value:
        gathered_BSR = to_type(op, op.op("Gather", cache, positions_BS, axis=0), ctype)
        return op.unsqueeze(gathered_BSR, [head_axis])

    half = spec.rotary_dims // 2
    tables = RotaryTables(table(node.inputs[COS_CACHE]), table(node.inputs[SIN_CACHE]), op.ints([half]), half)
    shared = SharedSubgraphs()
    shared.builder = op  # one node's tables: built in its own scope
    x_BSnH = x if spec.four_d else op.op("Reshape", x, op.ints([0, 0, spec.heads, spec.head_size]))
    rotated = apply_rotary(op, shared, x_BSnH, tables, spec.head_size, spec.interleaved)
    if not spec.four_d:
        rotated = op.op("Reshape", rotated, op.ints([0, 0, spec.heads * spec.head_size]))
    rotated.dtype = ctype
    return rotated


class RotaryEmbedding(DefaultOracle):
    domain = "com.microsoft"
    op_type = "RotaryEmbedding"

    def parse(self, node: ir.Node, context: OpContext) -> RotarySpec:
        return parse_rotary(node, context)

    def expand(self, op, node: ir.Node, spec: RotarySpec) -> list[ir.Value]:
        return expand_rotary(op, node, spec)

    def sample_feeds(self, node: ir.Node, spec: RotarySpec, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Positions inside the caches (a random one may index past them, which ORT does not check). Caches
        computed in the graph with a row count known only at run time (torch dynamo's Cos/Sin of a Range up
        to max(position_ids)) are fed as random tables of ``SYMBOLIC_CACHE_ROWS`` rows."""
        x, positions, cos = node.inputs[INPUT], node.inputs[POSITION_IDS], node.inputs[COS_CACHE]
        feeds = {}
        if cos.const_value is not None:
            rows = cos.const_value.shape[0]
        elif cos.shape is not None and isinstance(cos.shape[0], int):
            rows = cos.shape[0]
        else:
            rows = SYMBOLIC_CACHE_ROWS
            dtype = cos.dtype.numpy() if cos.dtype is not None else np.float32
            for index in (COS_CACHE, SIN_CACHE):
                feeds[node.inputs[index].name] = rng.uniform(-1, 1, (rows, spec.rotary_dims // 2)).astype(dtype)
        length = x.shape[2 if spec.four_d else 1]
        length = length if isinstance(length, int) else SYMBOLIC_SIZE
        if not spec.positions_per_token:
            start = rng.integers(0, max(rows - length, 0) + 1)
            feeds[positions.name] = np.full([d if isinstance(d, int) else 1 for d in positions.shape], start)
            return feeds
        batch = positions.shape[0] if isinstance(positions.shape[0], int) else SYMBOLIC_SIZE
        feeds[positions.name] = rng.integers(0, rows, (batch, length)).astype(np.int64)
        return feeds


register(RotaryEmbedding())
