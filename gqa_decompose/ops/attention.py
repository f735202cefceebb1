"""com.microsoft.Attention (packed QKV weights, combined past/present) -> MatMul + the MultiHeadAttention core.

Dimension legend: B batch, S query length, Din input hidden, N heads, H head size of Q/K, Hv of V,
D = N*H, P past length, T = P + S.

ORT CPU's semantics (checked against ORT 1.31): ``qkv = input @ weights + bias`` with weights
[Din, D + D + N*Hv] (``qkv_hidden_sizes``, default all D), split into Q, K, V; past [2, B, N, P, H]
(keys then values) concatenated before the new ones and returned as present [2, B, N, T, H]; then
scores, masks and softmax exactly as MultiHeadAttention (:func:`multi_head_attention.attend`): scale
default 1/sqrt(H), ``mask_filter_value`` (default -10000) where a 2-D [B, T] or 3-D [B, S, T]
``mask_index`` is 0, on key columns t >= mask_index[b] for a 1-D [B] one (end positions: what the
transformers optimizer's EmbedLayerNormalization writes, the count of ones of each row's mask), also on
t < mask_index[B + b] for a 1-D [2B] one (end, then start positions; where the shapes leave B and 2B apart
unknown, a symbolic batch, ORT tells the two by the length at run time and so does the expansion: the mask is
read as ``Concat(mask_index, zeros(B))[:2B]``, start positions of 0 for a [B] one), and, with
``unidirectional=1``, on future columns; ``attention_bias`` added::

    input -> MatMul(weights) + bias -> Slice Q | K | V -> attend(past = present[0], present[1]) -> output
                                                              -> Concat(Unsqueeze(K), Unsqueeze(V)) -> present

Refused: no ``bias`` (ORT 1.31 CPU segfaults on it: no oracle, and verification would crash),
``do_rotary=1`` and ``past_present_share_buffer=1`` / ``past_sequence_length`` (the in-place
buffer form), past together with attention_bias (ORT rejects it), a 1-D ``mask_index`` whose static length
is neither the static batch nor twice it (ORT rejects it), a 4-D one (Megatron masks), Q and K hidden sizes
that differ (ORT refuses them too).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from gqa_decompose.errors import GqaDecomposeError
from gqa_decompose.expansion.builder import OpBuilder
from gqa_decompose.ops import register
from gqa_decompose.ops._common import input_at, int_attribute
from gqa_decompose.ops.base import OpContext, Tolerance
from gqa_decompose.ops.multi_head_attention import MultiHeadAttentionSpec, attend, needs_lengths, score_attributes

__all__ = ["Attention"]

INPUT, WEIGHTS, BIAS, MASK_INDEX, PAST, ATTENTION_BIAS, PAST_SEQUENCE_LENGTH = range(7)


class Attention:
    """The decomposer of com.microsoft.Attention (the BERT/GPT-2 packed form)."""

    domain = "com.microsoft"
    op_type = "Attention"

    def parse(self, node: ir.Node, context: OpContext) -> MultiHeadAttentionSpec:
        x, weights = node.inputs[INPUT], node.inputs[WEIGHTS]
        if x is None or x.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
            raise GqaDecomposeError("Attention takes float or float16", node.name)
        if weights is None or weights.shape is None or weights.shape.rank() != 2 or not weights.shape.is_static():
            raise GqaDecomposeError("Attention needs weights [Din, D + D + Dv] with a static shape", node.name)
        heads = int_attribute(node, "num_heads", 0)
        sizes = _qkv_hidden_sizes(node, weights, heads)
        _refuse_unsupported_forms(node)
        mask = input_at(node, MASK_INDEX)
        if mask is not None and (mask.shape is None or mask.shape.rank() not in (1, 2, 3)):
            raise GqaDecomposeError(
                "Attention mask_index: only the 1-D [B], 2-D [B, T] and 3-D [B, S, T] forms", node.name
            )
        end_positions = mask is not None and mask.shape.rank() == 1
        start_positions_at, at_run_time = _position_layout(node, x, mask) if end_positions else (0, False)
        head_size = sizes[0] // heads
        return MultiHeadAttentionSpec(
            num_heads=heads,
            head_size=head_size,
            value_head_size=sizes[2] // heads,
            **score_attributes(node, head_size),
            has_bias=input_at(node, BIAS) is not None,
            has_key_padding_mask=mask is not None,
            has_attention_bias=input_at(node, ATTENTION_BIAS) is not None,
            has_past=input_at(node, PAST) is not None,
            dtype=x.dtype,
            mask_is_end_positions=end_positions,
            start_positions_at=start_positions_at,
            start_positions_at_run_time=at_run_time,
        )

    def expand(self, op: OpBuilder, node: ir.Node, spec: MultiHeadAttentionSpec) -> list[ir.Value | None]:
        D, Dv = spec.num_heads * spec.head_size, spec.num_heads * spec.value_head_size
        qkv_BSE = op.op("MatMul", node.inputs[INPUT], node.inputs[WEIGHTS])
        if spec.has_bias:
            qkv_BSE = op.op("Add", qkv_BSE, node.inputs[BIAS])
        query, key, value = (
            op.slice(qkv_BSE, start, end, axis=2) for start, end in ((0, D), (D, 2 * D), (2 * D, 2 * D + Dv))
        )
        past = None
        if spec.has_past:
            past_2BNPH = node.inputs[PAST]
            past = tuple(op.op("Squeeze", op.slice(past_2BNPH, i, i + 1, axis=0), op.ints([0])) for i in (0, 1))
        mask = node.inputs[MASK_INDEX] if spec.has_key_padding_mask else None
        if spec.start_positions_at_run_time:
            mask = _as_end_and_start_positions(op, mask, node.inputs[INPUT])
        bias = node.inputs[ATTENTION_BIAS] if spec.has_attention_bias else None
        lengths = None
        if needs_lengths(spec):  # from the declared input: constants where static, as shape inference needs
            S = op.dim(node.inputs[INPUT], 1)
            lengths = (S, op.op("Add", S, op.dim(node.inputs[PAST], 3)) if spec.has_past else S)
        out_BSD, key_BNTH, value_BNTH = attend(op, spec, query, key, value, past, mask, bias, lengths)
        outputs: list[ir.Value | None] = [out_BSD]
        if len(node.outputs) > 1:
            read = node.outputs[1] is not None and (node.outputs[1].uses() or node.outputs[1].is_graph_output())
            present = (
                op.op("Concat", op.unsqueeze(key_BNTH, [0]), op.unsqueeze(value_BNTH, [0]), axis=0) if read else None
            )
            outputs.append(present)
        return outputs + [None] * (len(node.outputs) - len(outputs))

    def sample_feeds(self, node: ir.Node, spec: MultiHeadAttentionSpec, rng: np.random.Generator):
        """Random feeds by declared type and shape (a mask of small integers, 0 masking); a 1-D mask_index told
        B or 2B at run time gets 2B entries (start positions too), for the batch the verifier gives a symbol."""
        if not spec.start_positions_at_run_time:
            return None
        from gqa_decompose.verify_ops import SYMBOLIC_DIM_SIZE

        batch = node.inputs[INPUT].shape[0] if node.inputs[INPUT].shape is not None else None
        batch = batch if isinstance(batch, int) else SYMBOLIC_DIM_SIZE
        mask = node.inputs[MASK_INDEX]
        return {mask.name: rng.integers(0, 4, 2 * batch).astype(mask.dtype.numpy())}

    def tolerance(self, spec: MultiHeadAttentionSpec, dtype: ir.DataType) -> Tolerance:
        if dtype == ir.DataType.FLOAT16:
            return Tolerance(atol=2e-3, rtol=2e-3)
        return Tolerance(atol=2e-5, rtol=1e-4)


def _qkv_hidden_sizes(node: ir.Node, weights: ir.Value, heads: int) -> list[int]:
    """The Q, K and V hidden sizes (``qkv_hidden_sizes``, default a third of the weights' columns each)."""
    total = int(weights.shape[1])
    sizes_attribute = node.attributes.get("qkv_hidden_sizes")
    sizes = list(sizes_attribute.as_ints()) if sizes_attribute is not None else [total // 3] * 3
    if heads <= 0 or len(sizes) != 3 or sum(sizes) != total or sizes[0] != sizes[1] or any(s % heads for s in sizes):
        raise GqaDecomposeError(
            f"Attention qkv_hidden_sizes={sizes} with num_heads={heads} and weights [*, {total}]", node.name
        )
    return sizes


def _refuse_unsupported_forms(node: ir.Node) -> None:
    """Raise for the forms not decomposed: no bias, rotary, a shared past/present buffer, past with attention_bias."""
    if input_at(node, BIAS) is None:
        # Measured on ORT 1.31: the CPU kernel crashes the process (segfault) without a bias.
        raise GqaDecomposeError("Attention without bias: ORT CPU crashes on it, so it cannot be verified", node.name)
    if int_attribute(node, "do_rotary", 0):
        raise GqaDecomposeError("Attention do_rotary=1: not decomposed", node.name)
    if int_attribute(node, "past_present_share_buffer", 0) or input_at(node, PAST_SEQUENCE_LENGTH) is not None:
        raise GqaDecomposeError("Attention with a shared past/present buffer: not decomposed", node.name)
    if input_at(node, PAST) is not None and input_at(node, ATTENTION_BIAS) is not None:
        raise GqaDecomposeError("Attention with both past and attention_bias: ORT rejects it", node.name)


def _position_layout(node: ir.Node, x: ir.Value, mask: ir.Value) -> tuple[int, bool]:
    """A 1-D mask_index: where its start positions begin (0: none), and whether that is told at run time.

    ORT reads [2B] as end then start positions and [B] as end positions, by the length alone. Static B and
    length, or the same named dim: decided here; otherwise (a symbolic batch or length) at run time."""
    batch, length = (x.shape[0] if x.shape is not None else None), mask.shape[0]
    if isinstance(batch, int) and isinstance(length, int):
        if length not in (batch, 2 * batch):
            raise GqaDecomposeError(
                f"Attention 1-D mask_index of {length} entries: ORT wants the batch {batch} or twice it", node.name
            )
        return (batch if length == 2 * batch else 0), False
    named = isinstance(batch, ir.SymbolicDim) and batch.value is not None
    if named and isinstance(length, ir.SymbolicDim) and length.value == batch.value:
        return 0, False
    return 0, True


def _as_end_and_start_positions(op: OpBuilder, mask_L: ir.Value, input_BSD: ir.Value) -> ir.Value:
    """A 1-D mask_index of B or 2B entries as [2B]: end positions, then start positions (0 where it has none).
    ``Concat(mask, zeros(B))[:2B]`` is the mask itself for 2B entries and the ends then B zeros for B."""
    batch_1 = op.to_vector(op.dim(input_BSD, 0))
    dtype = mask_L.dtype.numpy() if mask_L.dtype is not None else np.int32
    zeros_B = op.op("ConstantOfShape", batch_1, value=ir.tensor(np.zeros(1, dtype)))
    padded = op.op("Concat", mask_L, zeros_B, axis=0)
    return op.slice(padded, op.ints([0]), op.op("Mul", batch_1, op.ints([2])), axis=0)


ATTENTION = register(Attention())
