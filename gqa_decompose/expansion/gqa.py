"""One GroupQueryAttention node as standard ONNX ops.

Dimension legend: B batch, S query length, N query heads, Nkv KV heads,
H head size, P past rows, Lp present rows, D = N*H.

The story, top-down::

    query (packed [B, S, (N+2Nkv)H] or [B, S, D]) -> q [B,S,N,H], k/v [B,S,Nkv,H]
    fp32; rotary on q and k; k rounded back to the model's type (it goes into present)
    present = past with new rows scattered at c_b        (or the new rows when there is no past)
    visible = the shared causal/window mask             [B, 1, S, Lp]
    output  = attend(q, present_key, present_value)     cast back once to the model's type

Layers whose present nobody reads skip the scatter and attend over
Concat(past, new) with a mask that knows each column's position.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from gqa_decompose import spec as gqa
from gqa_decompose.expansion.attention import attend
from gqa_decompose.expansion.builder import OpBuilder
from gqa_decompose.expansion.kv_cache import present_length, write_new_rows
from gqa_decompose.expansion.mask import (
    concat_key_positions,
    dense_key_positions,
    mask_bias,
    visibility_mask,
)
from gqa_decompose.expansion.quantized_cache import dequantize, quantize
from gqa_decompose.expansion.rotary import apply_rotary, build_rotary_tables
from gqa_decompose.expansion.sequence import SharedSubgraphs, build_sequence_info, dim_key
from gqa_decompose.expansion.sliding_cache import present_columns, sliding_key_positions

__all__ = ["ExpandedNode", "expand_gqa"]

_FLOAT = ir.DataType.FLOAT


@dataclasses.dataclass(frozen=True)
class ExpandedNode:
    """New values for the GQA node's outputs (None where an output is not produced)."""

    outputs: tuple[ir.Value | None, ...]


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if index < len(node.inputs) else None


def _split_heads(op: OpBuilder, node: ir.Node, spec: gqa.GqaSpec, rotate=None):
    """q [B,S,N,H], k [B,S,Nkv,H], v [B,S,Nkv,H] in the model's type, q and k rotated by ``rotate``.

    Packed QKV rotates its Q and K heads in one pass, before they are split apart.
    """
    query = node.inputs[gqa.QUERY]
    heads, kv_heads, head_size = spec.num_heads, spec.kv_num_heads, spec.head_size
    if spec.packed_qkv:
        qkv_BSnH = op.op("Reshape", query, op.ints([0, 0, heads + 2 * kv_heads, head_size]))
        if rotate is None:
            return op.op_multi(
                "Split", qkv_BSnH, op.ints([heads, kv_heads, kv_heads]), axis=2, num_outputs=3
            )
        qk_BSnH, value_BSNH = op.op_multi(
            "Split", qkv_BSnH, op.ints([heads + kv_heads, kv_heads]), axis=2, num_outputs=2
        )
        query_BSNH, key_BSNH = op.op_multi(
            "Split", rotate(qk_BSnH), op.ints([heads, kv_heads]), axis=2, num_outputs=2
        )
        return query_BSNH, key_BSNH, value_BSNH
    rotate = rotate or (lambda x: x)
    query_BSNH = rotate(op.op("Reshape", query, op.ints([0, 0, heads, head_size])))
    if spec.kv_empty:
        return query_BSNH, None, None
    key_BSNH = rotate(op.op("Reshape", node.inputs[gqa.KEY], op.ints([0, 0, kv_heads, head_size])))
    value_BSNH = op.op("Reshape", node.inputs[gqa.VALUE], op.ints([0, 0, kv_heads, head_size]))
    return query_BSNH, key_BSNH, value_BSNH


def _to_float(op: OpBuilder, value: ir.Value, spec: gqa.GqaSpec) -> ir.Value:
    return value if spec.dtype == _FLOAT else op.cast(value, _FLOAT)


def _from_float(op: OpBuilder, value: ir.Value, spec: gqa.GqaSpec) -> ir.Value:
    return value if spec.dtype == _FLOAT else op.cast(value, spec.dtype)


def _bsnh_to_bnsh(op: OpBuilder, value: ir.Value) -> ir.Value:
    return op.op("Transpose", value, perm=[0, 2, 1, 3])


def _cache_codec(op: OpBuilder, node: ir.Node, spec: gqa.GqaSpec, scale_index: int):
    """(encode, decode): new rows in the model's type -> the cache's type -> fp32 for attention."""
    if spec.kv_quant is None:
        return (lambda x: x), (lambda x: _to_float(op, x, spec))
    layout = dict(
        per_channel=spec.kv_quant == "PER_CHANNEL",
        bits=spec.kv_bits,
        kv_num_heads=spec.kv_num_heads,
        head_size=spec.head_size,
    )
    scale = node.inputs[scale_index]
    return (
        lambda x: quantize(op, _to_float(op, x, spec), scale, **layout),
        lambda q: dequantize(op, q, scale, **layout),
    )


def _longest_rows(
    op: OpBuilder, shared: SharedSubgraphs, info, keys: ir.Value, values: ir.Value
):
    """Keys and values cut to the rows any batch row can see, max_b t_b, and that length.

    A static buffer holds P rows of which only t_b are valid; attending over
    the rest would cost as much as the whole buffer at every step.
    """

    def build(builder: OpBuilder) -> ir.Value:
        return builder.op("ReduceMax", info.total_lengths_B, keepdims=0)

    longest = shared.get(("longest_row", info), build)
    end_1 = op.to_vector(longest)
    return op.slice(keys, 0, end_1, axis=2), op.slice(values, 0, end_1, axis=2), longest


def _gather_columns(op: OpBuilder, info, bias: ir.Value, key_positions: ir.Value) -> ir.Value:
    """bias[b', n', s, kpos[b, k]] for every key column k, [B, N or 1, S, K].

    Positions that are never visible are clamped to a valid column; the mask hides them.
    """
    last_column = op.op("Sub", info.total_length, op.int_scalar(1))
    positions_B11K = op.op("Min", key_positions, last_column)
    bias_shape = op.op("Shape", bias)
    full_shape = op.op(
        "Concat", info.batch_size_1, op.slice(bias_shape, 1, 4, axis=0), axis=0
    )
    bias_full = op.op("Expand", bias, full_shape)
    index_shape = op.op(
        "Concat",
        op.slice(full_shape, 0, 3, axis=0),
        op.slice(op.op("Shape", key_positions), 3, 4, axis=0),
        axis=0,
    )
    return op.op("GatherElements", bias_full, op.op("Expand", positions_B11K, index_shape), axis=3)


def _fit_columns(op: OpBuilder, x: ir.Value, width: ir.Value, new_width: ir.Value) -> ir.Value:
    """The last axis of ``x`` (``width`` columns) cut or zero-padded to ``new_width``."""
    missing = op.op("Max", op.op("Sub", new_width, width), op.int_scalar(0))
    pads = op.op("Concat", op.ints([0] * 7), op.to_vector(missing), axis=0)
    return op.slice(op.op("Pad", x, pads), 0, op.to_vector(new_width), axis=3)


def expand_gqa(
    op: OpBuilder, shared: SharedSubgraphs, node: ir.Node, spec: gqa.GqaSpec
) -> ExpandedNode:
    """Build the standard-op subgraph of ``node``; nodes land in ``op`` and ``shared``."""
    info = build_sequence_info(
        shared,
        node.inputs[gqa.SEQLENS_K],
        node.inputs[gqa.TOTAL_SEQUENCE_LENGTH],
        node.inputs[gqa.QUERY],
        always_first_prompt=not spec.has_past,
    )

    # 1. Rotary on q and the new k, in fp32; both rounded to the model's type, as ORT does.
    rotate = None
    if spec.do_rotary:
        tables = build_rotary_tables(
            shared,
            info,
            node.inputs[gqa.COS_CACHE],
            node.inputs[gqa.SIN_CACHE],
            _input(node, gqa.POSITION_IDS),
            spec.rotary_half,
        )

        def rotate(x_BSnH: ir.Value) -> ir.Value:
            rotated = apply_rotary(
                op, _to_float(op, x_BSnH, spec), tables, spec.head_size, spec.rotary_interleaved
            )
            return _from_float(op, rotated, spec)

    query_BSNH, key_BSNH, value_BSNH = _split_heads(op, node, spec, rotate)
    query_BNSH = _to_float(op, _bsnh_to_bnsh(op, query_BSNH), spec)

    # 2. Keys and values attention reads, and present when someone reads it, in the cache's type.
    past_key, past_value = _input(node, gqa.PAST_KEY), _input(node, gqa.PAST_VALUE)
    encode_key, decode_key = _cache_codec(op, node, spec, gqa.K_SCALE)
    encode_value, decode_value = _cache_codec(op, node, spec, gqa.V_SCALE)
    if key_BSNH is not None:
        new_key_BNSH = encode_key(_bsnh_to_bnsh(op, key_BSNH))
        new_value_BNSH = encode_value(_bsnh_to_bnsh(op, value_BSNH))
    query_length_key = dim_key(node.inputs[gqa.QUERY], 1)
    attend_over_present = not spec.sliding_window_cache and (
        spec.present_used
        or spec.has_attention_bias
        or spec.qk_output
        or spec.static_kv_cache
        or not spec.has_past
    )
    present_key = present_value = None
    keys_are_positions = True  # key column j holds position j
    if not spec.has_past:
        keys = present_key = new_key_BNSH
        values = present_value = new_value_BNSH
        key_length, key_length_key = info.query_length, ("query_length", query_length_key)
    elif spec.kv_empty:
        if spec.present_used:
            present_key = op.op("Identity", past_key)
            present_value = op.op("Identity", past_value)
        keys, values, key_length = _longest_rows(op, shared, info, past_key, past_value)
        key_length_key = ("longest_row", info)
    elif spec.sliding_window_cache:
        keys_are_positions = False
        keys = op.op("Concat", past_key, new_key_BNSH, axis=2)
        values = op.op("Concat", past_value, new_value_BNSH, axis=2)
        if spec.present_used:
            columns = present_columns(shared, info, past_key, spec.local_window_size, spec.kv_num_heads)
            present_key = op.op("GatherND", keys, columns, batch_dims=2)
            present_value = op.op("GatherND", values, columns, batch_dims=2)
    elif attend_over_present:
        static = spec.static_kv_cache
        keys = present_key = write_new_rows(
            op, shared, info, past_key, new_key_BNSH, spec.kv_num_heads, static
        )
        values = present_value = write_new_rows(
            op, shared, info, past_value, new_value_BNSH, spec.kv_num_heads, static
        )
        if static:
            keys, values, key_length = _longest_rows(op, shared, info, keys, values)
            key_length_key = ("longest_row", info)
        else:
            key_length = present_length(shared, info, past_key)
            key_length_key = ("present_length", info, dim_key(past_key, 2), False)
    else:
        keys_are_positions = False
        keys = op.op("Concat", past_key, new_key_BNSH, axis=2)
        values = op.op("Concat", past_value, new_value_BNSH, axis=2)

    # 3. The shared mask.
    if keys_are_positions:
        key_positions = dense_key_positions(shared, key_length, key_length_key)
    elif spec.sliding_window_cache:
        key_positions = sliding_key_positions(shared, info, past_key, spec.local_window_size)
    else:
        key_positions = concat_key_positions(shared, info, past_key)
    visible_B1SK = visibility_mask(
        shared, info, key_positions, spec.local_window_size, spec.causal
    )

    # 4. Attention in fp32.
    bias_BNSK = None
    bias = _input(node, gqa.ATTENTION_BIAS)
    if bias is not None and not keys_are_positions:
        # Bias columns are absolute key positions; pick each key column's.
        bias_BNSK = _gather_columns(op, info, _to_float(op, bias, spec), key_positions)
    elif bias is not None:
        # Bias columns are absolute key positions 0..T-1; the key columns may be more or fewer.
        bias_BNSK = _fit_columns(op, _to_float(op, bias, spec), info.total_length, key_length)
    attention = attend(
        op,
        query_BNSH,
        decode_key(keys),
        decode_value(values),
        visible_B1SK,
        mask_bias(shared, visible_B1SK),
        num_heads=spec.num_heads,
        kv_num_heads=spec.kv_num_heads,
        head_size=spec.head_size,
        scale=spec.scale,
        softcap=spec.softcap,
        bias_BNSK=bias_BNSK,
        smooth_softmax=spec.smooth_softmax,
        head_sink_N=_input(node, gqa.HEAD_SINK),
        may_mask_whole_rows=bias is not None or spec.local_window_size == 0,
        want_scores=spec.qk_output == 1,
    )
    output = _from_float(op, attention.output_BSD, spec)

    output_qk = None
    if spec.output_qk_used:
        chosen = attention.scores_BNSK if spec.qk_output == 1 else attention.probs_BNSK
        # Columns >= T do not exist in output_qk; columns in [t_b, T) are masked, so 0.
        output_qk = _from_float(op, _fit_columns(op, chosen, key_length, info.total_length), spec)

    return ExpandedNode((output, present_key, present_value, output_qk))
