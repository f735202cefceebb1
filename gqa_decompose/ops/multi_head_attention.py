"""com.microsoft.MultiHeadAttention (separate Q, K, V in BSD) -> standard-op scaled dot-product attention.

Dimension legend: B batch, N heads, S query length, L new key length, P past length, T = P + L key
columns, H head size of Q/K, Hv of V, D = N*H.

ORT CPU's semantics (checked against ORT 1.31): ``bias`` [D + D + N*Hv] is added to Q, K, V; past K/V
[B, N, P, H] are concatenated before the new ones and returned as present [B, N, T, H];
``scores = scale * Q K^T + mask + attention_bias`` with scale default 1/sqrt(H); the mask adds
``mask_filter_value`` (default -10000, not -inf) where ``key_padding_mask`` [B, T] is 0 and, with
``unidirectional=1``, where key column t > P + query row s; Softmax over T; ``out = probs V``
as [B, S, N*Hv]::

    query_BSD (+bias) -> [B, N, S, H] ----------------------------\\
    key_BLD   (+bias) -> [B, N, L, H] -> Concat(past) = present_key -> MatMul(scale) + mask + bias -> Softmax
    value_BLD (+bias) -> [B, N, L, Hv] -> Concat(past) = present_value ------------------> MatMul -> [B, S, N*Hv]

This is the onnxruntime-genai builder's cpu form (K/V already repeated to N heads, a 4-D causal
``attention_bias``, past/present). fp16 is computed in fp32 (present stays in the input type).

Refused: K/V given as BNSH or packed with Q (the cross-attention and packed forms), a 1-D
key_padding_mask (lengths), past_sequence_length / cache_indirection (the decoder-masked form), the qk output.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx_ir as ir

from gqa_decompose.errors import GqaDecomposeError
from gqa_decompose.expansion.builder import OpBuilder
from gqa_decompose.ops import register
from gqa_decompose.ops._common import float_attribute, input_at, int_attribute
from gqa_decompose.ops.base import OpContext, Tolerance

__all__ = ["MultiHeadAttention", "MultiHeadAttentionSpec", "attend", "needs_lengths", "score_attributes"]

QUERY, KEY, VALUE, BIAS, KEY_PADDING_MASK, ATTENTION_BIAS, PAST_KEY, PAST_VALUE = range(8)
PAST_SEQUENCE_LENGTH, CACHE_INDIRECTION = 8, 9


@dataclasses.dataclass(frozen=True)
class MultiHeadAttentionSpec:
    num_heads: int
    head_size: int
    value_head_size: int
    scale: float
    unidirectional: bool
    mask_filter_value: float
    has_bias: bool
    has_key_padding_mask: bool
    has_attention_bias: bool
    has_past: bool
    dtype: ir.DataType
    mask_is_end_positions: bool = False  # contrib Attention's 1-D mask_index [B]: key columns >= it are masked
    start_positions_at: int = 0  # B for a [2B] mask_index: entries B.. are start positions (columns before masked)
    # A 1-D mask_index of B or 2B entries, told apart at run time: the mask comes padded to [2B] (zero starts).
    start_positions_at_run_time: bool = False


def score_attributes(node: ir.Node, head_size: int) -> dict:
    """``scale``, ``unidirectional`` and ``mask_filter_value`` as ORT reads them (MultiHeadAttention and the
    contrib Attention alike): scale 0 or unset is 1/sqrt(H), the filter value defaults to -10000."""
    scale = float_attribute(node, "scale", 0.0)
    return {
        "scale": scale if scale != 0.0 else 1.0 / math.sqrt(head_size),
        "unidirectional": bool(int_attribute(node, "unidirectional", 0)),
        "mask_filter_value": float_attribute(node, "mask_filter_value", -10000.0),
    }


def _last_dim(node: ir.Node, value: ir.Value, what: str) -> int:
    if value is None or value.shape is None or value.shape.rank() != 3 or not isinstance(value.shape[2], int):
        raise GqaDecomposeError(
            f"MultiHeadAttention {what} must be 3-D [B, S, hidden] with a static hidden size", node.name
        )
    return int(value.shape[2])


class MultiHeadAttention:
    """The decomposer of com.microsoft.MultiHeadAttention (BSD form)."""

    domain = "com.microsoft"
    op_type = "MultiHeadAttention"

    def parse(self, node: ir.Node, context: OpContext) -> MultiHeadAttentionSpec:
        query, key, value = (input_at(node, i) for i in (QUERY, KEY, VALUE))
        if key is None or value is None:
            raise GqaDecomposeError("MultiHeadAttention with packed QKV/KV: not decomposed", node.name)
        if query.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
            raise GqaDecomposeError("MultiHeadAttention takes float or float16", node.name)
        hidden, key_hidden, value_hidden = (
            _last_dim(node, v, w) for v, w in ((query, "query"), (key, "key"), (value, "value"))
        )
        heads = node.attributes["num_heads"].as_int() if "num_heads" in node.attributes else 0
        if heads <= 0 or hidden % heads or value_hidden % heads or key_hidden != hidden:
            raise GqaDecomposeError(f"MultiHeadAttention num_heads={heads} does not divide the hidden sizes", node.name)
        if any(input_at(node, i) is not None for i in (PAST_SEQUENCE_LENGTH, CACHE_INDIRECTION)):
            raise GqaDecomposeError(
                "MultiHeadAttention past_sequence_length/cache_indirection: not decomposed", node.name
            )
        if len(node.outputs) > 3 and node.outputs[3] is not None and node.outputs[3].uses():
            raise GqaDecomposeError("MultiHeadAttention's qk output: not decomposed", node.name)
        mask = input_at(node, KEY_PADDING_MASK)
        if mask is not None and (mask.shape is None or mask.shape.rank() != 2):
            raise GqaDecomposeError("MultiHeadAttention key_padding_mask: only the 2-D [B, T] form", node.name)
        has_past = input_at(node, PAST_KEY) is not None
        if has_past != (input_at(node, PAST_VALUE) is not None):
            raise GqaDecomposeError("MultiHeadAttention needs both past_key and past_value or neither", node.name)
        head_size = hidden // heads
        return MultiHeadAttentionSpec(
            num_heads=heads,
            head_size=head_size,
            value_head_size=value_hidden // heads,
            **score_attributes(node, head_size),
            has_bias=input_at(node, BIAS) is not None,
            has_key_padding_mask=mask is not None,
            has_attention_bias=input_at(node, ATTENTION_BIAS) is not None,
            has_past=has_past,
            dtype=query.dtype,
        )

    def expand(self, op: OpBuilder, node: ir.Node, spec: MultiHeadAttentionSpec) -> list[ir.Value | None]:
        N, H, Hv = spec.num_heads, spec.head_size, spec.value_head_size
        query, key, value = (node.inputs[i] for i in (QUERY, KEY, VALUE))
        if spec.has_bias:
            bias = node.inputs[BIAS]
            query = op.op("Add", query, op.slice(bias, 0, N * H, axis=0))
            key = op.op("Add", key, op.slice(bias, N * H, 2 * N * H, axis=0))
            value = op.op("Add", value, op.slice(bias, 2 * N * H, 2 * N * H + N * Hv, axis=0))
        past = (node.inputs[PAST_KEY], node.inputs[PAST_VALUE]) if spec.has_past else None
        padding = node.inputs[KEY_PADDING_MASK] if spec.has_key_padding_mask else None
        bias_BNST = node.inputs[ATTENTION_BIAS] if spec.has_attention_bias else None
        wanted = attend(op, spec, query, key, value, past, padding, bias_BNST)
        return [wanted[i] if i < 3 and node.outputs[i] is not None else None for i in range(len(node.outputs))]

    def sample_feeds(self, node: ir.Node, spec: MultiHeadAttentionSpec, rng: np.random.Generator):
        """Feeds whose lengths agree: T = P + L wherever a mask or attention_bias is T wide, though a
        declared shape names T by its own symbol (torch dynamo's ``past_seq + seq``); static dims are
        kept. A padding mask of small integers (0 masks); every input that is not a constant is fed."""
        query, key = node.inputs[QUERY], node.inputs[KEY]
        past_key = input_at(node, PAST_KEY)
        B, S = _size(query, 0, SAMPLE_BATCH), _size(query, 1, SAMPLE_LENGTH)
        L = _size(key, 1, S if _same_dim(query, key, 1) else SAMPLE_LENGTH + 1)
        P = _size(past_key, 2, SAMPLE_PAST) if spec.has_past else 0
        sizes_BNST = (B, spec.num_heads, S, P + L)
        shapes = {
            QUERY: (B, S, -1),
            KEY: (B, L, -1),
            VALUE: (B, L, -1),
            BIAS: (-1,),
            KEY_PADDING_MASK: (B, P + L),
            ATTENTION_BIAS: sizes_BNST,
            PAST_KEY: (B, spec.num_heads, P, -1),
            PAST_VALUE: (B, spec.num_heads, P, -1),
        }
        feeds = {}
        for index, wanted in shapes.items():
            value = input_at(node, index)
            if value is None or value.const_value is not None or value.shape is None or value.dtype is None:
                continue
            dims = [d if isinstance(d, int) else w for d, w in zip(value.shape, wanted)]
            if index == KEY_PADDING_MASK:
                feeds[value.name] = rng.integers(0, 4, dims).astype(value.dtype.numpy())
            else:
                feeds[value.name] = rng.standard_normal(dims).astype(value.dtype.numpy())
        return feeds

    def tolerance(self, spec: MultiHeadAttentionSpec, dtype: ir.DataType) -> Tolerance:
        if dtype == ir.DataType.FLOAT16:
            return Tolerance(atol=2e-3, rtol=2e-3)
        return Tolerance(atol=2e-5, rtol=1e-4)


# Per-node verification's sizes for symbolic dims (lengths that differ, so a swapped axis shows).
SAMPLE_BATCH, SAMPLE_LENGTH, SAMPLE_PAST = 2, 3, 4


def _size(value: ir.Value | None, axis: int, default: int) -> int:
    dim = None if value is None or value.shape is None or value.shape.rank() <= axis else value.shape[axis]
    return dim if isinstance(dim, int) else default


def _same_dim(a: ir.Value, b: ir.Value, axis: int) -> bool:
    """Whether two values declare the same (symbolic or static) dim at ``axis``."""
    if a.shape is None or b.shape is None or a.shape.rank() <= axis or b.shape.rank() <= axis:
        return False
    return a.shape[axis] == b.shape[axis]


def _f32(op: OpBuilder, value: ir.Value, dtype: ir.DataType) -> ir.Value:
    """``value`` (of ``dtype``: tape-made values carry no type) in fp32."""
    return value if dtype == ir.DataType.FLOAT else op.cast(value, ir.DataType.FLOAT)


def attend(
    op: OpBuilder,
    spec: MultiHeadAttentionSpec,
    query_BSD: ir.Value,
    key_BLD: ir.Value,
    value_BLD: ir.Value,
    past: tuple[ir.Value, ir.Value] | None,
    padding_mask_BT: ir.Value | None,
    attention_bias: ir.Value | None,
    lengths: tuple[ir.Value, ir.Value] | None = None,
) -> tuple[ir.Value, ir.Value, ir.Value]:
    """(out [B, S, N*Hv], present key [B, N, T, H], present value [B, N, T, Hv]); shared with contrib Attention.

    Inputs in ``spec.dtype`` (bias already added); fp16 is computed in fp32, the presents keep ``spec.dtype``.
    ``lengths``: (S, T) as 0-D int64 values read off the node's declared inputs (constants where static, so the
    masks' shapes are inferred); default: the shapes of ``query_BSD`` and the concatenated keys at run time.
    """
    N, H, Hv = spec.num_heads, spec.head_size, spec.value_head_size
    kv_dtype = spec.dtype
    if past is None:  # fp16: cast before the head split (the presents are then the only fp16 use)
        key_BLD, value_BLD = _f32(op, key_BLD, spec.dtype), _f32(op, value_BLD, spec.dtype)
        kv_dtype = ir.DataType.FLOAT
    key_BNTH, value_BNTH = _split_heads(op, key_BLD, N, H), _split_heads(op, value_BLD, N, Hv)
    if past is not None:
        key_BNTH = op.op("Concat", past[0], key_BNTH, axis=2)
        value_BNTH = op.op("Concat", past[1], value_BNTH, axis=2)
    query_BNSH = _split_heads(op, _f32(op, query_BSD, spec.dtype), N, H)
    keyT_BNHT = op.op("Transpose", _f32(op, key_BNTH, kv_dtype), perm=[0, 1, 3, 2])
    scores_BNST = op.op("Mul", op.op("MatMul", query_BNSH, keyT_BNHT), op.float_scalar(spec.scale))
    S_T = (None, None)
    if needs_lengths(spec):
        S_T = lengths if lengths is not None else (op.dim(query_BSD, 1), op.dim(key_BNTH, 2))
    mask = _mask(op, spec, padding_mask_BT, *S_T)
    if mask is not None:
        scores_BNST = op.op("Add", scores_BNST, mask)
    if attention_bias is not None:
        scores_BNST = op.op("Add", scores_BNST, _f32(op, attention_bias, attention_bias.dtype))
    probs_BNST = op.op("Softmax", scores_BNST, axis=-1)
    out_BNSH = op.op("MatMul", probs_BNST, _f32(op, value_BNTH, kv_dtype))
    out_BSD = op.op("Reshape", op.op("Transpose", out_BNSH, perm=[0, 2, 1, 3]), op.ints([0, 0, N * Hv]))
    if spec.dtype != ir.DataType.FLOAT:
        out_BSD = op.cast(out_BSD, spec.dtype)
        if past is None:
            key_BNTH, value_BNTH = op.cast(key_BNTH, spec.dtype), op.cast(value_BNTH, spec.dtype)
    return out_BSD, key_BNTH, value_BNTH


def needs_lengths(spec: MultiHeadAttentionSpec) -> bool:
    """Whether the masks read S and T: the causal mask, and end positions compared with the key columns."""
    return spec.unidirectional or (spec.has_key_padding_mask and spec.mask_is_end_positions)


def _split_heads(op: OpBuilder, x_BSD: ir.Value, heads: int, head_size: int) -> ir.Value:
    """[B, S, N*H] -> [B, N, S, H]."""
    return op.op("Transpose", op.op("Reshape", x_BSD, op.ints([0, 0, heads, head_size])), perm=[0, 2, 1, 3])


def _mask(op: OpBuilder, spec, mask_BT: ir.Value | None, S: ir.Value | None, T: ir.Value | None):
    """fp32 additive mask broadcastable to [B, N, S, T]: mask_filter_value where masked (each cause adds)."""
    terms = []
    filter_value = op.float_scalar(spec.mask_filter_value)
    zero = op.float_scalar(0.0)
    if mask_BT is not None and spec.mask_is_end_positions:
        columns_T = op.op("Range", op.int_scalar(0), T, op.int_scalar(1))
        positions = op.cast(mask_BT, ir.DataType.INT64)
        batch = spec.start_positions_at
        run_time = spec.start_positions_at_run_time
        halves_2B1 = op.op("Reshape", positions, op.ints([2, -1, 1])) if run_time else None
        padded_BT = op.op("GreaterOrEqual", columns_T, _positions_B1(op, positions, halves_2B1, 0, batch))
        if batch or run_time:  # one cause, one filter value: masked once if both before the start and past the end
            starts_B1 = _positions_B1(op, positions, halves_2B1, 1, batch)
            padded_BT = op.op("Or", padded_BT, op.op("Less", columns_T, starts_B1))
        terms.append(op.unsqueeze(op.op("Where", padded_BT, filter_value, zero), [1, 2]))
    elif mask_BT is not None:
        padded_BT = op.op("Equal", mask_BT, op.cast(op.int_scalar(0), mask_BT.dtype))
        per_query = mask_BT.shape is not None and mask_BT.shape.rank() == 3  # contrib Attention's [B, S, T]
        terms.append(op.unsqueeze(op.op("Where", padded_BT, filter_value, zero), [1] if per_query else [1, 2]))
    if spec.unidirectional:
        rows_S1 = op.unsqueeze(op.op("Range", op.int_scalar(0), S, op.int_scalar(1)), [1])
        columns_T = op.op("Range", op.int_scalar(0), T, op.int_scalar(1))
        future_ST = op.op("Greater", columns_T, op.op("Add", rows_S1, op.op("Sub", T, S)))
        terms.append(op.op("Where", future_ST, filter_value, zero))
    if not terms:
        return None
    return terms[0] if len(terms) == 1 else op.op("Add", terms[0], terms[1])


def _positions_B1(op: OpBuilder, positions: ir.Value, halves_2B1: ir.Value | None, half: int, batch: int) -> ir.Value:
    """End (``half`` 0) or start (1) positions of a 1-D mask_index as [B, 1]: a half of the run-time [2, B, 1]
    form, the whole mask (a static [B]), or sliced at a static B (a static [2B])."""
    if halves_2B1 is not None:
        return op.op("Gather", halves_2B1, op.int_scalar(half), axis=0)
    if not batch:
        return op.unsqueeze(positions, [1])
    return op.unsqueeze(op.slice(positions, half * batch, (half + 1) * batch, axis=0), [1])


MULTI_HEAD_ATTENTION = register(MultiHeadAttention())
