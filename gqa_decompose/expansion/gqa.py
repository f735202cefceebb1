"""One GroupQueryAttention node as standard ONNX ops.

Dimension legend: B batch, S query length, N query heads, Nkv KV heads,
H head size (static, or read from the query at run time: ``head_size.py``),
P past rows, Lp present rows, K key columns, D = N*H.

The story, top-down::

    query (packed [B, S, (N+2Nkv)H] or [B, S, D]) -> q [B,S,N,H], k/v [B,S,Nkv,H]
    per-head RMS norm of q and k when q_norm_weight / k_norm_weight are given
    fp32 rotary on q and k, rounded back to the model's type (k goes into present)
    new rows -> the cache's type (the model's, or int8/int4 quantized)
    present  = past with the new rows at c_b: Concat, ScatterND into past, or Pad + ScatterND,
               chosen at run time unless promised    (no past: the new rows)
    visible  = the shared causal/window mask over each key column's position   [B, 1, S, K]
    output   = attend(q, keys, values) in fp32, cast back once to the model's type;
               causal row blocks for long prompts, a cut of long buffers (run-time Ifs)

Which columns attention reads depends on the cache (see ``_key_columns``):
present rows (all, or those of the longest row when a buffer holds many more),
or Concat(past, new) for a windowed cache and for layers whose present nobody
reads.

With the attention target (:class:`Lowering`), rotary is RotaryEmbedding-23,
the cache write TensorScatter-24, and attention one standard Attention op fed
the same key columns and mask (see ``_attend_with_op``); --fast-paths applies
to the primitives target only.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from gqa_decompose import spec as gqa
from gqa_decompose.expansion.attention import ReadPlan, Scoring, attend
from gqa_decompose.expansion.attention_op import (
    QK_AFTER_MASK,
    QK_AFTER_SOFTMAX,
    attention_op,
    with_sink_column,
)
from gqa_decompose.expansion.builder import OpBuilder
from gqa_decompose.expansion.head_size import HeadSize, default_scale, runtime_head_size, shape_of
from gqa_decompose.expansion.kv_cache import (
    CacheWrite,
    append_aligned_rows,
    concat_rows,
    guard_aligned_rows,
    longest_row,
    present_length,
    read_length,
    update_cache,
    write_into_buffer,
    write_new_rows,
)
from gqa_decompose.expansion.mask import (
    causal_row_blocks,
    concat_key_positions,
    dense_key_positions,
    mask_bias,
    visibility_mask,
)
from gqa_decompose.expansion.qk_norm import rms_normalize_heads
from gqa_decompose.expansion.quantized_cache import dequantize, quantize
from gqa_decompose.expansion.rotary import (
    apply_rotary,
    apply_rotary_op,
    build_rotary_op_inputs,
    build_rotary_tables,
    new_rows_tables,
)
from gqa_decompose.expansion.sequence import (
    SharedSubgraphs,
    build_sequence_info,
    dim_key,
)
from gqa_decompose.expansion.sliding_cache import present_columns, sliding_key_positions
from gqa_decompose.opsets import TENSOR_SCATTER_MIN_OPSET

__all__ = ["ExpandedNode", "Lowering", "expand_gqa"]

_FLOAT = ir.DataType.FLOAT


@dataclasses.dataclass(frozen=True)
class Lowering:
    """How one node is emitted, apart from what it means (its :class:`~gqa_decompose.spec.GqaSpec`): the
    standard ops the expansion may use (all False: primitives only), the user's choices as they apply to
    this node, and which of its outputs the graph reads. The planner builds it (:meth:`of`).

    The runtime profile's choices are properties (:data:`~gqa_decompose.spec.PROFILE_CHOICES` says which profile
    makes which)."""

    attention_op: bool = False  # one Attention node (opset >= 23)
    tensor_scatter: bool = False  # TensorScatter-24 for the KV cache write
    compute_dtype: ir.DataType = _FLOAT  # fp32, or the model's type with native_precision
    fast_paths: bool = False  # run-time Ifs: row blocks, cut of long buffers, one-copy cache update
    runtime_profile: str = "portable"  # spec.RUNTIME_PROFILES: "onnxruntime" is fast_paths

    def _chooses(self, choice: str) -> bool:
        return gqa.profile_chooses(self.runtime_profile, choice)

    @property
    def skip_empty_past(self) -> bool:
        """webnn: no node reads an empty past (kv_cache.unless_past_is_empty)."""
        return self._chooses("skip_empty_past")

    @property
    def shapes_from_shapes(self) -> bool:
        """webnn: no shape computed from data (WebNN compiles for static shapes), so attention reads
        a static buffer whole (not its longest row's rows) and the growing-cache promise's guard, a Reshape to a
        target computed from seqlens_k, is not emitted: the cache is written as without a promise (exact for a
        growing cache too)."""
        return self._chooses("shapes_from_shapes")

    @property
    def widen_quantized_write(self) -> bool:
        """webnn, litert: a quantized cache (int8, or uint8 nibble pairs) is padded and written in int32, cast
        back after. The WebNN EP pads no int8 and scatters no uint8; onnx2tf spells an int8 ScatterND as
        data * (1 - ScatterND(ones)) + ScatterND(updates), and TFLite's quantized SUB aborts. It costs ONNX
        Runtime's int8 decode 1.7x, hence not portable's."""
        return self._chooses("widen_quantized_write")

    @property
    def widen_buffer_write(self) -> bool:
        """litert: also the write straight into a promised static buffer (static_kv_cache, no Pad). Not webnn's,
        left as it was: the WebNN EP scatters int8, and an int4 (uint8) buffer under the promise is untried there."""
        return self._chooses("widen_buffer_write")

    @property
    def norm_by_primitives(self) -> bool:
        """webnn, litert: the q/k norm from primitives at opset >= 23 too: neither the WebNN EP nor LiteRT has
        an RMSNormalization kernel."""
        return self._chooses("norm_by_primitives")

    @property
    def plain_index_ops(self) -> bool:
        """webnn: the windowed cache's indices with an int32 Div and a GatherND without batch_dims (the WebNN EP
        divides no int64 and takes no GatherND with batch_dims)."""
        return self._chooses("plain_index_ops")

    @property
    def prescale_query(self) -> bool:
        """openvino: the query scaled instead of the scores (OpenVINO moves a scale of the scores onto the keys:
        a pass over every key read)."""
        return self._chooses("prescale_query")

    @property
    def crops_past_in_first_prompt(self) -> bool:
        """The openvino profile: a first prompt's Pad drops past's rows by negative pads, so present rows
        S .. t_b - 1 of a static buffer are 0 as in ORT (kv_cache._growth_pads); tract and onnx.reference
        reject negative pads, so the portable graph keeps past's rows there."""
        return self._chooses("crop_past_in_first_prompt")

    @property
    def cache_write(self) -> CacheWrite:
        """The profile's spelling of the straight-line cache write."""
        return CacheWrite(self.skip_empty_past, self.widen_quantized_write, self.crops_past_in_first_prompt)

    static_kv_cache: bool = False  # promised T <= P: present has exactly P rows
    growing_kv_cache: bool = False  # promised T = P + S with aligned rows: present = Concat(past, new)
    present_used: bool = False  # present_key/present_value exist and someone reads them
    output_qk_used: bool = False

    @classmethod
    def of(
        cls,
        node: ir.Node,
        spec: gqa.GqaSpec,
        options: gqa.DecomposeOptions | None = None,
        target: str = "primitives",
        opset: int = 0,
    ) -> Lowering:
        """``node``'s lowering for ``options`` and the target it takes at ``opset``
        (:func:`~gqa_decompose.spec.resolve_target`)."""
        options = options or gqa.DecomposeOptions()
        attention = target == "attention"
        plain_cache = spec.has_past and not spec.sliding_window_cache
        return cls(
            attention_op=attention,
            tensor_scatter=attention and opset >= TENSOR_SCATTER_MIN_OPSET,
            compute_dtype=spec.dtype if options.native_precision else _FLOAT,
            fast_paths=options.fast_paths,
            runtime_profile=options.runtime_profile,
            static_kv_cache=options.static_kv_cache and plain_cache,
            growing_kv_cache=options.growing_kv_cache
            and plain_cache
            and not (spec.kv_empty or spec.kv_maybe_empty)
            and not gqa.profile_chooses(options.runtime_profile, "shapes_from_shapes"),
            present_used=gqa.output_is_read(node, gqa.PRESENT_KEY) or gqa.output_is_read(node, gqa.PRESENT_VALUE),
            output_qk_used=bool(spec.qk_output) and gqa.output_is_read(node, gqa.OUTPUT_QK),
        )


@dataclasses.dataclass(frozen=True)
class ExpandedNode:
    """New values for the GQA node's outputs (None where an output is not produced)."""

    outputs: tuple[ir.Value | None, ...]


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if index < len(node.inputs) else None


def _split_heads(
    op: OpBuilder,
    node: ir.Node,
    spec: gqa.GqaSpec,
    head_size: HeadSize,
    rotate=None,
    rotate_key=None,
    norm_op: bool = True,
):
    """q [B,S,N,H], k [B,Skv,Nkv,H], v [B,Skv,Nkv,H] in the model's type, q and k normalized
    (when norm weights are given) and then rotated by ``rotate(x_BSnH, n)`` (separate
    keys by ``rotate_key``, when given: their length may differ from S at run time).

    Packed QKV rotates its Q and K heads in one pass, before they are split apart,
    unless they are normalized first (each with its own weight). A run-time ``head_size``
    enters the reshapes as a value; the Splits are over the static head counts.
    """
    if spec.packed_qkv:
        return _split_packed_heads(op, node, spec, head_size, rotate, norm_op)
    heads, kv_heads = spec.num_heads, spec.kv_num_heads
    rotate = rotate or (lambda x, _heads: x)
    query_BSNH = op.op("Reshape", node.inputs[gqa.QUERY], shape_of(op, [0, 0, heads, head_size]))
    query_BSNH = rotate(_normalize_heads(op, node, spec, query_BSNH, gqa.Q_NORM_WEIGHT, spec.q_norm, norm_op), heads)
    if spec.kv_empty:
        return query_BSNH, None, None
    key, value = node.inputs[gqa.KEY], node.inputs[gqa.VALUE]
    key_BSNH = op.op("Reshape", key, shape_of(op, [0, 0, kv_heads, head_size], like=key))
    key_BSNH = _normalize_heads(op, node, spec, key_BSNH, gqa.K_NORM_WEIGHT, spec.k_norm, norm_op)
    key_BSNH = (rotate_key or rotate)(key_BSNH, kv_heads)
    value_BSNH = op.op("Reshape", value, shape_of(op, [0, 0, kv_heads, head_size], like=value))
    return query_BSNH, key_BSNH, value_BSNH


def _split_packed_heads(
    op: OpBuilder, node: ir.Node, spec: gqa.GqaSpec, head_size: HeadSize, rotate, norm_op: bool
) -> tuple[ir.Value, ir.Value, ir.Value]:
    """_split_heads for packed QKV [B, S, (N + 2*Nkv)*H]: q, k, v [B, S, n, H].

    Without norms, Q and K are rotated together ([B, S, N + Nkv, H], one pass) before being
    split apart; with norms each is normalized with its own weight first, then rotated alone.
    """
    heads, kv_heads = spec.num_heads, spec.kv_num_heads
    qkv_BSnH = op.op("Reshape", node.inputs[gqa.QUERY], shape_of(op, [0, 0, heads + 2 * kv_heads, head_size]))
    if rotate is None or spec.q_norm or spec.k_norm:
        query_BSNH, key_BSNH, value_BSNH = op.op_multi(
            "Split", qkv_BSnH, op.ints([heads, kv_heads, kv_heads]), axis=2, num_outputs=3
        )
        rotate = rotate or (lambda x, _heads: x)
        query_BSNH = _normalize_heads(op, node, spec, query_BSNH, gqa.Q_NORM_WEIGHT, spec.q_norm, norm_op)
        query_BSNH = rotate(query_BSNH, heads)
        key_BSNH = _normalize_heads(op, node, spec, key_BSNH, gqa.K_NORM_WEIGHT, spec.k_norm, norm_op)
        key_BSNH = rotate(key_BSNH, kv_heads)
        return query_BSNH, key_BSNH, value_BSNH
    qk_BSnH, value_BSNH = op.op_multi("Split", qkv_BSnH, op.ints([heads + kv_heads, kv_heads]), axis=2, num_outputs=2)
    query_BSNH, key_BSNH = op.op_multi(
        "Split", rotate(qk_BSnH, heads + kv_heads), op.ints([heads, kv_heads]), axis=2, num_outputs=2
    )
    return query_BSNH, key_BSNH, value_BSNH


def _normalize_heads(
    op: OpBuilder,
    node: ir.Node,
    spec: gqa.GqaSpec,
    x_BSnH: ir.Value,
    weight_index: int,
    enabled: bool,
    norm_op: bool,
) -> ir.Value:
    """``x_BSnH`` RMS-normalized over H with the node's weight at ``weight_index``, when ``enabled``."""
    if not enabled:
        return x_BSnH
    weight_H = node.inputs[weight_index]
    return rms_normalize_heads(op, x_BSnH, weight_H, spec.qk_norm_epsilon, spec.dtype, norm_op)


def _to_compute(op: OpBuilder, value: ir.Value, spec: gqa.GqaSpec, lowering: Lowering) -> ir.Value:
    """A value of the model's type in the compute type (fp32 unless native precision)."""
    return value if spec.dtype == lowering.compute_dtype else op.cast(value, lowering.compute_dtype)


def _from_compute(op: OpBuilder, value: ir.Value, spec: gqa.GqaSpec, lowering: Lowering) -> ir.Value:
    return value if spec.dtype == lowering.compute_dtype else op.cast(value, spec.dtype)


def _bsnh_to_bnsh(op: OpBuilder, value: ir.Value) -> ir.Value:
    return op.op("Transpose", value, perm=[0, 2, 1, 3])


@dataclasses.dataclass(frozen=True)
class _KeyColumns:
    """What attention reads: keys/values [B, Nkv, K, H or packed] in the cache's type."""

    keys: ir.Value
    values: ir.Value
    positions: ir.Value  # absolute position of each key column, int64 [B or 1, 1, 1, K]
    length: ir.Value | None  # K when column j holds position j; None otherwise
    present_key: ir.Value | None
    present_value: ir.Value | None
    cut: ir.Value | None = None  # 0-D bool: read only keys[:, :, :cut_end] (then K = cut end)
    cut_end: ir.Value | None = None


def _key_columns(
    op: OpBuilder,
    shared: SharedSubgraphs,
    info,
    node: ir.Node,
    spec: gqa.GqaSpec,
    lowering: Lowering,
    new_rows: tuple[ir.Value, ir.Value] | None,
    fast_paths: bool = False,
) -> _KeyColumns:
    """Choose how present is built and which columns attention reads (semantics doc §3-4, §11-12).

    * no past: the new rows are present and the keys;
    * shared KV (empty key/value): the past rows (cut at run time to the longest row);
    * windowed cache: Concat(past, new), present gathered from the latest positions;
    * growing-cache promise: present = Concat(past, new), guarded;
    * present read (or needed for bias/qk_output), a static buffer, or a key length
      decided at run time (0 or S): present with the new rows at c_b (chosen at run time,
      or ScatterND into past under the static promise); attention reads it whole or cut
      to the longest row (run time);
    * nobody reads present: Concat(past, new) with each column's position; no KV write.
    """
    pasts = (_input(node, gqa.PAST_KEY), _input(node, gqa.PAST_VALUE))
    # output_qk is a diagnostic: its scores come from one path over the whole buffer
    # (OpenVINO 2025 mis-shapes an If output whose width differs between branches).
    may_cut = fast_paths and not lowering.output_qk_used
    if not spec.has_past:
        return _new_rows_columns(shared, info, node, new_rows)
    if spec.kv_empty:
        return _shared_kv_columns(op, shared, info, pasts, lowering, may_cut)
    if spec.sliding_window_cache:
        return _windowed_columns(op, shared, info, pasts, new_rows, spec, lowering)
    if lowering.growing_kv_cache:
        return _growing_columns(op, shared, info, pasts, new_rows)
    # A key length of 0 or S (decided at run time) needs present: with no new rows it is past
    # (rows [0, t_b) attention reads, §11), with S rows the ordinary cache.
    needs_present = lowering.present_used or lowering.static_kv_cache or spec.kv_maybe_empty
    if needs_present or spec.has_attention_bias or spec.qk_output:
        return _written_columns(op, shared, info, pasts, new_rows, spec, lowering, fast_paths, may_cut)
    return _concat_columns(op, shared, info, pasts, new_rows, lowering)


def _new_rows_columns(shared: SharedSubgraphs, info, node: ir.Node, new_rows: tuple[ir.Value, ir.Value]) -> _KeyColumns:
    """No past (§3): the new rows are present and the keys, column j at position j."""
    new_key, new_value = new_rows
    length = info.query_length
    positions = dense_key_positions(shared, length, ("query_length", dim_key(node.inputs[gqa.QUERY], 1)))
    return _KeyColumns(new_key, new_value, positions, length, new_key, new_value)


def _growing_columns(
    op: OpBuilder,
    shared: SharedSubgraphs,
    info,
    pasts: tuple[ir.Value, ir.Value],
    new_rows: tuple[ir.Value, ir.Value],
) -> _KeyColumns:
    """The growing-cache promise: present = Concat(past, new) (guarded), read whole."""
    (past_key, past_value), (new_key, new_value) = pasts, new_rows
    present_key = append_aligned_rows(op, shared, info, past_key, new_key)
    present_value = append_aligned_rows(op, shared, info, past_value, new_value)
    length = present_length(shared, info, past_key)
    positions = dense_key_positions(shared, length, ("present_length", info, dim_key(past_key, 2), False))
    return _KeyColumns(present_key, present_value, positions, length, present_key, present_value)


def _written_columns(
    op: OpBuilder,
    shared: SharedSubgraphs,
    info,
    pasts: tuple[ir.Value, ir.Value],
    new_rows: tuple[ir.Value, ir.Value],
    spec: gqa.GqaSpec,
    lowering: Lowering,
    fast_paths: bool,
    may_cut: bool,
) -> _KeyColumns:
    """Present with the new rows written at c_b (:func:`_written_present`); attention reads its rows."""
    (present_key, present_value), rows_key = _written_present(
        op, shared, info, pasts, new_rows, spec, lowering, fast_paths
    )
    past_key = pasts[0]
    # Present is both what attention reads and the node's present output.
    return _buffer_columns(
        op,
        shared,
        info,
        past_key,
        present_key,
        present_value,
        present_key,
        present_value,
        rows_key,
        may_cut,
        lowering.shapes_from_shapes,
    )


def _concat_columns(
    op: OpBuilder,
    shared: SharedSubgraphs,
    info,
    pasts: tuple[ir.Value, ir.Value],
    new_rows: tuple[ir.Value, ir.Value],
    lowering: Lowering,
) -> _KeyColumns:
    """Nobody reads present: keys Concat(past, new) with each column's position; no KV write."""
    (past_key, past_value), (new_key, new_value) = pasts, new_rows
    keys = concat_rows(op, shared, past_key, new_key, lowering.skip_empty_past)
    values = concat_rows(op, shared, past_value, new_value, lowering.skip_empty_past)
    positions = concat_key_positions(shared, info, past_key)
    return _KeyColumns(keys, values, positions, None, None, None)


def _shared_kv_columns(
    op: OpBuilder, shared: SharedSubgraphs, info, pasts: tuple[ir.Value, ir.Value], lowering: Lowering, may_cut: bool
) -> _KeyColumns:
    """A KV-shared layer (empty key/value, §11): attention reads past; present, when read, is past."""
    past_key, past_value = pasts
    present_key = present_value = None
    if lowering.present_used:
        present_key = op.op("Identity", past_key)
        present_value = op.op("Identity", past_value)
    return _buffer_columns(
        op,
        shared,
        info,
        past_key,
        past_key,
        past_value,
        present_key,
        present_value,
        ("past", dim_key(past_key, 2)),
        may_cut,
        lowering.shapes_from_shapes,
    )


def _windowed_columns(
    op: OpBuilder,
    shared: SharedSubgraphs,
    info,
    pasts: tuple[ir.Value, ir.Value],
    new_rows: tuple[ir.Value, ir.Value],
    spec: gqa.GqaSpec,
    lowering: Lowering,
) -> _KeyColumns:
    """A windowed cache (§12): keys Concat(past, new); present gathered from the latest positions."""
    (past_key, past_value), (new_key, new_value) = pasts, new_rows
    keys = concat_rows(op, shared, past_key, new_key, lowering.skip_empty_past)
    values = concat_rows(op, shared, past_value, new_value, lowering.skip_empty_past)
    present_key = present_value = None
    plain = lowering.plain_index_ops
    if lowering.present_used:
        window, heads = spec.local_window_size, spec.kv_num_heads
        rows = present_columns(shared, info, past_key, window, heads, int32_div=plain, full_indices=plain)
        batch_dims = {} if plain else {"batch_dims": 2}
        present_key = op.op("GatherND", keys, rows, **batch_dims)
        present_value = op.op("GatherND", values, rows, **batch_dims)
    positions = sliding_key_positions(shared, info, past_key, spec.local_window_size, plain)
    return _KeyColumns(keys, values, positions, None, present_key, present_value)


def _written_present(
    op: OpBuilder,
    shared: SharedSubgraphs,
    info,
    pasts: tuple[ir.Value, ir.Value],
    new_rows: tuple[ir.Value, ir.Value],
    spec: gqa.GqaSpec,
    lowering: Lowering,
    fast_paths: bool,
) -> tuple[tuple[ir.Value, ir.Value], tuple]:
    """(present key and value with the new rows written at c_b, the key of the rows attention may read)."""
    past_key, past_value = pasts
    new_key, new_value = new_rows
    tensor_scatter = lowering.tensor_scatter
    if lowering.static_kv_cache and fast_paths:
        presents = write_into_buffer(op, shared, info, pasts, new_rows, spec.kv_num_heads, tensor_scatter)
        return presents, ("past", dim_key(past_key, 2))
    if lowering.static_kv_cache:
        form = CacheWrite(widen_quantized=lowering.widen_buffer_write)
        presents = tuple(
            write_new_rows(op, shared, info, past, new, spec.kv_num_heads, True, tensor_scatter, form)
            for past, new in ((past_key, new_key), (past_value, new_value))
        )
        return presents, ("past", dim_key(past_key, 2))
    presents = update_cache(
        op,
        shared,
        info,
        pasts,
        new_rows,
        spec.kv_num_heads,
        fast_paths,
        tensor_scatter,
        lowering.cache_write,
    )
    return presents, ("present_length", dim_key(past_key, 2))


def _cache_codec(
    op: OpBuilder, node: ir.Node, spec: gqa.GqaSpec, lowering: Lowering, scale_index: int, head_size: HeadSize
):
    """(encode, decode): new rows in the model's type -> the cache's type -> the compute type.

    ``encode(x)`` builds with ``op``; ``decode(builder, x)`` builds with the builder
    given, so attention can decode inside a run-time branch, after cutting the rows
    it reads (a cast or dequantization of a whole max-length buffer costs a copy of it).
    """
    if spec.kv_quant is None:
        return (lambda x: x), (lambda builder, x: _to_compute(builder, x, spec, lowering))
    layout = dict(
        per_channel=spec.kv_quant == "PER_CHANNEL",
        bits=spec.kv_bits,
        kv_num_heads=spec.kv_num_heads,
        head_size=head_size,
    )
    scale = node.inputs[scale_index]

    # Quantization math is fp32 whatever the compute type, as in ORT's kernel.
    def to_fp32(x: ir.Value) -> ir.Value:
        return x if spec.dtype == _FLOAT else op.cast(x, _FLOAT)

    def fp32_to_compute(builder: OpBuilder, x: ir.Value) -> ir.Value:
        return x if lowering.compute_dtype == _FLOAT else builder.cast(x, lowering.compute_dtype)

    return (
        lambda x: quantize(op, to_fp32(x), scale, **layout),
        lambda builder, q: fp32_to_compute(builder, dequantize(builder, q, scale, **layout)),
    )


def _buffer_columns(
    op: OpBuilder,
    shared: SharedSubgraphs,
    info,
    past_key: ir.Value,
    keys: ir.Value,
    values: ir.Value,
    present_key: ir.Value | None,
    present_value: ir.Value | None,
    rows_key: tuple,
    may_cut: bool,
    whole: bool = False,
) -> _KeyColumns:
    """Dense key columns of a buffer that may hold more rows than any query sees.

    The buffer has max(P, T) rows (P for past itself); attention reads them
    all or, when that is much more than the longest row and ``may_cut``, a
    copy of that row's length (chosen at run time, see :func:`read_length`).
    Past itself is read to the longest row's length (a length from data) unless
    ``whole`` (the webnn profile: shapes from shapes only); the mask hides the rest.
    """
    if rows_key[0] == "past":
        buffer_rows = shared.get(("past_rows", rows_key), lambda builder: builder.dim(past_key, 2))
        # A past of no rows (statically) has nothing to cut, and ORT cannot type the whole-buffer
        # branch: its Reshape of 0-column scores to [0, N, -1, 0] has no -1.
        may_cut = may_cut and not (past_key.shape is not None and past_key.shape[2] == 0)
    else:
        buffer_rows = present_length(shared, info, past_key)
    if not may_cut:
        if rows_key[0] == "past" and not whole:
            # Past itself (a static buffer): only the longest row's rows, always.
            longest = longest_row(shared, info)
            end_1 = op.to_vector(longest)
            keys, values = op.slice(keys, 0, end_1, axis=2), op.slice(values, 0, end_1, axis=2)
            positions = dense_key_positions(shared, longest, ("longest_row", info))
            return _KeyColumns(keys, values, positions, longest, present_key, present_value)
        positions = dense_key_positions(shared, buffer_rows, ("buffer_rows", info, rows_key))
        return _KeyColumns(keys, values, positions, buffer_rows, present_key, present_value)
    cut, length, cut_end = read_length(shared, info, buffer_rows, rows_key)
    positions = dense_key_positions(shared, length, ("read_length", info, rows_key))
    return _KeyColumns(keys, values, positions, length, present_key, present_value, cut, cut_end)


def _gather_columns(op: OpBuilder, info, bias: ir.Value, key_positions: ir.Value) -> ir.Value:
    """bias[b', n', s, kpos[b, k]] for every key column k, [B, N or 1, S, K].

    Positions that are never visible are clamped to a valid column; the mask hides them.
    """
    last_column = op.op("Sub", info.total_length, op.int_scalar(1))
    positions_B11K = op.op("Min", key_positions, last_column)
    bias_shape = op.op("Shape", bias)
    full_shape = op.op("Concat", info.batch_size_1, op.slice(bias_shape, 1, 4, axis=0), axis=0)
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


def _causal_op_suffices(spec: gqa.GqaSpec, lowering: Lowering) -> bool:
    """Whether Attention's own is_causal, with no visibility mask, is exact for this node.

    No past: every row's queries are a first prompt (c_b = 0, top-left causal) and a
    valid query s < t_b sees only keys <= s < t_b. Growing-cache promise: c_b = P for
    every row (guarded), so the op's Concat(past, new) is present and its bottom-right
    causal (offset P) is GQA's. A window, a quantized cache or qk_output need the mask;
    a layer whose present nobody reads attends over Concat(past, new) with the mask.
    """
    return (
        spec.causal
        and spec.local_window_size < 0
        and not spec.qk_output
        and spec.kv_quant is None
        and not spec.smooth_softmax
        # The op takes past and present together (ORT rejects past without present).
        and (not spec.has_past or (lowering.growing_kv_cache and lowering.present_used))
    )


def _expand_causal_op(
    op: OpBuilder,
    shared: SharedSubgraphs,
    info,
    node: ir.Node,
    spec: gqa.GqaSpec,
    lowering: Lowering,
    query_BNSH: ir.Value,
    key_BSNH: ir.Value,
    value_BSNH: ir.Value,
    head_size: HeadSize,
) -> ExpandedNode:
    """One Attention with is_causal=1 and no visibility mask (see :func:`_causal_op_suffices`)."""
    new_key, new_value = _bsnh_to_bnsh(op, key_BSNH), _bsnh_to_bnsh(op, value_BSNH)
    past = None
    if spec.has_past:
        new_key = guard_aligned_rows(op, shared, info, node.inputs[gqa.PAST_KEY], new_key)
        new_value = guard_aligned_rows(op, shared, info, node.inputs[gqa.PAST_VALUE], new_value)
        past = (
            _to_compute(op, node.inputs[gqa.PAST_KEY], spec, lowering),
            _to_compute(op, node.inputs[gqa.PAST_VALUE], spec, lowering),
        )
    bias = _input(node, gqa.ATTENTION_BIAS)  # [.., S, T] and T is the key count on this path
    attention = attention_op(
        op,
        query_BNSH,
        _to_compute(op, new_key, spec, lowering),
        _to_compute(op, new_value, spec, lowering),
        None if bias is None else _to_compute(op, bias, spec, lowering),
        num_heads=spec.num_heads,
        head_size=head_size,
        scale=spec.scale,  # None: the op's default, 1/sqrt(H) of its query
        softcap=spec.softcap,
        is_causal=True,
        past=past,
    )
    output = _from_compute(op, attention.output_BSD, spec, lowering)
    if not lowering.present_used:
        return ExpandedNode((output, None, None, None))
    if past is None:
        present_key, present_value = new_key, new_value
    else:
        present_key = _from_compute(op, attention.present_key, spec, lowering)
        present_value = _from_compute(op, attention.present_value, spec, lowering)
    return ExpandedNode((output, present_key, present_value, None))


def _attend_with_op(
    op: OpBuilder,
    shared: SharedSubgraphs,
    info,
    spec: gqa.GqaSpec,
    lowering: Lowering,
    query_BNSH: ir.Value,
    keys_BNkvKH: ir.Value,
    values_BNkvKH: ir.Value,
    columns_length: ir.Value | None,
    visible_B1SK: ir.Value,
    bias_BNSK: ir.Value | None,
    sink_N: ir.Value | None,
    head_size: HeadSize,
) -> tuple[ir.Value, ir.Value | None]:
    """(output [B, S, N*H], output_qk [B, N, S, T]) from one Attention op.

    The mask is the shared bool visibility (True = attend), or, with an attention
    bias, bias + the shared 0/-inf bias: softcap comes before it in both ops.
    qk_output=1 (scores after softcap and bias, masked entries 0) is mode 2 with
    the masked entries zeroed; qk_output=2 (probabilities) is mode 3.

    Smooth softmax and head sinks get one more key column (:func:`with_sink_column`),
    cut from output_qk.
    """
    attn_mask = _op_mask(op, shared, spec, lowering, query_BNSH, visible_B1SK, bias_BNSK)
    if spec.smooth_softmax:
        keys_BNkvKH, values_BNkvKH, attn_mask = with_sink_column(
            op, keys_BNkvKH, values_BNkvKH, attn_mask, sink_N, spec.num_heads, lowering.compute_dtype
        )
    qk_mode = None
    if lowering.output_qk_used:
        qk_mode = QK_AFTER_MASK if spec.qk_output == 1 else QK_AFTER_SOFTMAX
    attention = attention_op(
        op,
        query_BNSH,
        keys_BNkvKH,
        values_BNkvKH,
        attn_mask,
        num_heads=spec.num_heads,
        head_size=head_size,
        scale=spec.scale,  # None: the op's default, 1/sqrt(H) of its query
        softcap=spec.softcap,
        is_causal=False,
        qk_mode=qk_mode,
    )
    if attention.qk_BNSK is None:
        return attention.output_BSD, None
    qk_BNST = _op_qk_columns(op, info, spec, lowering, attention.qk_BNSK, columns_length, visible_B1SK)
    return attention.output_BSD, qk_BNST


def _op_mask(
    op: OpBuilder,
    shared: SharedSubgraphs,
    spec: gqa.GqaSpec,
    lowering: Lowering,
    query_BNSH: ir.Value,
    visible_B1SK: ir.Value,
    bias_BNSK: ir.Value | None,
) -> ir.Value:
    """The Attention op's mask: the bool visibility, or bias + its 0/-inf bias (smooth softmax: the 0/-inf bias)."""
    attn_mask = visible_B1SK
    if not spec.causal:
        # Without causality visibility does not depend on the query row ([B, 1, 1, K]);
        # ORT 1.31 requires the mask's query axis to be S itself, not 1.
        rows = op.op("Concat", op.ints([1, 1]), op.to_vector(op.dim(query_BNSH, 2)), op.ints([1]), axis=0)
        attn_mask = op.op("Expand", attn_mask, rows)
    if bias_BNSK is not None:
        return op.op("Add", bias_BNSK, mask_bias(shared, attn_mask, lowering.compute_dtype))
    if spec.smooth_softmax:
        # The sink column's mask entry is the sink's logit: the mask must be a float bias.
        return mask_bias(shared, attn_mask, lowering.compute_dtype)
    return attn_mask


def _op_qk_columns(
    op: OpBuilder,
    info,
    spec: gqa.GqaSpec,
    lowering: Lowering,
    qk_BNSK: ir.Value,
    columns_length: ir.Value | None,
    visible_B1SK: ir.Value,
) -> ir.Value:
    """output_qk [B, N, S, T] from the op's qk_matmul_output [B, N, S, K (+ sink)]: masked scores zeroed."""
    # Cut to T columns first (K >= T; a sink column sits at K, so it goes too). ORT 1.31's
    # shape inference declares qk_matmul_output's last axis 0 when K's length is symbolic,
    # so any broadcast with a statically known mask fails; T comes from data, which it
    # cannot infer.
    qk_BNST = _fit_columns(op, qk_BNSK, columns_length, info.total_length)
    if spec.qk_output == 1:
        visible_B1ST = op.slice(visible_B1SK, 0, op.to_vector(info.total_length), axis=3)
        qk_BNST = op.op("Where", visible_B1ST, qk_BNST, op.float_scalar(0.0, lowering.compute_dtype))
    return qk_BNST


def _rotary_table_2d(shared: SharedSubgraphs, cache: ir.Value) -> ir.Value:
    """A cos/sin table of rank > 2 as ORT reads it: flat, in rows of shape[1] values."""
    if cache.shape is None or len(cache.shape) <= 2:
        return cache

    def build(builder: OpBuilder) -> ir.Value:
        width_1 = builder.slice(builder.op("Shape", cache), 1, 2, axis=0)
        return builder.op("Reshape", cache, builder.op("Concat", builder.ints([-1]), width_1, axis=0))

    return shared.get(("rotary_table_2d", cache), build)


def _rotations(
    op: OpBuilder,
    shared: SharedSubgraphs,
    info,
    node: ir.Node,
    spec: gqa.GqaSpec,
    lowering: Lowering,
    head_size: HeadSize,
):
    """(rotate, rotate_key) for :func:`_split_heads`: rotary on q and the new k in the compute type, both
    rounded to the model's type, as ORT does; (None, None) without rotary."""
    # A zero-width table (R = 0) rotates nothing: ORT's kernel copies every dim, and
    # RotaryEmbedding-23 would reject the table.
    if not spec.do_rotary or spec.rotary_half == 0:
        return None, None
    # RotaryEmbedding-23 needs R static (its rotary_embedding_dim attribute).
    # RotaryEmbedding-23 when the rotary width is static (the attention target implies opset >= 23).
    use_rotary_op = lowering.attention_op and spec.rotary_half is not None
    build = build_rotary_op_inputs if use_rotary_op else build_rotary_tables
    tables = build(
        shared,
        info,
        _rotary_table_2d(shared, node.inputs[gqa.COS_CACHE]),
        _rotary_table_2d(shared, node.inputs[gqa.SIN_CACHE]),
        _input(node, gqa.POSITION_IDS),
        spec.rotary_half,
        lowering.compute_dtype,
    )

    def rotate_with(tables, may_be_empty: bool = False):
        def rotate(x_BSnH: ir.Value, heads: int) -> ir.Value:
            x_BSnH = _to_compute(op, x_BSnH, spec, lowering)
            if use_rotary_op:  # its reshapes are explicit: fine with no rows
                rotated = apply_rotary_op(op, x_BSnH, tables, heads, head_size, spec.rotary_interleaved)
            else:
                rotated = apply_rotary(op, shared, x_BSnH, tables, head_size, spec.rotary_interleaved, may_be_empty)
            return _from_compute(op, rotated, spec, lowering)

        return rotate

    rotate_key = None
    if spec.kv_maybe_empty:
        rotate_key = rotate_with(new_rows_tables(shared, info, tables), may_be_empty=True)
    return rotate_with(tables), rotate_key


def _bias_columns(op: OpBuilder, info, node: ir.Node, spec: gqa.GqaSpec, lowering: Lowering, columns: _KeyColumns):
    """attention_bias [.., S, K] in the compute type, one column per key column; None without a bias."""
    bias = _input(node, gqa.ATTENTION_BIAS)
    if bias is None:
        return None
    if columns.length is None:
        # Bias columns are absolute key positions; pick each key column's.
        return _gather_columns(op, info, _to_compute(op, bias, spec, lowering), columns.positions)
    # Bias columns are absolute key positions 0..T-1; the key columns may be more or fewer.
    fitted = _fit_columns(op, _to_compute(op, bias, spec, lowering), info.total_length, columns.length)
    return op.with_static_dims(fitted, bias, axis=3)


def _attend_primitives(
    op: OpBuilder,
    shared: SharedSubgraphs,
    info,
    node: ir.Node,
    spec: gqa.GqaSpec,
    lowering: Lowering,
    query_BNSH: ir.Value,
    columns: _KeyColumns,
    visible_B1SK: ir.Value,
    bias_BNSK: ir.Value | None,
    decode,
    fast_paths: bool,
    head_size: HeadSize,
) -> tuple[ir.Value, ir.Value | None]:
    """(output [B, S, N*H], output_qk [B, N, S, T] or None) from MatMul/Softmax/..."""
    plan = _read_plan(shared, info, node, spec, columns, fast_paths)
    # The shared 0/-inf bias before the scale: the order in which shared subgraphs are built names them.
    mask_bias_B1SK = mask_bias(shared, visible_B1SK, lowering.compute_dtype)
    attention = attend(
        op,
        query_BNSH,
        columns.keys,
        columns.values,
        visible_B1SK,
        mask_bias_B1SK,
        _scoring(shared, node, spec, lowering, head_size),
        bias_BNSK=bias_BNSK,
        want_scores=lowering.output_qk_used and spec.qk_output == 1,
        want_probs=lowering.output_qk_used and spec.qk_output == 2,
        plan=plan,
        decode=decode,
    )
    if not lowering.output_qk_used:
        return attention.output_BSD, None
    chosen = attention.scores_BNSK if spec.qk_output == 1 else attention.probs_BNSK
    # Columns >= T do not exist in output_qk; columns in [t_b, T) are masked, so 0.
    return attention.output_BSD, _fit_columns(op, chosen, columns.length, info.total_length)


def _read_plan(
    shared: SharedSubgraphs, info, node: ir.Node, spec: gqa.GqaSpec, columns: _KeyColumns, fast_paths: bool
) -> ReadPlan:
    """Which key columns primitives read: a cut of a long buffer and, under --fast-paths, causal row blocks."""
    plan = ReadPlan(columns.cut, columns.cut_end)
    query_length = node.inputs[gqa.QUERY].shape[1] if node.inputs[gqa.QUERY].shape is not None else None
    if not (fast_paths and columns.length is not None and spec.causal):
        return plan
    tiers = causal_row_blocks(shared, info, columns.length)
    if isinstance(query_length, int):
        # S is known: the tier it reaches (if any) is chosen here, without an If.
        # Not in the default graph: tract cannot type the blocks' data-dependent slices.
        reached = [tier for tier in tiers if query_length >= tier.minimum]
        return dataclasses.replace(plan, row_block_tiers=tuple(reached[:1]), row_blocks_known=True)
    return dataclasses.replace(plan, row_block_tiers=tiers)


def _scoring(
    shared: SharedSubgraphs, node: ir.Node, spec: gqa.GqaSpec, lowering: Lowering, head_size: HeadSize
) -> Scoring:
    """The node's attention arithmetic for :func:`attend`, in the compute type."""
    return Scoring(
        num_heads=spec.num_heads,
        kv_num_heads=spec.kv_num_heads,
        head_size=head_size,
        scale=default_scale(shared, head_size, lowering.compute_dtype) if spec.scale is None else spec.scale,
        softcap=spec.softcap,
        smooth_softmax=spec.smooth_softmax,
        head_sink_N=_input(node, gqa.HEAD_SINK),
        may_mask_whole_rows=_input(node, gqa.ATTENTION_BIAS) is not None or spec.local_window_size == 0,
        dtype=lowering.compute_dtype,
        prescale=lowering.prescale_query,
    )


def _head_size(shared: SharedSubgraphs, node: ir.Node, spec: gqa.GqaSpec) -> HeadSize:
    """H: static from the contract, or read from the query at run time, as ORT reads it."""
    if spec.head_size is not None:
        return spec.head_size
    query_heads = spec.num_heads + 2 * spec.kv_num_heads if spec.packed_qkv else spec.num_heads
    return runtime_head_size(shared, node.inputs[gqa.QUERY], query_heads)


def _encoded_new_rows(
    op: OpBuilder,
    node: ir.Node,
    spec: gqa.GqaSpec,
    lowering: Lowering,
    head_size: HeadSize,
    key_BSNH: ir.Value | None,
    value_BSNH: ir.Value | None,
):
    """(new key and value rows [B, Nkv, Skv, H] in the cache's type, or None; (decode_key, decode_value))."""
    encode_key, decode_key = _cache_codec(op, node, spec, lowering, gqa.K_SCALE, head_size)
    encode_value, decode_value = _cache_codec(op, node, spec, lowering, gqa.V_SCALE, head_size)
    new_rows = None
    if key_BSNH is not None:
        new_rows = (
            encode_key(_bsnh_to_bnsh(op, key_BSNH)),
            encode_value(_bsnh_to_bnsh(op, value_BSNH)),
        )
    return new_rows, (decode_key, decode_value)


def _attention_outputs(
    op: OpBuilder,
    shared: SharedSubgraphs,
    info,
    node: ir.Node,
    spec: gqa.GqaSpec,
    lowering: Lowering,
    query_BNSH: ir.Value,
    columns: _KeyColumns,
    visible_B1SK: ir.Value,
    decode,
    head_size: HeadSize,
) -> tuple[ir.Value, ir.Value | None]:
    """(output [B, S, N*H], output_qk [B, N, S, T] or None) in the compute type, from the key columns
    and the shared mask: one Attention op, or primitives (which decode the columns they read)."""
    bias_BNSK = _bias_columns(op, info, node, spec, lowering, columns)
    if lowering.attention_op:
        decode_key, decode_value = decode
        return _attend_with_op(
            op,
            shared,
            info,
            spec,
            lowering,
            query_BNSH,
            decode_key(op, columns.keys),
            decode_value(op, columns.values),
            columns.length,
            visible_B1SK,
            bias_BNSK,
            _input(node, gqa.HEAD_SINK),
            head_size,
        )
    # Only here --fast-paths applies (see expand_gqa): its run-time Ifs choose the columns primitives read.
    return _attend_primitives(
        op,
        shared,
        info,
        node,
        spec,
        lowering,
        query_BNSH,
        columns,
        visible_B1SK,
        bias_BNSK,
        decode,
        lowering.fast_paths,
        head_size,
    )


def expand_gqa(
    op: OpBuilder,
    shared: SharedSubgraphs,
    node: ir.Node,
    spec: gqa.GqaSpec,
    lowering: Lowering | None = None,
) -> ExpandedNode:
    """Build the standard-op subgraph of ``node``; nodes land in ``op`` and ``shared``."""
    lowering = lowering or Lowering.of(node, spec)
    info = build_sequence_info(
        shared,
        node.inputs[gqa.SEQLENS_K],
        node.inputs[gqa.TOTAL_SEQUENCE_LENGTH],
        node.inputs[gqa.QUERY],
        always_first_prompt=not spec.has_past,
        key=node.inputs[gqa.KEY] if spec.kv_maybe_empty else None,
    )

    head_size = _head_size(shared, node, spec)

    # 1. Rotary on q and the new k in the compute type; both rounded to the model's type, as ORT does.
    rotate, rotate_key = _rotations(op, shared, info, node, spec, lowering, head_size)
    norm_op = not lowering.norm_by_primitives
    query_BSNH, key_BSNH, value_BSNH = _split_heads(op, node, spec, head_size, rotate, rotate_key, norm_op)
    query_BNSH = _to_compute(op, _bsnh_to_bnsh(op, query_BSNH), spec, lowering)

    if lowering.attention_op and _causal_op_suffices(spec, lowering):
        return _expand_causal_op(op, shared, info, node, spec, lowering, query_BNSH, key_BSNH, value_BSNH, head_size)

    # 2. The new rows in the cache's type; the key columns attention reads; present.
    new_rows, decode = _encoded_new_rows(op, node, spec, lowering, head_size, key_BSNH, value_BSNH)
    # The run-time Ifs of --fast-paths serve the primitives target; the Attention op is one node.
    fast_paths = lowering.fast_paths and not lowering.attention_op
    columns = _key_columns(op, shared, info, node, spec, lowering, new_rows, fast_paths)

    # 3. The shared mask.
    visible_B1SK = visibility_mask(shared, info, columns.positions, spec.local_window_size, spec.causal)

    # 4. Attention in the compute type (fp32 unless native precision).
    output_BSD, output_qk = _attention_outputs(
        op, shared, info, node, spec, lowering, query_BNSH, columns, visible_B1SK, decode, head_size
    )
    output = _from_compute(op, output_BSD, spec, lowering)
    if output_qk is not None:
        output_qk = _from_compute(op, output_qk, spec, lowering)

    return ExpandedNode((output, columns.present_key, columns.present_value, output_qk))
