"""The contract of com.microsoft.GroupQueryAttention: parse and validate one node into a frozen spec.

Every refusal happens here, before any graph is touched: a feature the
expansion cannot reproduce exactly raises :class:`GqaDecomposeError` naming the
node and the feature. The meaning of each field follows
``docs/gqa-semantics.md`` (ONNX Runtime 1.31 CPU).
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import TYPE_CHECKING, Any

import onnx_ir as ir

from gqa_decompose.errors import GqaDecomposeError
from gqa_decompose.opsets import ATTENTION_MIN_OPSET

if TYPE_CHECKING:
    from gqa_decompose.expansion.gqa import Lowering

__all__ = [
    "GQA_DOMAIN",
    "GQA_OP_TYPE",
    "TARGETS",
    "DecomposeOptions",
    "options_of",
    "GqaInput",
    "GqaOutput",
    "GqaSpec",
    "PROFILE_CHOICES",
    "RUNTIME_PROFILES",
    "attention_target_obstacle",
    "is_gqa_node",
    "output_is_read",
    "parse_gqa_node",
    "profile_chooses",
    "resolve_target",
]

GQA_DOMAIN = "com.microsoft"
GQA_OP_TYPE = "GroupQueryAttention"


class GqaInput(enum.IntEnum):
    """Input positions of the node (semantics doc §1)."""

    QUERY = 0
    KEY = 1
    VALUE = 2
    PAST_KEY = 3
    PAST_VALUE = 4
    SEQLENS_K = 5
    TOTAL_SEQUENCE_LENGTH = 6
    COS_CACHE = 7
    SIN_CACHE = 8
    POSITION_IDS = 9
    ATTENTION_BIAS = 10
    HEAD_SINK = 11
    K_SCALE = 12
    V_SCALE = 13
    Q_NORM_WEIGHT = 14
    K_NORM_WEIGHT = 15


class GqaOutput(enum.IntEnum):
    """Output positions of the node."""

    OUTPUT = 0
    PRESENT_KEY = 1
    PRESENT_VALUE = 2
    OUTPUT_QK = 3


# The positions under their old module-level names, which the expansion and verification use.
QUERY, KEY, VALUE = GqaInput.QUERY, GqaInput.KEY, GqaInput.VALUE
PAST_KEY, PAST_VALUE = GqaInput.PAST_KEY, GqaInput.PAST_VALUE
SEQLENS_K, TOTAL_SEQUENCE_LENGTH = GqaInput.SEQLENS_K, GqaInput.TOTAL_SEQUENCE_LENGTH
COS_CACHE, SIN_CACHE, POSITION_IDS = GqaInput.COS_CACHE, GqaInput.SIN_CACHE, GqaInput.POSITION_IDS
ATTENTION_BIAS, HEAD_SINK = GqaInput.ATTENTION_BIAS, GqaInput.HEAD_SINK
K_SCALE, V_SCALE = GqaInput.K_SCALE, GqaInput.V_SCALE
Q_NORM_WEIGHT, K_NORM_WEIGHT = GqaInput.Q_NORM_WEIGHT, GqaInput.K_NORM_WEIGHT
OUTPUT, PRESENT_KEY = GqaOutput.OUTPUT, GqaOutput.PRESENT_KEY
PRESENT_VALUE, OUTPUT_QK = GqaOutput.PRESENT_VALUE, GqaOutput.OUTPUT_QK

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
# Which forms the expansion picks (docs/cache-forms-and-speed.md): "portable" is straight-line with
# shapes every runtime types (tract, WebNN, LiteRT); "onnxruntime" adds run-time If choices
# (--fast-paths); "openvino" stays straight-line (OpenVINO runs the If graphs' decode 1.6-3.3x
# slower than the straight-line one) and scales the query instead of the scores; "webnn" (onnxruntime-web's
# WebNN EP) adds Ifs on conditions read from shapes only, which ONNX Runtime folds away once the session's dims
# are fixed, so that no node reads the empty past of a first prompt (WebNN takes no zero-size tensor), and
# uses only ops and types the WebNN EP takes; "litert" (onnx2tf + LiteRT) is portable's straight-line graph with
# a quantized cache written in int32 (TFLite aborts on onnx2tf's int8 ScatterND) and RMS norms (q/k, and the
# companion SimplifiedLayerNormalization) from primitives (LiteRT has no RMSNormalization). Every profile keeps
# the whole contract (every cache form).
RUNTIME_PROFILES = ("portable", "onnxruntime", "openvino", "webnn", "litert")

# What each runtime profile changes in the emitted forms, each choice a property of expansion.gqa.Lowering
# (norm_by_primitives also of ops.OpContext, for the companion norms); "portable" changes nothing and
# "onnxruntime" is ``fast_paths`` (a field of its own). See docs/cache-forms-and-speed.md.
PROFILE_CHOICES: dict[str, frozenset[str]] = {
    "portable": frozenset(),
    "onnxruntime": frozenset(),
    "openvino": frozenset({"prescale_query", "crop_past_in_first_prompt"}),
    "webnn": frozenset(
        {"skip_empty_past", "shapes_from_shapes", "widen_quantized_write", "norm_by_primitives", "plain_index_ops"}
    ),
    "litert": frozenset({"widen_quantized_write", "widen_buffer_write", "norm_by_primitives"}),
}


def profile_chooses(runtime_profile: str, choice: str) -> bool:
    """Whether ``runtime_profile`` makes ``choice`` (a key of :data:`PROFILE_CHOICES`' sets)."""
    return choice in PROFILE_CHOICES[runtime_profile]


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
            target only. The same as ``runtime_profile="onnxruntime"``.
        runtime_profile: the runtime the forms are picked for (:data:`RUNTIME_PROFILES`):
            ``"portable"`` (the default, straight-line, runs everywhere),
            ``"onnxruntime"`` (= ``fast_paths``) or ``"openvino"`` (straight-line as
            portable, the query scaled instead of the scores, which OpenVINO would
            scale through the keys) or ``"webnn"`` (onnxruntime-web's WebNN execution
            provider in strict mode: Ifs on shape-only conditions that ONNX Runtime
            folds once the dims are fixed, so no node reads an empty past, and only
            ops and types the WebNN EP takes) or ``"litert"`` (onnx2tf and LiteRT:
            portable's straight-line graph, a quantized cache written in int32 and
            RMS norms from primitives, the q/k norm's and the companion ops'). Each keeps every
            cache form. Primitives target only.
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
    runtime_profile: str = "portable"
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
                raise GqaDecomposeError(f"unknown op type(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        if self.static_kv_cache and self.growing_kv_cache:
            raise GqaDecomposeError("static_kv_cache and growing_kv_cache promise opposite things")
        if self.runtime_profile not in RUNTIME_PROFILES:
            raise GqaDecomposeError(
                f"runtime_profile must be one of {', '.join(RUNTIME_PROFILES)}, got {self.runtime_profile!r}"
            )
        if self.fast_paths and self.runtime_profile not in ("portable", "onnxruntime"):
            raise GqaDecomposeError(f"fast_paths is the onnxruntime runtime profile, not {self.runtime_profile}")
        # fast_paths is an alias of the onnxruntime profile, kept in step both ways.
        if self.fast_paths or self.runtime_profile == "onnxruntime":
            object.__setattr__(self, "fast_paths", True)
            object.__setattr__(self, "runtime_profile", "onnxruntime")
        if self.target not in TARGETS:
            raise GqaDecomposeError(f"target must be one of {', '.join(TARGETS)}, got {self.target!r}")

    def decomposes(self, op_type: str) -> bool:
        """Whether ``op_type`` is among the ops to decompose."""
        return self.ops is None or op_type in self.ops


def options_of(options: DecomposeOptions | None, fields: dict[str, Any]) -> DecomposeOptions:
    """``options``, or the DecomposeOptions of ``fields``: the public functions take either the object
    (as the package passes it along) or its fields as keywords (the short form), not both."""
    if options is not None and fields:
        raise TypeError(f"pass options= or its fields as keywords, not both (got {', '.join(sorted(fields))})")
    return options if options is not None else DecomposeOptions(**fields)


@dataclasses.dataclass(frozen=True)
class GqaSpec:
    """What one GQA node means, validated: its contract, apart from how it is emitted (the user's choices
    and what the graph reads of it: :class:`~gqa_decompose.expansion.gqa.Lowering`).

    Dimension names: B batch, S query length, N query heads, Nkv KV heads,
    G = N / Nkv, H head size, P past length, T total sequence length.
    """

    node_name: str
    dtype: ir.DataType
    num_heads: int
    kv_num_heads: int
    head_size: int | None  # None: known only at run time (a symbolic query hidden size, and no other input tells)
    scale: float | None  # None: the default 1/sqrt(H) of a run-time H
    packed_qkv: bool
    has_past: bool
    kv_empty: bool  # key/value given with sequence length 0 (KV-shared layer, §11)
    kv_maybe_empty: bool  # key/value length 0 or S, decided at run time (shapes do not tell)
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
    sliding_window_cache: bool  # past/present hold the last tokens only (semantics §12)
    kv_quant: str | None  # None, "PER_TENSOR" or "PER_CHANNEL" (semantics §13)
    kv_bits: int  # 8 (int8 cache) or 4 (two nibbles per uint8); 0 when not quantized
    q_norm: bool = False  # q_norm_weight given: per-head RMS norm of Q before rotary (§16)
    k_norm: bool = False  # k_norm_weight given: the same for the new K
    qk_norm_epsilon: float = 1e-6

    def features(self, lowering: Lowering | None = None) -> list[str]:
        """Short names of what this node does, for reports (with ``lowering``: also the cache promise and
        the compute type it is emitted with)."""
        names = ["packed QKV" if self.packed_qkv else "separate QKV"]
        if self.head_size is None:
            names.append("head size at run time")
        if self.kv_empty:
            names.append("shared KV (empty key/value)")
        elif self.kv_maybe_empty:
            names.append("key/value length 0 (shared KV) or S, at run time")
        elif self.sliding_window_cache:
            names.append("sliding-window KV cache")
        elif self.has_past:
            if lowering is not None and lowering.static_kv_cache:
                names.append("static KV buffer")
            elif lowering is not None and lowering.growing_kv_cache:
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
        if lowering is not None and lowering.compute_dtype != ir.DataType.FLOAT:
            names.append(f"computed in {lowering.compute_dtype.name.lower()}")
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


def _output_given(node: ir.Node, index: int) -> bool:
    return len(node.outputs) > index and node.outputs[index].name != ""


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


@dataclasses.dataclass(frozen=True)
class _Node:
    """The node under validation, with the name its refusals carry."""

    node: ir.Node
    name: str

    def refuse(self, reason: str) -> GqaDecomposeError:
        return GqaDecomposeError(reason, self.name)

    def input(self, index: int) -> ir.Value | None:
        return _input(self.node, index)

    def attr(self, name: str, default: Any) -> Any:
        return _attr(self.node, name, default)


@dataclasses.dataclass(frozen=True)
class _Heads:
    num_heads: int
    kv_num_heads: int


@dataclasses.dataclass(frozen=True)
class _CacheQuantization:
    kv_quant: str | None  # None, "PER_TENSOR" or "PER_CHANNEL"
    kv_bits: int  # 0, 4 or 8

    @property
    def cache_width_divisor(self) -> int:
        return 2 if self.kv_bits == 4 else 1


@dataclasses.dataclass(frozen=True)
class _Qkv:
    dtype: ir.DataType
    packed_qkv: bool
    head_size: int | None  # None: read from the query at run time
    kv_empty: bool
    kv_length_unknown: bool  # separate key/value whose length the shapes do not tell (0 or S)


@dataclasses.dataclass(frozen=True)
class _Window:
    causal: bool
    local_window_size: int  # effective visible keys (legacy reading applied); < 0: none
    sliding_window_cache: bool


# Validators, one per concern, in the order the refusals are checked ---------------------------


def _check_attributes(n: _Node) -> None:
    """Only attributes the op knows (ORT rejects others at load)."""
    unknown = sorted(set(n.node.attributes) - _KNOWN_ATTRIBUTES)
    if unknown:
        raise n.refuse(f"unknown attribute(s) {unknown}; ONNX Runtime 1.31 rejects them too")


def _check_io_counts(n: _Node) -> None:
    """At most the inputs and outputs the op defines."""
    if len(n.node.inputs) > 16:
        raise n.refuse(f"has {len(n.node.inputs)} inputs; the op defines 16")
    if len(n.node.outputs) > 4:
        raise n.refuse(f"has {len(n.node.outputs)} outputs; the op defines 4")


def _parse_heads(n: _Node) -> _Heads:
    for required in ("num_heads", "kv_num_heads"):
        if required not in n.node.attributes:
            raise n.refuse(f"required attribute '{required}' is missing")
    num_heads = int(n.attr("num_heads", 0))
    kv_num_heads = int(n.attr("kv_num_heads", 0))
    if num_heads <= 0 or kv_num_heads <= 0:
        raise n.refuse(f"num_heads ({num_heads}) and kv_num_heads ({kv_num_heads}) must be > 0")
    if num_heads % kv_num_heads:
        raise n.refuse(f"num_heads ({num_heads}) is not a multiple of kv_num_heads ({kv_num_heads})")
    return _Heads(num_heads, kv_num_heads)


def _parse_cache_quantization(n: _Node) -> _CacheQuantization:
    """k/v_quant_type, kv_cache_bit_width and the k/v scales (semantics §13).

    Scales given without quantization are ignored, as ORT ignores them.
    """
    k_quant = n.attr("k_quant_type", "NONE")
    v_quant = n.attr("v_quant_type", "NONE")
    kv_bits = int(n.attr("kv_cache_bit_width", 0))
    for label, quant in (("k_quant_type", k_quant), ("v_quant_type", v_quant)):
        if quant not in ("NONE", "PER_TENSOR", "PER_CHANNEL"):
            raise n.refuse(f"{label} '{quant}' is not NONE, PER_TENSOR or PER_CHANNEL")
    if k_quant != v_quant:
        raise n.refuse(f"k_quant_type {k_quant} != v_quant_type {v_quant} (ORT CPU requires them equal)")
    kv_quant = None if k_quant == "NONE" else k_quant
    if kv_quant is None and kv_bits:
        raise n.refuse(f"kv_cache_bit_width must be 0 when the cache is not quantized, got {kv_bits}")
    if kv_quant is not None and kv_bits not in (4, 8):
        raise n.refuse(f"kv_cache_bit_width must be 4 or 8 for a quantized cache, got {kv_bits}")
    for index, label in ((K_SCALE, "k_scale"), (V_SCALE, "v_scale")):
        given = n.input(index)
        if kv_quant is not None and given is None:
            raise n.refuse(f"input '{label}' must be provided when {label[0]}_quant_type is {kv_quant}")
        if given is not None and given.dtype not in (ir.DataType.FLOAT, None):
            raise n.refuse(f"input '{label}' must be float, got {given.dtype}")
    return _CacheQuantization(kv_quant, kv_bits)


def _parse_query(n: _Node) -> tuple[ir.DataType, tuple[int | str | None, ...]]:
    """(type T, dims) of the query: float, rank 3 (the hidden size may be symbolic: :func:`_query_hidden`;
    a query without a shape is taken as rank 3 with unknown dims)."""
    query = n.input(QUERY)
    if query is None:
        raise n.refuse("input 'query' is missing")
    if query.dtype not in _FLOAT_TYPES:
        raise n.refuse(f"query type {query.dtype} is not float, float16 or bfloat16 (or is unknown)")
    query_dims = _dims(query)
    if query_dims is None:
        # ORT checks rank 3 at run time and fails on any other: (B, S, hidden) is all it runs.
        return query.dtype, (None, None, None)
    if len(query_dims) != 3:
        raise n.refuse(f"query must be 3-D (B, S, hidden), got {query_dims}")
    return query.dtype, query_dims


def _query_hidden(n: _Node, heads: _Heads, quant: _CacheQuantization, query_dims, packed_qkv: bool) -> int | None:
    """The query's hidden size: its static last dim, else the one the head size of another input implies,
    else None (H is read from the query at run time, as ORT reads it).

    ORT reads H from the query at run time and checks the other inputs against it. A symbolic query
    hidden size takes H from a static head dimension of key/value (Nkv*H), past_key/past_value (H, or
    H/2 packed 4-bit), q/k_norm_weight (H) or a per-channel k/v_scale (Nkv*H), so that the expansion
    keeps its static shapes. Declared
    outputs are not used: ORT runs a node whose outputs are declared against what it writes.
    """
    if isinstance(query_dims[2], int):
        return query_dims[2]
    candidates = []  # (head size, where it comes from)
    for index, label in ((KEY, "key"), (VALUE, "value")):
        dims = _dims(n.input(index))
        if dims is not None and len(dims) == 3 and isinstance(dims[2], int) and dims[2] % heads.kv_num_heads == 0:
            candidates.append((dims[2] // heads.kv_num_heads, label))
    for index, label in ((PAST_KEY, "past_key"), (PAST_VALUE, "past_value")):
        dims = _dims(n.input(index))
        if dims is not None and len(dims) == 4 and isinstance(dims[3], int):
            candidates.append((dims[3] * quant.cache_width_divisor, label))
    for index, label in ((Q_NORM_WEIGHT, "q_norm_weight"), (K_NORM_WEIGHT, "k_norm_weight")):
        dims = _dims(n.input(index))
        if dims is not None and len(dims) == 1 and isinstance(dims[0], int):
            candidates.append((dims[0], label))
    for index, label in ((K_SCALE, "k_scale"), (V_SCALE, "v_scale")) if quant.kv_quant == "PER_CHANNEL" else ():
        dims = _dims(n.input(index))  # ORT checks Nkv*H elements
        if dims and all(isinstance(d, int) for d in dims) and math.prod(dims) % heads.kv_num_heads == 0:
            candidates.append((math.prod(dims) // heads.kv_num_heads, label))
    if not candidates:
        return None
    head_size, source = candidates[0]
    for other, label in candidates[1:]:
        if other != head_size:
            raise n.refuse(f"head size {head_size} from {source} != head size {other} from {label}")
    return head_size * (heads.num_heads + 2 * heads.kv_num_heads if packed_qkv else heads.num_heads)


def _head_size(n: _Node, heads: _Heads, query_hidden: int | None, packed_qkv: bool) -> int | None:
    """H from the query's hidden size: D_q / (N + 2 Nkv) packed, D_q / N otherwise (§2); None when
    the hidden size is known only at run time (ORT checks it then)."""
    if query_hidden is None:
        return None
    if packed_qkv:
        width = heads.num_heads + 2 * heads.kv_num_heads
        if query_hidden % width:
            raise n.refuse(
                f"packed query hidden size {query_hidden} is not a multiple of num_heads + 2*kv_num_heads = {width}"
            )
        head_size = query_hidden // width
    else:
        if query_hidden % heads.num_heads:
            raise n.refuse(f"query hidden size {query_hidden} is not a multiple of num_heads {heads.num_heads}")
        head_size = query_hidden // heads.num_heads
    if head_size % 8:
        raise n.refuse(f"head size {head_size} is not a multiple of 8")
    return head_size


def _key_length_zero(n: _Node, heads: _Heads, dtype: ir.DataType, head_size: int | None, query_dims) -> bool | None:
    """Whether separate key/value have sequence length 0 (a KV-shared layer, §11).

    None when the shapes do not tell (a symbolic length named unlike the query's, or
    unknown): ORT decides at run time between 0 and S, and so does the expansion.
    """
    key, value = n.input(KEY), n.input(VALUE)
    for label, kv in (("key", key), ("value", value)):
        kv_dims = _dims(kv)
        if kv.dtype != dtype:
            raise n.refuse(f"{label} type {kv.dtype} differs from query type {dtype}")
        if kv_dims is None:
            continue  # ORT checks the shape at run time; the expansion needs none of it
        if len(kv_dims) != 3:
            raise n.refuse(f"{label} must be 3-D (B, Skv, Nkv*H), got {kv_dims}")
        # A static key hidden size gives H (_query_hidden) unless it is not a multiple of Nkv.
        if isinstance(kv_dims[2], int) and (head_size is None or kv_dims[2] != heads.kv_num_heads * head_size):
            raise n.refuse(
                f"{label} hidden size {kv_dims[2]} != kv_num_heads*head_size "
                f"= {heads.kv_num_heads * head_size if head_size else f'{heads.kv_num_heads}*H'} "
                "(contradictory head counts?)"
            )
    key_length, value_length = ((_dims(kv) or (None, None))[1] for kv in (key, value))
    if isinstance(key_length, int) and isinstance(value_length, int) and key_length != value_length:
        raise n.refuse(f"key sequence length {key_length} != value sequence length {value_length}")
    if not isinstance(key_length, int) and isinstance(value_length, int):
        key_length = value_length  # a partial shape: value's static length tells key's
    if key_length == 0:
        return True
    if isinstance(key_length, int) and isinstance(query_dims[1], int) and key_length != query_dims[1]:
        raise n.refuse(f"key sequence length {key_length} != query sequence length {query_dims[1]}")
    if isinstance(key_length, int) or (key_length is not None and key_length == query_dims[1]):
        return False
    return None


def _parse_qkv(n: _Node, heads: _Heads, quant: _CacheQuantization) -> _Qkv:
    """Query, key and value: packed or separate, the head size, and empty key/value."""
    dtype, query_dims = _parse_query(n)
    key, value = n.input(KEY), n.input(VALUE)
    if (key is None) != (value is None):
        raise n.refuse("key and value must be both present or both absent (packed QKV)")
    packed_qkv = key is None
    head_size = _head_size(n, heads, _query_hidden(n, heads, quant, query_dims, packed_qkv), packed_qkv)
    kv_empty = False if packed_qkv else _key_length_zero(n, heads, dtype, head_size, query_dims)
    return _Qkv(dtype, packed_qkv, head_size, kv_empty is True, kv_empty is None)


def _parse_past(n: _Node, heads: _Heads, qkv: _Qkv, quant: _CacheQuantization) -> bool:
    """Whether a past is given; its rank, cache type and head dims (§2, §13)."""
    past_key, past_value = n.input(PAST_KEY), n.input(PAST_VALUE)
    if (past_key is None) != (past_value is None):
        raise n.refuse("past_key and past_value must be both present or both absent")
    has_past = past_key is not None
    cache_dtype = {None: qkv.dtype, 8: ir.DataType.INT8, 4: ir.DataType.UINT8}[quant.kv_bits or None]
    cache_width = None if qkv.head_size is None else qkv.head_size // quant.cache_width_divisor
    for label, past in (("past_key", past_key), ("past_value", past_value)) if has_past else ():
        past_dims = _dims(past)
        if past.dtype != cache_dtype:
            raise n.refuse(f"{label} type {past.dtype} is not the cache type {cache_dtype}")
        if past_dims is None:
            continue  # ORT checks the shape at run time; the expansion reads it at run time
        if len(past_dims) != 4:
            raise n.refuse(f"{label} must be 4-D (B, Nkv, P, H), got {past_dims}")
        if any(
            isinstance(got, int) and got != expected
            for got, expected in ((past_dims[1], heads.kv_num_heads), (past_dims[3], cache_width))
            if expected is not None
        ):
            raise n.refuse(
                f"{label} shape {past_dims} does not match kv_num_heads={heads.kv_num_heads}, head_size={qkv.head_size}"
            )
    if qkv.kv_empty and not has_past:
        raise n.refuse("empty key/value (shared KV) requires a past")
    if quant.kv_quant is not None and not has_past:
        # ORT types present as T without a quantized past and its kernel then fails (§13).
        raise n.refuse("a quantized KV cache needs a past_key/past_value of the quantized type, even empty")
    return has_past


def _check_lengths(n: _Node) -> None:
    """seqlens_k and total_sequence_length: given, int32, seqlens_k at least 1-D."""
    for index, label in ((SEQLENS_K, "seqlens_k"), (TOTAL_SEQUENCE_LENGTH, "total_sequence_length")):
        given = n.input(index)
        if given is None:
            raise n.refuse(f"required input '{label}' is missing")
        if given.dtype not in (ir.DataType.INT32, None):
            raise n.refuse(f"input '{label}' must be int32, got {given.dtype}")
    seqlens_dims = _dims(n.input(SEQLENS_K))
    if seqlens_dims is not None and len(seqlens_dims) == 0:
        raise n.refuse("seqlens_k must be at least 1-D, got a scalar")


def _dims_differ(first: tuple, second: tuple) -> bool:
    """Whether two shapes surely differ: two symbols (an If's two branches typed apart) may be equal."""
    if len(first) != len(second):
        return True
    return any(isinstance(a, int) and isinstance(b, int) and a != b for a, b in zip(first, second))


def _parse_rotary(n: _Node, qkv: _Qkv) -> int | None:
    """Checks cos/sin (§9); returns cos_cache.shape[1] when known statically."""
    cos_cache, sin_cache = n.input(COS_CACHE), n.input(SIN_CACHE)
    if (cos_cache is None) != (sin_cache is None):
        raise n.refuse("cos_cache and sin_cache must be both present or both absent")
    rotary_half: int | None = None
    if cos_cache is not None:
        if qkv.head_size is not None and qkv.head_size % 16:
            raise n.refuse(f"head size {qkv.head_size} must be a multiple of 16 when cos/sin caches are given")
        cos_dims, sin_dims = _dims(cos_cache), _dims(sin_cache)
        if cos_dims is not None and len(cos_dims) < 2:
            # ORT reads a table of rank > 2 flat, rows of cos_cache.shape[1] (the expansion too).
            raise n.refuse(f"cos_cache must be at least 2-D (positions, R/2, ...), got {cos_dims}")
        if cos_dims is not None and sin_dims is not None and _dims_differ(cos_dims, sin_dims):
            raise n.refuse(f"cos_cache {cos_dims} and sin_cache {sin_dims} shapes differ")
        if cos_dims is not None and isinstance(cos_dims[1], int):
            rotary_half = cos_dims[1]
            if (qkv.head_size is not None and rotary_half > qkv.head_size // 2) or rotary_half % 8:
                raise n.refuse(f"cos_cache dimension 1 ({rotary_half}) must be <= head_size/2 and a multiple of 8")
        for label, cache in (("cos_cache", cos_cache), ("sin_cache", sin_cache)):
            if cache.dtype not in (qkv.dtype, None):
                raise n.refuse(f"{label} type {cache.dtype} differs from query type {qkv.dtype}")
    if int(n.attr("do_rotary", 0)) == 1 and cos_cache is None:
        raise n.refuse("do_rotary=1 requires cos_cache and sin_cache")
    return rotary_half


def _check_position_ids(n: _Node) -> None:
    """position_ids: ORT checks dim 0 == B and dim 1 >= S and reads the data flat (§9, bug 2
    of §19), so (B, S, 1) is (B, S); the expansion reads it flat the same way."""
    position_dims = _dims(n.input(POSITION_IDS))
    if position_dims is not None and len(position_dims) < 2:
        # A 0-D or 1-D position_ids aborts the ONNX Runtime process (no error status).
        raise n.refuse(f"position_ids must be at least 2-D (B, >=S, ...), got {position_dims}")


def _check_bias(n: _Node, heads: _Heads, dtype: ir.DataType) -> None:
    """attention_bias: 4-D (B or 1, N or 1, S, T) of type T (§7)."""
    attention_bias = n.input(ATTENTION_BIAS)
    if attention_bias is None:
        return
    bias_dims = _dims(attention_bias)
    if bias_dims is not None and len(bias_dims) != 4:
        raise n.refuse(f"attention_bias must be 4-D (B or 1, N or 1, S, T), got {bias_dims}")
    if bias_dims is not None and isinstance(bias_dims[1], int) and bias_dims[1] not in (1, heads.num_heads):
        raise n.refuse(f"attention_bias dimension 1 ({bias_dims[1]}) must be 1 or num_heads={heads.num_heads}")
    if attention_bias.dtype not in (dtype, None):
        raise n.refuse(f"attention_bias type {attention_bias.dtype} differs from query type {dtype}")


def _check_sink(n: _Node, heads: _Heads) -> None:
    sink_dims = _dims(n.input(HEAD_SINK))
    if (
        sink_dims is not None
        and sink_dims != (heads.num_heads,)
        and not (len(sink_dims) == 1 and not isinstance(sink_dims[0], int))
    ):
        raise n.refuse(f"head_sink must have shape ({heads.num_heads},), got {sink_dims}")


def _parse_norm(n: _Node, qkv: _Qkv) -> float:
    """q_norm_weight / k_norm_weight shapes and types (§16); returns qk_norm_epsilon."""
    for index, label in ((Q_NORM_WEIGHT, "q_norm_weight"), (K_NORM_WEIGHT, "k_norm_weight")):
        norm_weight = n.input(index)
        if norm_weight is None:
            continue
        norm_dims = _dims(norm_weight)
        # A static norm weight gives H (_query_hidden): with a run-time H its size is not static.
        if norm_dims is not None and (
            len(norm_dims) != 1 or (isinstance(norm_dims[0], int) and norm_dims[0] != qkv.head_size)
        ):
            raise n.refuse(
                f"{label} must have shape ({qkv.head_size},) (one weight per head dimension), got {norm_dims}"
            )
        if norm_weight.dtype not in (qkv.dtype, None):
            raise n.refuse(f"{label} type {norm_weight.dtype} differs from query type {qkv.dtype}")
    qk_norm_epsilon = float(n.attr("qk_norm_epsilon", 1e-6))
    weighted = n.input(Q_NORM_WEIGHT) is not None or n.input(K_NORM_WEIGHT) is not None
    if weighted and not qk_norm_epsilon > 0.0:  # unused without weights, as in ORT
        raise n.refuse(f"qk_norm_epsilon must be > 0, got {qk_norm_epsilon}")
    return qk_norm_epsilon


def _parse_window(n: _Node, options: DecomposeOptions) -> _Window:
    """causal and local_window_size (§5), with the legacy reading on request."""
    causal_attr = int(n.attr("causal", 1))
    if causal_attr not in (0, 1):
        raise n.refuse(f"causal must be 0 or 1, got {causal_attr}")
    local_window_size = int(n.attr("local_window_size", -1))
    if causal_attr == 0 and local_window_size >= 0:
        raise n.refuse("local_window_size must be -1 when causal is 0")
    if local_window_size >= 0 and options.legacy_window:
        local_window_size += 1
    sliding_window_cache = int(n.attr("sliding_window_cache", 0)) == 1
    return _Window(causal_attr == 1, local_window_size, sliding_window_cache)


def _parse_qk_output(n: _Node) -> int:
    """qk_output and the output_qk output it needs (§8)."""
    qk_output = int(n.attr("qk_output", 0))
    if qk_output not in (0, 1, 2):
        raise n.refuse(f"qk_output must be 0, 1 or 2, got {qk_output}")
    output_qk_given = _output_given(n.node, OUTPUT_QK)
    if qk_output and not output_qk_given:
        raise n.refuse("qk_output is set but the output_qk output is not provided")
    if output_qk_given and not qk_output and output_is_read(n.node, OUTPUT_QK):
        raise n.refuse("output_qk is read but qk_output=0: ONNX Runtime fills it with garbage")
    return qk_output


def _check_sliding_window_cache(
    n: _Node, options: DecomposeOptions, qkv: _Qkv, quant: _CacheQuantization, has_past: bool, qk_output: int
) -> None:
    """sliding_window_cache=1 (§12): W > 0, a past of capacity >= W, no shared KV or qk_output."""
    window_attribute = int(n.attr("local_window_size", -1))
    if window_attribute <= 0:
        raise n.refuse("sliding_window_cache=1 requires local_window_size > 0")
    if not has_past:
        raise n.refuse("sliding_window_cache=1 requires past_key and past_value")
    if qkv.kv_empty:
        raise n.refuse("sliding_window_cache=1 is not supported with empty key/value (shared KV)")
    if qk_output:
        raise n.refuse("qk_output is not implemented with sliding_window_cache=1 (ORT CPU rejects it too)")
    if options.legacy_window:
        raise n.refuse("--legacy-window contradicts sliding_window_cache=1, which only ORT >= 1.29 knows")
    head_size = qkv.head_size  # None: ORT checks these widths against the run-time H
    if head_size is not None and quant.kv_bits == 4 and head_size % 32:
        raise n.refuse(f"a 4-bit windowed KV cache needs head_size % 32 == 0, got {head_size} (ORT rejects it too)")
    if head_size is not None and quant.kv_bits == 8 and head_size % 16:
        raise n.refuse(f"an 8-bit windowed KV cache needs head_size % 16 == 0, got {head_size} (ORT rejects it too)")
    capacity = (_dims(n.input(PAST_KEY)) or (None,) * 4)[2]
    if isinstance(capacity, int) and capacity < window_attribute:
        raise n.refuse(f"KV cache capacity {capacity} is smaller than local_window_size {window_attribute}")


def _check_outputs(n: _Node, heads: _Heads, qkv: _Qkv, quant: _CacheQuantization) -> None:
    """present_key and present_value go together.

    Declared output shapes are not checked: ORT runs a node whose outputs are declared against what
    it writes, and so does the rewrite (it keeps the declarations; the present it reads back is a
    value of its own, and a contradicted declaration gets an Identity: passes/decompose.py).
    """
    if _output_given(n.node, PRESENT_KEY) != _output_given(n.node, PRESENT_VALUE):
        raise n.refuse("present_key and present_value must be both provided or both omitted")


def _parse_layout(n: _Node) -> tuple[_Heads, _CacheQuantization, _Qkv, bool]:
    """What the node is and what it reads: its attributes and heads, the cache's quantization, its input and
    output counts, query/key/value, the past (True if given) and the sequence lengths. Checked in this order: it
    decides which refusal a node with several problems gets."""
    _check_attributes(n)
    heads = _parse_heads(n)
    quant = _parse_cache_quantization(n)
    _check_io_counts(n)
    qkv = _parse_qkv(n, heads, quant)
    has_past = _parse_past(n, heads, qkv, quant)
    _check_lengths(n)
    return heads, quant, qkv, has_past


def _parse_features(
    n: _Node, options: DecomposeOptions, heads: _Heads, quant: _CacheQuantization, qkv: _Qkv, has_past: bool
) -> tuple[int | None, float, _Window, int]:
    """What the node computes on them: rotary (its rotary_half), position ids, bias, sink, q/k norm (its
    epsilon), the window, qk_output, a windowed cache and the present outputs; checked in this order, after
    :func:`_parse_layout`."""
    rotary_half = _parse_rotary(n, qkv)
    _check_position_ids(n)
    _check_bias(n, heads, qkv.dtype)
    _check_sink(n, heads)
    qk_norm_epsilon = _parse_norm(n, qkv)
    window = _parse_window(n, options)
    qk_output = _parse_qk_output(n)
    if window.sliding_window_cache:
        _check_sliding_window_cache(n, options, qkv, quant, has_past, qk_output)
    _check_outputs(n, heads, qkv, quant)
    return rotary_half, qk_norm_epsilon, window, qk_output


def parse_gqa_node(node: ir.Node, options: DecomposeOptions | None = None) -> GqaSpec:
    """Validate a GroupQueryAttention node and describe it as a :class:`GqaSpec`.

    Raises:
        GqaDecomposeError: the node is malformed, or uses a feature that cannot
            be expressed exactly in standard ONNX (the message names it).
    """
    options = options or DecomposeOptions()
    n = _Node(node, node.name or "<unnamed GroupQueryAttention>")
    heads, quant, qkv, has_past = _parse_layout(n)
    rotary_half, qk_norm_epsilon, window, qk_output = _parse_features(n, options, heads, quant, qkv, has_past)

    scale = float(n.attr("scale", 0.0)) or None
    if scale is None and qkv.head_size is not None:
        scale = 1.0 / math.sqrt(qkv.head_size)
    head_sink_given = n.input(HEAD_SINK) is not None
    plain_cache = has_past and not window.sliding_window_cache
    # Without a past ORT needs Skv == S, and a windowed cache Skv > 0: only a plain cache may be shared.
    kv_maybe_empty = qkv.kv_length_unknown and plain_cache
    return GqaSpec(
        node_name=n.name,
        dtype=qkv.dtype,
        num_heads=heads.num_heads,
        kv_num_heads=heads.kv_num_heads,
        head_size=qkv.head_size,
        scale=scale,
        packed_qkv=qkv.packed_qkv,
        has_past=has_past,
        kv_empty=qkv.kv_empty,
        kv_maybe_empty=kv_maybe_empty,
        do_rotary=int(n.attr("do_rotary", 0)) == 1,
        rotary_interleaved=int(n.attr("rotary_interleaved", 0)) == 1,
        rotary_half=rotary_half,
        local_window_size=window.local_window_size,
        softcap=max(float(n.attr("softcap", 0.0)), 0.0),
        smooth_softmax=int(n.attr("smooth_softmax", 0)) == 1 or head_sink_given,
        has_head_sink=head_sink_given,
        has_attention_bias=n.input(ATTENTION_BIAS) is not None,
        has_position_ids=n.input(POSITION_IDS) is not None,
        qk_output=qk_output,
        causal=window.causal,
        sliding_window_cache=window.sliding_window_cache,
        kv_quant=quant.kv_quant,
        kv_bits=quant.kv_bits,
        q_norm=n.input(Q_NORM_WEIGHT) is not None,
        k_norm=n.input(K_NORM_WEIGHT) is not None and not qkv.kv_empty,
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
