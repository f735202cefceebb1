"""com.microsoft.EmbedLayerNormalization: BERT's embeddings (word + position + segment) and their layer norm.

Legend: B batch, S sequence, D hidden. ORT's CPU kernel (``embed_layer_norm.cc``; measured on ORT 1.31),
fp16 computed in fp32 with one rounding per output::

    sum[b, s]   = word_embedding[input_ids[b, s]] + position_embedding[pos[b, s]]
                  (+ segment_embedding[segment_ids[b, s]])
    pos         = position_ids [B, S] or [1, S] (broadcast), else s
    output      = layer_norm(sum, gamma, beta, epsilon)          (mean and E[x²] - mean², as ``_norm``)
    mask_index  = ReduceSum(mask, axis 1) [B] int32, the number of ones per row (zeros without a mask)
    embedding_sum = sum

``mask_index_type`` changes nothing on CPU (ORT 1.31 writes the sums either way). This is the transformers
optimizer's (``onnxruntime.transformers.optimizer``) fusion of a BERT's embeddings; its ``mask_index`` feeds
the contrib Attention nodes as their 1-D mask.

Before / after::

    input_ids, segment_ids, word/position/segment tables, gamma, beta, mask, position_ids
        ──EmbedLayerNormalization──> output, mask_index, embedding_sum

    Gather(word, ids) ─ Add(Gather(position, pos)) ─ Add(Gather(segment, segment_ids)) ─┬─ norm ──> output
                                                                                        └────────> embedding_sum
    mask ─ ReduceSum(axis 1, keepdims 0) ─ Cast(int32) ──> mask_index

Contract: input_ids (and segment_ids, mask, position_ids) int32 of rank 2 (position_ids may be [1, S]);
the tables float or float16 (one type), 2-D, with the same D as gamma and beta (1-D). Refused: a segment
table without segment_ids or the reverse, a node without the mask_index output (ORT's schema requires it).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from gqa_decompose.errors import GqaDecomposeError
from gqa_decompose.ops import register
from gqa_decompose.ops._common import DefaultOracle, attribute, input_at, outputs_read, to_type
from gqa_decompose.ops._norm import normalize
from gqa_decompose.ops.base import OpContext

__all__ = ["EmbedLayerNormalization", "EmbedLayerNormSpec"]

INPUT_IDS, SEGMENT_IDS, WORD, POSITION, SEGMENT, GAMMA, BETA, MASK, POSITION_IDS = range(9)
OUTPUT, MASK_INDEX, EMBEDDING_SUM = range(3)


@dataclasses.dataclass(frozen=True)
class EmbedLayerNormSpec:
    node_name: str
    epsilon: float
    dtype: ir.DataType
    has_segment: bool
    has_mask: bool
    has_position_ids: bool
    outputs_read: tuple[bool, ...]


def _require(node: ir.Node, value: ir.Value | None, what: str, dtype: ir.DataType, ranks: tuple[int, ...]) -> None:
    if value is None:
        raise GqaDecomposeError(f"{what} is required", node.name)
    if value.dtype != dtype:
        raise GqaDecomposeError(f"{what} has element type {value.dtype}; expected {dtype.name}", node.name)
    if value.shape is None or len(value.shape) not in ranks:
        raise GqaDecomposeError(f"{what} must have a known rank of {' or '.join(map(str, ranks))}", node.name)


def parse_embed_layer_norm(node: ir.Node) -> EmbedLayerNormSpec:
    if len(node.outputs) < 2:
        raise GqaDecomposeError("the mask_index output is required (ORT rejects a node without it)", node.name)
    _require(node, input_at(node, INPUT_IDS), "input_ids", ir.DataType.INT32, (2,))
    word = input_at(node, WORD)
    dtype = word.dtype if word is not None and word.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16) else None
    if dtype is None:
        raise GqaDecomposeError("word_embedding must be float or float16 (ORT's kernels)", node.name)
    for index, what in ((WORD, "word_embedding"), (POSITION, "position_embedding")):
        _require(node, input_at(node, index), what, dtype, (2,))
    for index, what in ((GAMMA, "gamma"), (BETA, "beta")):
        _require(node, input_at(node, index), what, dtype, (1,))
    segment_ids, segment = input_at(node, SEGMENT_IDS), input_at(node, SEGMENT)
    if (segment_ids is None) != (segment is None):
        raise GqaDecomposeError("segment_ids and segment_embedding must be given together", node.name)
    if segment is not None:
        _require(node, segment_ids, "segment_ids", ir.DataType.INT32, (2,))
        _require(node, segment, "segment_embedding", dtype, (2,))
    mask, positions = input_at(node, MASK), input_at(node, POSITION_IDS)
    if mask is not None:
        _require(node, mask, "mask", ir.DataType.INT32, (2,))
    if positions is not None:
        _require(node, positions, "position_ids", ir.DataType.INT32, (2,))
    hidden = {v.shape[-1] for v in (node.inputs[WORD], node.inputs[POSITION], node.inputs[GAMMA], node.inputs[BETA])}
    hidden |= {segment.shape[-1]} if segment is not None else set()
    if len({d for d in hidden if isinstance(d, int)}) > 1:
        raise GqaDecomposeError(f"the tables, gamma and beta disagree on the hidden size: {sorted(hidden)}", node.name)
    return EmbedLayerNormSpec(
        node.name or "",
        float(attribute(node, "epsilon", 1e-12)),
        dtype,
        segment is not None,
        mask is not None,
        positions is not None,
        outputs_read(node),
    )


def expand_embed_layer_norm(op, node: ir.Node, spec: EmbedLayerNormSpec) -> list[ir.Value | None]:
    ids_BS = node.inputs[INPUT_IDS]

    def rows(table: ir.Value, indices: ir.Value) -> ir.Value:
        gathered = op.op("Gather", table, indices, axis=0)
        gathered.dtype = spec.dtype
        return to_type(op, gathered, ir.DataType.FLOAT)

    if spec.has_position_ids:
        positions = node.inputs[POSITION_IDS]  # [B, S] or [1, S]: the gathered rows broadcast over B
    else:
        positions = op.unsqueeze(op.op("Range", op.int_scalar(0), op.dim(ids_BS, 1), op.int_scalar(1)), [0])
    total_BSD = op.op("Add", rows(node.inputs[WORD], ids_BS), rows(node.inputs[POSITION], positions))
    if spec.has_segment:
        total_BSD = op.op("Add", total_BSD, rows(node.inputs[SEGMENT], node.inputs[SEGMENT_IDS]))
    total_BSD.dtype = ir.DataType.FLOAT
    read = spec.outputs_read + (False,) * (3 - len(spec.outputs_read))
    values = normalize(
        op,
        total_BSD,
        node.inputs[GAMMA],
        node.inputs[BETA],
        axes=[-1],
        epsilon=spec.epsilon,
        simplified=False,
        want_mean=False,
        want_inv_std=False,
    )
    results: list[ir.Value | None] = [to_type(op, values.y, spec.dtype), None, None]
    if read[MASK_INDEX]:
        if spec.has_mask:
            sums_B = op.op("ReduceSum", node.inputs[MASK], op.ints([1]), keepdims=0)
        else:
            zero = ir.tensor(np.zeros(1, dtype=np.int32))
            sums_B = op.op("ConstantOfShape", op.to_vector(op.dim(ids_BS, 0)), value=zero)
        results[MASK_INDEX] = sums_B
    if read[EMBEDDING_SUM]:
        results[EMBEDDING_SUM] = to_type(op, total_BSD, spec.dtype)
    return results[: len(node.outputs)]


class EmbedLayerNormalization(DefaultOracle):
    domain = "com.microsoft"
    op_type = "EmbedLayerNormalization"

    def parse(self, node: ir.Node, context: OpContext) -> EmbedLayerNormSpec:
        return parse_embed_layer_norm(node)

    def expand(self, op, node: ir.Node, spec: EmbedLayerNormSpec) -> list[ir.Value | None]:
        return expand_embed_layer_norm(op, node, spec)

    def sample_feeds(self, node: ir.Node, spec: EmbedLayerNormSpec, rng: np.random.Generator):
        """Indices inside their tables (ORT rejects others), a 0/1 mask; symbolic dims as 2 rows of 3 tokens."""
        ids = node.inputs[INPUT_IDS]
        batch, length = (d if isinstance(d, int) else s for d, s in zip(ids.shape, (2, 3)))

        def rows(table: ir.Value) -> int:
            dim = table.shape[0]
            return dim if isinstance(dim, int) else 1

        feeds = {ids.name: rng.integers(0, rows(node.inputs[WORD]), (batch, length)).astype(np.int32)}
        if spec.has_segment:
            segment_rows = rows(node.inputs[SEGMENT])
            feeds[node.inputs[SEGMENT_IDS].name] = rng.integers(0, segment_rows, (batch, length)).astype(np.int32)
        if spec.has_mask:
            feeds[node.inputs[MASK].name] = rng.integers(0, 2, (batch, length)).astype(np.int32)
        if spec.has_position_ids:
            positions = node.inputs[POSITION_IDS]
            shape = (1 if positions.shape[0] == 1 else batch, length)
            feeds[positions.name] = rng.integers(0, rows(node.inputs[POSITION]), shape).astype(np.int32)
        return feeds


register(EmbedLayerNormalization())
