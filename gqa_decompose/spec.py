"""The contract of com.microsoft.GroupQueryAttention: parse and validate one node into a frozen spec.

Every refusal happens here, before any graph is touched: a feature the
expansion cannot reproduce exactly raises :class:`GqaDecomposeError` naming the
node and the feature. The meaning of each field follows
``docs/gqa-semantics.md`` (ONNX Runtime 1.31 CPU).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import onnx_ir as ir

from gqa_decompose.errors import GqaDecomposeError
from gqa_decompose.opsets import ATTENTION_MIN_OPSET

__all__ = [
    "GQA_DOMAIN",
    "GQA_OP_TYPE",
    "TARGETS",
    "DecomposeOptions",
    "GqaSpec",
    "attention_target_obstacle",
    "is_gqa_node",
    "output_is_read",
    "parse_gqa_node",
    "resolve_target",
]

GQA_DOMAIN = "com.microsoft"
GQA_OP_TYPE = "GroupQueryAttention"

# Input positions (semantics doc §1).
QUERY, KEY, VALUE, PAST_KEY, PAST_VALUE = 0, 1, 2, 3, 4
SEQLENS_K, TOTAL_SEQUENCE_LENGTH, COS_CACHE, SIN_CACHE = 5, 6, 7, 8
POSITION_IDS, ATTENTION_BIAS, HEAD_SINK, K_SCALE, V_SCALE = 9, 10, 11, 12, 13
Q_NORM_WEIGHT, K_NORM_WEIGHT = 14, 15
# Output positions.
OUTPUT, PRESENT_KEY, PRESENT_VALUE, OUTPUT_QK = 0, 1, 2, 3

_KNOWN_ATTRIBUTES = frozenset(
    {
        "num_heads",
        "kv_num_heads",
        "scale",
        "do_rotary",
        "rotary_interleaved",
        "local_window_size",
        "smooth_softmax",
        "softcap",
        "qk_output",
        "k_quant_type",
        "v_quant_type",
        "kv_cache_bit_width",
        "qk_norm_epsilon",
        "sliding_window_cache",
        "causal",
    }
)
_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)

TARGETS = ("primitives", "attention")
# The standard Attention op (and RotaryEmbedding) first exist in opset 23.


@dataclasses.dataclass(frozen=True)
class DecomposeOptions:
    """User choices that change what a GQA node is taken to mean.

    Attributes:
        legacy_window: read ``local_window_size`` W as ONNX Runtime <= 1.23 did
            (W + 1 visible keys) instead of the current meaning (W keys).
            For models exported for an old ONNX Runtime.
        native_precision: compute fp16/bf16 attention in that type instead of
            fp32 (ORT's CPU kernel computes in fp32): fewer casts, results within
            a few fp16/bf16 ulps of ORT instead of matching its rounding.
        static_kv_cache: promise that past is always a max-length buffer
            (T <= P), as onnxruntime-genai's past_present_share_buffer gives it:
            present is ScatterND(past, new rows) without the run-time choice of
            the default (in place when present is bound to past). A growing
            cache then fails at run time (ScatterND index out of range) instead
            of computing anything wrong.
        growing_kv_cache: promise that past grows by the new rows (T = P + S)
            and every batch row is as long as the longest after a first prompt
            (batch 1, or equal lengths): present is then Concat(past, new)
            without the run-time choice. A run that breaks the promise fails (a
            guarded Reshape).
        fast_paths: emit If nodes that choose at run time what ONNX Runtime
            runs fastest: causal row blocks for long prompts (the masked upper
            triangle is not computed), a copy of the visible rows of a long
            buffer instead of attending over all of it, and, without a
            promise, a one-copy cache update (Concat, or ScatterND straight
            into past). Runtimes that type both branches of an If alike
            (tract) cannot run them; OpenVINO and ONNX Runtime can. Primitives
            target only.
        target: ``"primitives"`` (MatMul/Softmax/...) or ``"attention"``: one
            standard ``Attention`` op (opset >= 23) per node, with rotary as
            RotaryEmbedding-23 and, at opset 24, the cache written by
            TensorScatter. A node the Attention op cannot express exactly falls
            back to primitives (see :func:`attention_target_obstacle`).
        strict_target: refuse (GqaDecomposeError) a node that would fall back
            instead of decomposing it into primitives.
        raise_opset: with the attention target, raise a model's default-domain
            opset import from 20-22 to 23 when no op the model uses changes
            meaning (see ``raise_opset.py``); otherwise its nodes fall back.
        ops: the op types to decompose (``GroupQueryAttention`` and the companion
            ops of :mod:`gqa_decompose.ops`); None, the default: every op the tool knows.
    """

    legacy_window: bool = False
    static_kv_cache: bool = False
    growing_kv_cache: bool = False
    native_precision: bool = False
    fast_paths: bool = False
    target: str = "primitives"
    strict_target: bool = False
    raise_opset: bool = False
    ops: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.ops is not None:
            object.__setattr__(self, "ops", tuple(self.ops))  # frozen, hashable: a list given becomes a tuple
            from gqa_decompose.ops import decomposers  # here: the op modules import the expansion

            known = {"GroupQueryAttention", *(op_type for _, op_type in decomposers())}
            unknown = sorted(set(self.ops) - known)
            if unknown:
                raise GqaDecomposeError(
                    f"unknown op type(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
                )
        if self.static_kv_cache and self.growing_kv_cache:
            raise GqaDecomposeError("static_kv_cache and growing_kv_cache promise opposite things")
        if self.target not in TARGETS:
            raise GqaDecomposeError(f"target must be one of {', '.join(TARGETS)}, got {self.target!r}")

    def decomposes(self, op_type: str) -> bool:
        """Whether ``op_type`` is among the ops to decompose."""
        return self.ops is None or op_type in self.ops


@dataclasses.dataclass(frozen=True)
class GqaSpec:
    """Everything the expansion needs to know about one GQA node, validated.

    Dimension names: B batch, S query length, N query heads, Nkv KV heads,
    G = N / Nkv, H head size, P past length, T total sequence length.
    """

    node_name: str
    dtype: ir.DataType
    compute_dtype: ir.DataType  # fp32, or the model's type with native_precision
    num_heads: int
    kv_num_heads: int
    head_size: int
    scale: float
    packed_qkv: bool
    has_past: bool
    kv_empty: bool  # key/value given with sequence length 0 (KV-shared layer, §11)
    do_rotary: bool
    rotary_interleaved: bool
    rotary_half: int | None  # cos_cache.shape[1] when known statically
    local_window_size: int  # effective number of visible keys; < 0 means no window
    softcap: float  # <= 0 means off
    smooth_softmax: bool  # also true when head_sink is given
    has_head_sink: bool
    has_attention_bias: bool
    has_position_ids: bool
    qk_output: int
    causal: bool
    static_kv_cache: bool  # promised T <= P: present has exactly P rows
    growing_kv_cache: bool  # promised T = P + S with aligned rows: present = Concat(past, new)
    sliding_window_cache: bool  # past/present hold the last tokens only (semantics §12)
    kv_quant: str | None  # None, "PER_TENSOR" or "PER_CHANNEL" (semantics §13)
    kv_bits: int  # 8 (int8 cache) or 4 (two nibbles per uint8); 0 when not quantized
    present_used: bool  # present_key/present_value exist and someone reads them
    output_qk_used: bool
    fast_paths: bool = False  # run-time Ifs: row blocks, cut of long buffers, one-copy cache update
    q_norm: bool = False  # q_norm_weight given: per-head RMS norm of Q before rotary (§16)
    k_norm: bool = False  # k_norm_weight given: the same for the new K
    qk_norm_epsilon: float = 1e-6

    @property
    def group_size(self) -> int:
        return self.num_heads // self.kv_num_heads

    def features(self) -> list[str]:
        """Short names of what this node does, for reports."""
        names = ["packed QKV" if self.packed_qkv else "separate QKV"]
        if self.kv_empty:
            names.append("shared KV (empty key/value)")
        elif self.sliding_window_cache:
            names.append("sliding-window KV cache")
        elif self.has_past:
            if self.static_kv_cache:
                names.append("static KV buffer")
            elif self.growing_kv_cache:
                names.append("growing KV cache")
            else:
                names.append("past KV")
        if self.kv_quant:
            names.append(f"int{self.kv_bits} {self.kv_quant.lower().replace('_', '-')} KV cache")
        if self.q_norm or self.k_norm:
            normed = "/".join(name for name, on in (("q", self.q_norm), ("k", self.k_norm)) if on)
            names.append(f"{normed} RMS norm")
        if self.do_rotary:
            layout = "interleaved" if self.rotary_interleaved else "half"
            names.append(f"rotary ({layout})")
        if self.has_position_ids:
            names.append("position_ids")
        if self.local_window_size >= 0:
            names.append(f"window {self.local_window_size}")
        if self.softcap > 0:
            names.append(f"softcap {self.softcap:g}")
        if self.has_head_sink:
            names.append("head sink")
        elif self.smooth_softmax:
            names.append("smooth softmax")
        if self.has_attention_bias:
            names.append("attention bias")
        if not self.causal:
            names.append("causal=0")
        if self.qk_output:
            names.append(f"qk_output={self.qk_output}")
        names.append(self.dtype.name.lower())
        if self.compute_dtype != ir.DataType.FLOAT:
            names.append(f"computed in {self.compute_dtype.name.lower()}")
        return names


def is_gqa_node(node: ir.Node) -> bool:
    return node.op_type == GQA_OP_TYPE and node.domain == GQA_DOMAIN


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if index < len(node.inputs) else None


def output_is_read(node: ir.Node, index: int) -> bool:
    """Whether output ``index`` exists and a node or its graph's (or function's) outputs read it."""
    if index >= len(node.outputs):
        return False
    value = node.outputs[index]
    if value is None or value.name == "":
        return False
    return bool(value.uses()) or value.is_graph_output()


def _attr(node: ir.Node, name: str, default: Any) -> Any:
    attr = node.attributes.get(name)
    if attr is None:
        return default
    if attr.is_ref():
        raise GqaDecomposeError(
            f"attribute '{name}' refers to a function attribute; inline the function first",
            node.name,
        )
    return attr.value


def _dims(value: ir.Value | None) -> tuple[int | str | None, ...] | None:
    if value is None or value.shape is None:
        return None
    return tuple(d if isinstance(d, int) else d.value for d in value.shape)


def parse_gqa_node(node: ir.Node, options: DecomposeOptions | None = None) -> GqaSpec:
    """Validate a GroupQueryAttention node and describe it as a :class:`GqaSpec`.

    Raises:
        GqaDecomposeError: the node is malformed, or uses a feature that cannot
            be expressed exactly in standard ONNX (the message names it).
    """
    options = options or DecomposeOptions()
    name = node.name or "<unnamed GroupQueryAttention>"

    def refuse(reason: str) -> GqaDecomposeError:
        return GqaDecomposeError(reason, name)

    unknown = sorted(set(node.attributes) - _KNOWN_ATTRIBUTES)
    if unknown:
        raise refuse(f"unknown attribute(s) {unknown}; ONNX Runtime 1.31 rejects them too")

    for required in ("num_heads", "kv_num_heads"):
        if required not in node.attributes:
            raise refuse(f"required attribute '{required}' is missing")
    num_heads = int(_attr(node, "num_heads", 0))
    kv_num_heads = int(_attr(node, "kv_num_heads", 0))
    if num_heads <= 0 or kv_num_heads <= 0:
        raise refuse(f"num_heads ({num_heads}) and kv_num_heads ({kv_num_heads}) must be > 0")
    if num_heads % kv_num_heads:
        raise refuse(f"num_heads ({num_heads}) is not a multiple of kv_num_heads ({kv_num_heads})")

    k_quant = _attr(node, "k_quant_type", "NONE")
    v_quant = _attr(node, "v_quant_type", "NONE")
    kv_bits = int(_attr(node, "kv_cache_bit_width", 0))
    for label, quant in (("k_quant_type", k_quant), ("v_quant_type", v_quant)):
        if quant not in ("NONE", "PER_TENSOR", "PER_CHANNEL"):
            raise refuse(f"{label} '{quant}' is not NONE, PER_TENSOR or PER_CHANNEL")
    if k_quant != v_quant:
        raise refuse(f"k_quant_type {k_quant} != v_quant_type {v_quant} (ORT CPU requires them equal)")
    kv_quant = None if k_quant == "NONE" else k_quant
    if kv_quant is None and kv_bits:
        raise refuse(f"kv_cache_bit_width must be 0 when the cache is not quantized, got {kv_bits}")
    if kv_quant is not None and kv_bits not in (4, 8):
        raise refuse(f"kv_cache_bit_width must be 4 or 8 for a quantized cache, got {kv_bits}")
    for index, label in ((K_SCALE, "k_scale"), (V_SCALE, "v_scale")):
        given = _input(node, index)
        if kv_quant is None and given is not None:
            raise refuse(f"input '{label}' is given but the KV cache is not quantized")
        if kv_quant is not None and given is None:
            raise refuse(f"input '{label}' must be provided when {label[0]}_quant_type is {kv_quant}")
        if given is not None and given.dtype not in (ir.DataType.FLOAT, None):
            raise refuse(f"input '{label}' must be float, got {given.dtype}")
    if len(node.inputs) > 16:
        raise refuse(f"has {len(node.inputs)} inputs; the op defines 16")
    if len(node.outputs) > 4:
        raise refuse(f"has {len(node.outputs)} outputs; the op defines 4")

    query = _input(node, QUERY)
    if query is None:
        raise refuse("input 'query' is missing")
    if query.dtype not in _FLOAT_TYPES:
        raise refuse(f"query type {query.dtype} is not float, float16 or bfloat16 (or is unknown)")
    dtype = query.dtype
    query_dims = _dims(query)
    if query_dims is None or len(query_dims) != 3:
        raise refuse(f"query must have a known rank-3 shape (B, S, hidden), got {query_dims}")
    query_hidden = query_dims[2]
    if not isinstance(query_hidden, int):
        raise refuse("query's last dimension (hidden size) must be static")

    key, value = _input(node, KEY), _input(node, VALUE)
    if (key is None) != (value is None):
        raise refuse("key and value must be both present or both absent (packed QKV)")
    packed_qkv = key is None
    if packed_qkv:
        if query_hidden % (num_heads + 2 * kv_num_heads):
            raise refuse(
                f"packed query hidden size {query_hidden} is not a multiple of "
                f"num_heads + 2*kv_num_heads = {num_heads + 2 * kv_num_heads}"
            )
        head_size = query_hidden // (num_heads + 2 * kv_num_heads)
    else:
        if query_hidden % num_heads:
            raise refuse(f"query hidden size {query_hidden} is not a multiple of num_heads {num_heads}")
        head_size = query_hidden // num_heads
    if head_size % 8:
        raise refuse(f"head size {head_size} is not a multiple of 8")

    kv_empty = False
    if not packed_qkv:
        for label, kv in (("key", key), ("value", value)):
            kv_dims = _dims(kv)
            if kv_dims is None or len(kv_dims) != 3:
                raise refuse(f"{label} must have a known rank-3 shape, got {kv_dims}")
            if kv.dtype != dtype:
                raise refuse(f"{label} type {kv.dtype} differs from query type {dtype}")
            if kv_dims[2] != kv_num_heads * head_size:
                raise refuse(
                    f"{label} hidden size {kv_dims[2]} != kv_num_heads*head_size "
                    f"= {kv_num_heads * head_size} (contradictory head counts?)"
                )
        key_length, value_length = _dims(key)[1], _dims(value)[1]
        if isinstance(key_length, int) and isinstance(value_length, int) and key_length != value_length:
            raise refuse(f"key sequence length {key_length} != value sequence length {value_length}")
        if not isinstance(key_length, int) and isinstance(value_length, int):
            key_length = value_length  # a partial shape: value's static length tells key's
        if key_length == 0:
            kv_empty = True
        elif not (isinstance(key_length, int) or key_length == query_dims[1]):
            raise refuse(
                f"key sequence length '{key_length}' is neither static nor the query's "
                f"'{query_dims[1]}': cannot tell a shared-KV layer (length 0) from a normal one"
            )
        elif isinstance(key_length, int) and isinstance(query_dims[1], int) and key_length != query_dims[1]:
            raise refuse(f"key sequence length {key_length} != query sequence length {query_dims[1]}")

    past_key, past_value = _input(node, PAST_KEY), _input(node, PAST_VALUE)
    if (past_key is None) != (past_value is None):
        raise refuse("past_key and past_value must be both present or both absent")
    has_past = past_key is not None
    if has_past:
        for label, past in (("past_key", past_key), ("past_value", past_value)):
            past_dims = _dims(past)
            if past_dims is None or len(past_dims) != 4:
                raise refuse(f"{label} must have a known rank-4 shape (B, Nkv, P, H), got {past_dims}")
            cache_dtype = {None: dtype, 8: ir.DataType.INT8, 4: ir.DataType.UINT8}[kv_bits or None]
            if past.dtype != cache_dtype:
                raise refuse(f"{label} type {past.dtype} is not the cache type {cache_dtype}")
            cache_width = head_size // 2 if kv_bits == 4 else head_size
            if any(
                isinstance(got, int) and got != expected
                for got, expected in ((past_dims[1], kv_num_heads), (past_dims[3], cache_width))
            ):
                raise refuse(
                    f"{label} shape {past_dims} does not match kv_num_heads={kv_num_heads}, "
                    f"head_size={head_size}"
                )
    if kv_empty and not has_past:
        raise refuse("empty key/value (shared KV) requires a past")
    if kv_quant is not None and not has_past:
        # ORT types present as T without a quantized past and its kernel then fails (§13).
        raise refuse("a quantized KV cache needs a past_key/past_value of the quantized type, even empty")

    for index, label in ((SEQLENS_K, "seqlens_k"), (TOTAL_SEQUENCE_LENGTH, "total_sequence_length")):
        given = _input(node, index)
        if given is None:
            raise refuse(f"required input '{label}' is missing")
        if given.dtype not in (ir.DataType.INT32, None):
            raise refuse(f"input '{label}' must be int32, got {given.dtype}")
    seqlens_dims = _dims(_input(node, SEQLENS_K))
    if seqlens_dims is not None and len(seqlens_dims) == 0:
        raise refuse("seqlens_k must be at least 1-D, got a scalar")

    cos_cache, sin_cache = _input(node, COS_CACHE), _input(node, SIN_CACHE)
    if (cos_cache is None) != (sin_cache is None):
        raise refuse("cos_cache and sin_cache must be both present or both absent")
    do_rotary = int(_attr(node, "do_rotary", 0)) == 1
    rotary_half: int | None = None
    if cos_cache is not None:
        if head_size % 16:
            raise refuse(f"head size {head_size} must be a multiple of 16 when cos/sin caches are given")
        cos_dims, sin_dims = _dims(cos_cache), _dims(sin_cache)
        if cos_dims is not None and len(cos_dims) != 2:
            raise refuse(f"cos_cache must be 2-D, got {cos_dims}")
        if cos_dims is not None and sin_dims is not None and cos_dims != sin_dims:
            raise refuse(f"cos_cache {cos_dims} and sin_cache {sin_dims} shapes differ")
        if cos_dims is not None and isinstance(cos_dims[1], int):
            rotary_half = cos_dims[1]
            if rotary_half > head_size // 2 or rotary_half % 8:
                raise refuse(
                    f"cos_cache dimension 1 ({rotary_half}) must be <= head_size/2 and a multiple of 8"
                )
        for label, cache in (("cos_cache", cos_cache), ("sin_cache", sin_cache)):
            if cache.dtype not in (dtype, None):
                raise refuse(f"{label} type {cache.dtype} differs from query type {dtype}")
    if do_rotary and cos_cache is None:
        raise refuse("do_rotary=1 requires cos_cache and sin_cache")

    position_ids = _input(node, POSITION_IDS)
    if position_ids is not None:
        position_dims = _dims(position_ids)
        if position_dims is not None and len(position_dims) != 2:
            # A 0-D position_ids aborts ONNX Runtime; anything but (B, >=S) is rejected.
            raise refuse(f"position_ids must be 2-D (B, >=S), got {position_dims}")

    attention_bias = _input(node, ATTENTION_BIAS)
    if attention_bias is not None:
        bias_dims = _dims(attention_bias)
        if bias_dims is not None and len(bias_dims) != 4:
            raise refuse(f"attention_bias must be 4-D (B or 1, N or 1, S, T), got {bias_dims}")
        if bias_dims is not None and isinstance(bias_dims[1], int) and bias_dims[1] not in (1, num_heads):
            raise refuse(f"attention_bias dimension 1 ({bias_dims[1]}) must be 1 or num_heads={num_heads}")
        if attention_bias.dtype not in (dtype, None):
            raise refuse(f"attention_bias type {attention_bias.dtype} differs from query type {dtype}")

    head_sink = _input(node, HEAD_SINK)
    if head_sink is not None:
        sink_dims = _dims(head_sink)
        if sink_dims is not None and sink_dims != (num_heads,) and not (
            len(sink_dims) == 1 and not isinstance(sink_dims[0], int)
        ):
            raise refuse(f"head_sink must have shape ({num_heads},), got {sink_dims}")

    for index, label in ((Q_NORM_WEIGHT, "q_norm_weight"), (K_NORM_WEIGHT, "k_norm_weight")):
        norm_weight = _input(node, index)
        if norm_weight is None:
            continue
        norm_dims = _dims(norm_weight)
        if norm_dims is not None and (
            len(norm_dims) != 1 or (isinstance(norm_dims[0], int) and norm_dims[0] != head_size)
        ):
            raise refuse(f"{label} must have shape ({head_size},) (one weight per head dimension), got {norm_dims}")
        if norm_weight.dtype not in (dtype, None):
            raise refuse(f"{label} type {norm_weight.dtype} differs from query type {dtype}")
    qk_norm_epsilon = float(_attr(node, "qk_norm_epsilon", 1e-6))
    if not qk_norm_epsilon > 0.0:
        raise refuse(f"qk_norm_epsilon must be > 0, got {qk_norm_epsilon}")

    scale = float(_attr(node, "scale", 0.0))
    if scale == 0.0:
        scale = 1.0 / math.sqrt(head_size)

    causal_attr = int(_attr(node, "causal", 1))
    if causal_attr not in (0, 1):
        raise refuse(f"causal must be 0 or 1, got {causal_attr}")
    local_window_size = int(_attr(node, "local_window_size", -1))
    if causal_attr == 0 and local_window_size >= 0:
        raise refuse("local_window_size must be -1 when causal is 0")
    if local_window_size >= 0 and options.legacy_window:
        local_window_size += 1

    qk_output = int(_attr(node, "qk_output", 0))
    if qk_output not in (0, 1, 2):
        raise refuse(f"qk_output must be 0, 1 or 2, got {qk_output}")
    output_qk_given = len(node.outputs) > OUTPUT_QK and node.outputs[OUTPUT_QK].name != ""
    if qk_output and not output_qk_given:
        raise refuse("qk_output is set but the output_qk output is not provided")
    if output_qk_given and not qk_output and output_is_read(node, OUTPUT_QK):
        raise refuse("output_qk is read but qk_output=0: ONNX Runtime fills it with garbage")

    sliding_window_cache = int(_attr(node, "sliding_window_cache", 0)) == 1
    if sliding_window_cache:
        window_attribute = int(_attr(node, "local_window_size", -1))
        if window_attribute <= 0:
            raise refuse("sliding_window_cache=1 requires local_window_size > 0")
        if not has_past:
            raise refuse("sliding_window_cache=1 requires past_key and past_value")
        if kv_empty:
            raise refuse("sliding_window_cache=1 is not supported with empty key/value (shared KV)")
        if qk_output:
            raise refuse("qk_output is not implemented with sliding_window_cache=1 (ORT CPU rejects it too)")
        if options.legacy_window:
            raise refuse("--legacy-window contradicts sliding_window_cache=1, which only ORT >= 1.29 knows")
        if kv_bits == 4 and head_size % 32:
            raise refuse(f"a 4-bit windowed KV cache needs head_size % 32 == 0, got {head_size} (ORT rejects it too)")
        if kv_bits == 8 and head_size % 16:
            raise refuse(f"an 8-bit windowed KV cache needs head_size % 16 == 0, got {head_size} (ORT rejects it too)")
        capacity = _dims(past_key)[2]
        if isinstance(capacity, int) and capacity < window_attribute:
            raise refuse(f"KV cache capacity {capacity} is smaller than local_window_size {window_attribute}")

    # Declared output shapes must agree with what the node writes: the rewrite's ops read
    # present back, and runtimes trust a graph output's declared shape for the ops that use it.
    cache_width = head_size // 2 if kv_bits == 4 else head_size
    expected_dims = {
        OUTPUT: ("output", {2: num_heads * head_size}, 3),
        PRESENT_KEY: ("present_key", {1: kv_num_heads, 3: cache_width}, 4),
        PRESENT_VALUE: ("present_value", {1: kv_num_heads, 3: cache_width}, 4),
        OUTPUT_QK: ("output_qk", {1: num_heads}, 4),
    }
    for index, (label, sizes, rank) in expected_dims.items():
        if index >= len(node.outputs) or node.outputs[index] is None:
            continue
        declared = _dims(node.outputs[index])
        if declared is None:
            continue
        if len(declared) != rank or any(isinstance(declared[a], int) and declared[a] != n for a, n in sizes.items()):
            wanted = ", ".join(str(sizes.get(a, "?")) for a in range(rank))
            raise refuse(f"output '{label}' is declared {list(declared)} but the node writes ({wanted})")

    present_key_given = len(node.outputs) > PRESENT_KEY and node.outputs[PRESENT_KEY].name != ""
    present_value_given = len(node.outputs) > PRESENT_VALUE and node.outputs[PRESENT_VALUE].name != ""
    if present_key_given != present_value_given:
        raise refuse("present_key and present_value must be both provided or both omitted")
    present_used = output_is_read(node, PRESENT_KEY) or output_is_read(node, PRESENT_VALUE)

    return GqaSpec(
        node_name=name,
        dtype=dtype,
        compute_dtype=dtype if options.native_precision else ir.DataType.FLOAT,
        fast_paths=options.fast_paths,
        num_heads=num_heads,
        kv_num_heads=kv_num_heads,
        head_size=head_size,
        scale=scale,
        packed_qkv=packed_qkv,
        has_past=has_past,
        kv_empty=kv_empty,
        do_rotary=do_rotary,
        rotary_interleaved=int(_attr(node, "rotary_interleaved", 0)) == 1,
        rotary_half=rotary_half,
        local_window_size=local_window_size,
        softcap=max(float(_attr(node, "softcap", 0.0)), 0.0),
        smooth_softmax=int(_attr(node, "smooth_softmax", 0)) == 1 or head_sink is not None,
        has_head_sink=head_sink is not None,
        has_attention_bias=attention_bias is not None,
        has_position_ids=position_ids is not None,
        qk_output=qk_output,
        causal=causal_attr == 1,
        static_kv_cache=options.static_kv_cache and has_past and not sliding_window_cache,
        growing_kv_cache=options.growing_kv_cache and has_past and not sliding_window_cache and not kv_empty,
        sliding_window_cache=sliding_window_cache,
        kv_quant=kv_quant,
        kv_bits=kv_bits,
        present_used=present_used,
        output_qk_used=bool(qk_output) and output_is_read(node, OUTPUT_QK),
        q_norm=_input(node, Q_NORM_WEIGHT) is not None,
        k_norm=_input(node, K_NORM_WEIGHT) is not None and not kv_empty,
        qk_norm_epsilon=qk_norm_epsilon,
    )


def attention_target_obstacle(opset: int, raise_obstacle: str | None = None) -> str | None:
    """Why a node cannot become a standard Attention op at ``opset`` exactly; None if it can.

    The model's opset is raised only on request (``raise_opset``) and only when no
    other op changes meaning; ``raise_obstacle`` says why it was not.
    """
    if opset < ATTENTION_MIN_OPSET:
        reason = f"the model's opset is {opset}; the Attention op needs >= {ATTENTION_MIN_OPSET}"
        if raise_obstacle is not None:
            return f"{reason}, and raising it could change the model: {raise_obstacle}"
        return f"{reason} (--raise-opset raises it when no other op changes meaning)"
    return None


def resolve_target(
    spec: GqaSpec, options: DecomposeOptions, opset: int, raise_obstacle: str | None = None
) -> tuple[str, str | None]:
    """(target used, why it differs from the one asked for) for one node.

    Raises:
        GqaDecomposeError: ``strict_target`` is set and the node would fall back.
    """
    if options.target == "primitives":
        return "primitives", None
    obstacle = attention_target_obstacle(opset, raise_obstacle)
    if obstacle is None:
        return "attention", None
    if options.strict_target:
        raise GqaDecomposeError(f"cannot target the Attention op: {obstacle}", spec.node_name)
    return "primitives", obstacle
