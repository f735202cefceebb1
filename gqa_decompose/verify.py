"""Node-level parity with ONNX Runtime CPU: the original GQA node against its expansion.

For each GQA node of the original model: extract it into a one-node model
(its input types and shapes, constant inputs kept), synthesize valid inputs for
every phase its shapes allow (first prompt with a ragged batch, ragged decode,
chunked prefill with batch 1; growing cache and static buffer), run the node
and its expansion on ONNX Runtime CPU, and compare on the elements ORT defines:

* output rows of padded queries in a first prompt (s >= t_b) are excluded;
* present rows >= t_b are excluded (ORT zeroes them, or keeps them in a shared buffer);
* output_qk columns >= t_b are excluded (ORT leaves them uninitialised).

Tolerances are absolute plus relative: fp32 1e-5 + 1e-5*|x|, fp16 2e-3 + 1e-3*|x|.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper

from gqa_decompose import spec as gqa
from gqa_decompose import verify_core as core
from gqa_decompose.errors import GqaDecomposeError
from gqa_decompose.expansion.gqa import Lowering
from gqa_decompose.expansion.mask import row_block_min_queries
from gqa_decompose.passes import InferGqaTypesPass, find_gqa_nodes
from gqa_decompose.plan import PlannedGqa, plan_gqa
from gqa_decompose.spec import DecomposeOptions, GqaSpec, options_of, output_is_read, parse_gqa_node, resolve_target

__all__ = [
    "NodeVerification",
    "Phase",
    "PhaseResult",
    "VerificationReport",
    "extract_node_model",
    "phases_for",
    "synthesize_inputs",
    "verify",
    "verify_node_model",
]

TOLERANCES = core.NODE_TOLERANCES
NATIVE_PRECISION_TOLERANCES = core.NATIVE_PRECISION_NODE_TOLERANCES
windowed_rows = core.windowed_rows  # L(t_b), re-exported: tests and verify_model's users import it from here


@dataclasses.dataclass(frozen=True)
class Phase:
    """One concrete run of a node: sizes and each row's valid length t_b."""

    name: str
    batch: int
    query_length: int
    past_length: int | None  # None: the node has no past
    total_length: int
    total_lengths: tuple[int, ...]  # t_b per batch row
    kv_empty: bool = False  # key/value fed with length 0 (a node whose key length is decided at run time)

    @property
    def first_prompt(self) -> bool:
        return self.query_length == self.total_length


@dataclasses.dataclass(frozen=True)
class PhaseResult:
    phase: Phase
    max_errors: dict[str, float]  # output name -> max abs error on defined elements
    passed: bool
    failure: str | None = None


@dataclasses.dataclass(frozen=True)
class NodeVerification:
    name: str
    results: tuple[PhaseResult, ...]
    skipped: str | None = None  # why no phase could run (not a failure)
    refused: str | None = None  # the node cannot be decomposed (a failure)
    target: str = "primitives"  # what the expansion verified was: "primitives" or "attention"
    fallback: str | None = None  # why it is not the target asked for

    @property
    def passed(self) -> bool:
        return (
            self.refused is None and self.skipped is None and bool(self.results) and all(r.passed for r in self.results)
        )

    @property
    def max_error(self) -> float | None:
        errors = [e for r in self.results for e in r.max_errors.values()]
        return max(errors) if errors else None


@dataclasses.dataclass(frozen=True)
class VerificationReport:
    nodes: tuple[NodeVerification, ...]
    leftover_gqa_nodes: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return not self.leftover_gqa_nodes and all(n.passed or (n.skipped and not n.refused) for n in self.nodes)

    @property
    def max_error(self) -> float | None:
        errors = [n.max_error for n in self.nodes if n.max_error is not None]
        return max(errors) if errors else None


_INPUT_RANKS = {
    gqa.QUERY: 3,
    gqa.KEY: 3,
    gqa.VALUE: 3,
    gqa.PAST_KEY: 4,
    gqa.PAST_VALUE: 4,
    gqa.COS_CACHE: 2,
    gqa.SIN_CACHE: 2,
    gqa.POSITION_IDS: 2,
    gqa.ATTENTION_BIAS: 4,
    gqa.K_SCALE: 1,
    gqa.V_SCALE: 1,
    gqa.Q_NORM_WEIGHT: 1,
    gqa.K_NORM_WEIGHT: 1,
}

# Extraction --------------------------------------------------------------------------------


_dims = core.dims


def _constant_tensor(value: ir.Value) -> onnx.TensorProto | None:
    tensor = ir.convenience.get_const_tensor(value)
    if tensor is None:
        return None
    return onnx.numpy_helper.from_array(tensor.numpy(), name=value.name)


def extract_node_model(
    node: ir.Node,
    opset: int,
    ir_version: int,
    *,
    outputs: Sequence[int] | None = None,
    as_dtype: ir.DataType | None = None,
) -> onnx.ModelProto:
    """A one-node model of ``node``: its non-constant inputs become graph inputs.

    Args:
        outputs: which output positions to expose (default: those that exist).
        as_dtype: retype every input/output of the node's type T (for an oracle
            in another precision).
    """
    node_dtype = node.inputs[gqa.QUERY].dtype
    proto = ir.serde.serialize_node(node)
    input_names, graph_inputs, initializers = _node_inputs(node, node_dtype, as_dtype)
    output_names = _output_names(node, outputs)
    del proto.input[:]
    proto.input.extend(input_names)
    del proto.output[:]
    proto.output.extend(output_names)
    past = node.inputs[gqa.PAST_KEY] if len(node.inputs) > gqa.PAST_KEY else None
    cache_dtype = past.dtype if past is not None and past.dtype is not None else node_dtype
    output_dtypes = [node_dtype, cache_dtype, cache_dtype, node_dtype]
    graph_outputs = [
        helper.make_tensor_value_info(name, _retyped(output_dtypes[i], node_dtype, as_dtype), None)
        for i, name in enumerate(output_names)
        if name
    ]
    graph = helper.make_graph([proto], "gqa_node", graph_inputs, graph_outputs, initializers)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(gqa.GQA_DOMAIN, 1)],
        ir_version=ir_version,
    )
    return model


def _retyped(dtype: ir.DataType, node_dtype: ir.DataType, as_dtype: ir.DataType | None) -> ir.DataType:
    return as_dtype if as_dtype is not None and dtype == node_dtype else dtype


def _node_inputs(
    node: ir.Node, node_dtype: ir.DataType, as_dtype: ir.DataType | None
) -> tuple[list[str], list[onnx.ValueInfoProto], list[onnx.TensorProto]]:
    """The one-node model's input names (``in<index>``, "" where absent), graph inputs and initializers (the
    node's constant inputs, in fp32 when ``as_dtype`` retypes them)."""
    input_names: list[str] = []
    graph_inputs: dict[str, onnx.ValueInfoProto] = {}
    initializers: dict[str, onnx.TensorProto] = {}
    for index, value in enumerate(node.inputs):
        if value is None:
            input_names.append("")
            continue
        name = f"in{index}"
        input_names.append(name)
        constant = _constant_tensor(value)
        if constant is not None:
            constant.name = name
            if as_dtype is not None and value.dtype == node_dtype:
                array = onnx.numpy_helper.to_array(constant).astype(np.float32)
                constant = onnx.numpy_helper.from_array(array, name=name)
            initializers[name] = constant
            continue
        if value.dtype is None:
            raise GqaDecomposeError(f"input {index} ('{value.name}') has no type", node.name)
        dims = _dims(value)
        if dims is None:  # a graph input needs a shape; the rank is the op's
            dims = [None] * _INPUT_RANKS.get(index, 1)
        graph_inputs[name] = helper.make_tensor_value_info(name, _retyped(value.dtype, node_dtype, as_dtype), dims)
    return input_names, list(graph_inputs.values()), list(initializers.values())


def _output_names(node: ir.Node, outputs: Sequence[int] | None) -> list[str]:
    """``out<index>`` for each exposed output position (default: those that exist), "" between them."""
    exposed = (
        outputs
        if outputs is not None
        else [i for i, value in enumerate(node.outputs) if value is not None and value.name]
    )
    output_count = max([len(node.outputs), *(i + 1 for i in exposed)])
    output_names = [f"out{i}" if i in exposed else "" for i in range(output_count)]
    while output_names and output_names[-1] == "":
        output_names.pop()
    return output_names


def _input_given(node: ir.Node, index: int) -> bool:
    return index < len(node.inputs) and node.inputs[index] is not None


def normalized_oracle_model(oracle: onnx.ModelProto, spec: GqaSpec) -> onnx.ModelProto:
    """The oracle of a one-node model whose node has q/k norm weights: the norm moved outside it."""
    model = ir.serde.deserialize_model(oracle)
    node = next(n for n in model.graph if n.op_type == gqa.GQA_OP_TYPE)
    model.graph.insert_before(node, unfused_qk_norm_nodes(node, spec))
    ir.passes.common.NameFixPass()(model)
    return ir.serde.serialize_model(model)


def unfused_qk_norm_nodes(node: ir.Node, spec: GqaSpec) -> list[ir.Node]:
    """Rewire ``node`` to read Q/K heads normalized outside it, without norm weights (§16).

    ORT's GQA kernel rejects the weights; this spelling (the heads through ORT's own
    SimplifiedLayerNormalization, fp32 inside, rounded to the node's type) is what ORT CPU
    runs instead. Returns the nodes that normalize, to be inserted before ``node``.
    """
    new_nodes: list[ir.Node] = []

    def add(op: str, inputs: list, outputs: int = 1, **attributes) -> ir.Node:
        new_nodes.append(ir.node(op, inputs, attributes=attributes, num_outputs=outputs))
        return new_nodes[-1]

    def constant(dims: list[int]) -> ir.Value:
        return add("Constant", [], value=ir.tensor(np.array(dims, np.int64))).outputs[0]

    def norm(heads: ir.Value, weight: ir.Value | None) -> ir.Value:
        if weight is None:
            return heads
        return add(
            "SimplifiedLayerNormalization", [heads, weight], axis=-1, epsilon=spec.qk_norm_epsilon, stash_type=1
        ).outputs[0]

    def weight(index: int) -> ir.Value | None:
        return node.inputs[index] if len(node.inputs) > index else None

    n, nkv, h = spec.num_heads, spec.kv_num_heads, spec.head_size
    if h is None:  # read from the query at run time: the head dims are the -1 of each reshape
        _unfused_qk_norm_runtime_h(node, spec, add, constant, norm, weight)
        return new_nodes
    q_weight, k_weight = weight(gqa.Q_NORM_WEIGHT), weight(gqa.K_NORM_WEIGHT)
    if spec.packed_qkv:
        heads = add("Reshape", [node.inputs[gqa.QUERY], constant([0, 0, n + 2 * nkv, h])]).outputs[0]
        q, k, v = add("Split", [heads, constant([n, nkv, nkv])], outputs=3, axis=2).outputs
        merged = add("Concat", [norm(q, q_weight), norm(k, k_weight), v], axis=2).outputs[0]
        node.replace_input_with(gqa.QUERY, add("Reshape", [merged, constant([0, 0, (n + 2 * nkv) * h])]).outputs[0])
    else:
        for index, norm_weight, count in (
            (gqa.QUERY, q_weight, n),
            (gqa.KEY, None if spec.kv_empty else k_weight, nkv),
        ):
            if norm_weight is not None:
                heads = add("Reshape", [node.inputs[index], constant([0, 0, count, h])]).outputs[0]
                flat = add("Reshape", [norm(heads, norm_weight), constant([0, 0, count * h])]).outputs[0]
                node.replace_input_with(index, flat)
    _drop_norm_weights(node)
    return new_nodes


def _drop_norm_weights(node: ir.Node) -> None:
    for index in (gqa.Q_NORM_WEIGHT, gqa.K_NORM_WEIGHT):
        if len(node.inputs) > index:
            node.replace_input_with(index, None)


def _unfused_qk_norm_runtime_h(node: ir.Node, spec: GqaSpec, add, constant, norm, weight) -> None:
    """:func:`unfused_qk_norm_nodes` for a head size known only at run time (the reshapes infer it)."""
    n, nkv = spec.num_heads, spec.kv_num_heads
    q_weight, k_weight = weight(gqa.Q_NORM_WEIGHT), weight(gqa.K_NORM_WEIGHT)
    if spec.packed_qkv:
        heads = add("Reshape", [node.inputs[gqa.QUERY], constant([0, 0, n + 2 * nkv, -1])]).outputs[0]
        q, k, v = add("Split", [heads, constant([n, nkv, nkv])], outputs=3, axis=2).outputs
        merged = add("Concat", [norm(q, q_weight), norm(k, k_weight), v], axis=2).outputs[0]
        node.replace_input_with(gqa.QUERY, add("Reshape", [merged, constant([0, 0, -1])]).outputs[0])
    else:
        for index, norm_weight, count in (
            (gqa.QUERY, q_weight, n),
            (gqa.KEY, None if spec.kv_empty else k_weight, nkv),
        ):
            if norm_weight is not None:
                heads = add("Reshape", [node.inputs[index], constant([0, 0, count, -1])]).outputs[0]
                flat = add("Reshape", [norm(heads, norm_weight), constant([0, 0, -1])]).outputs[0]
                node.replace_input_with(index, flat)
    _drop_norm_weights(node)


# Phases and inputs ---------------------------------------------------------------------------


def _fixed(dim, default: int) -> int:
    return dim if isinstance(dim, int) else default


def _ragged(batch: int, longest: int, shortest: int) -> tuple[int, ...]:
    """Row 0 is the longest; the others step down, never below ``shortest``."""
    return tuple(max(shortest, longest - 2 * b) for b in range(batch))


def _static_dim(node: ir.Node, positions: Sequence[tuple[int, int]]) -> int | str | None:
    """The size of a dimension several inputs share: the first static one among
    ``(input, axis)`` positions, else the first one's symbol (a shape may be partial)."""
    found: list[int | str | None] = []
    for index, axis in positions:
        value = node.inputs[index] if index < len(node.inputs) else None
        dims = _dims(value) if value is not None else None
        if dims is not None and axis < len(dims):
            found.append(dims[axis])
    static = [d for d in found if isinstance(d, int)]
    if static:
        return static[0]
    return found[0] if found else None


def phases_for(node: ir.Node, spec: GqaSpec, lowering: Lowering | None = None) -> list[Phase]:
    """The phases a node's static shapes admit, with small sizes for symbolic dims, and its cache promise
    (``lowering``; default: the default options') keeps."""
    lowering = lowering or Lowering.of(node, spec)
    batch_dim, query_dim, past_dim, positions_limit = _phase_dims(node, spec)
    if spec.sliding_window_cache:
        return _sliding_cache_phases(spec, batch_dim, query_dim, past_dim, positions_limit)

    # A static bias width fixes T.
    bias = node.inputs[gqa.ATTENTION_BIAS] if len(node.inputs) > gqa.ATTENTION_BIAS else None
    bias_width = (_dims(bias) or [None] * 4)[3] if bias is not None else None
    static_total = bias_width if isinstance(bias_width, int) else None

    phases = []
    for name, batch, query_length, total, lengths in _phase_candidates(spec, lowering, batch_dim, query_dim, past_dim):
        if positions_limit is not None and total + 3 > positions_limit:
            continue
        if static_total is not None and static_total != total:
            continue
        for suffix, past_length in _past_options(spec, lowering, past_dim, query_length, total):
            phases.append(Phase(name + suffix, batch, query_length, past_length, total, lengths))
            if spec.kv_maybe_empty and past_length is not None and past_length >= total:
                # The key length is 0 or S at run time: a KV-shared step reads a static buffer (§11).
                phases.append(
                    Phase(
                        name + suffix + ", shared KV", batch, query_length, past_length, total, lengths, kv_empty=True
                    )
                )
    return phases


def _phase_dims(node: ir.Node, spec: GqaSpec) -> tuple:
    """(B, S, P, positions) as the node's static shapes fix them (a symbolic dim: None or its name)."""
    batch_dim = _static_dim(
        node,
        [(gqa.QUERY, 0), (gqa.KEY, 0), (gqa.VALUE, 0), (gqa.PAST_KEY, 0), (gqa.PAST_VALUE, 0), (gqa.POSITION_IDS, 0)],
    )
    query_positions = [(gqa.QUERY, 1), (gqa.ATTENTION_BIAS, 2)]
    if not (spec.kv_empty or spec.kv_maybe_empty):
        query_positions += [(gqa.KEY, 1), (gqa.VALUE, 1)]
    query_positions.append((gqa.POSITION_IDS, 1))  # >= S: a valid S when nothing else fixes it
    query_dim = _static_dim(node, query_positions)
    past_dim = None
    if spec.has_past:
        past_dim = _static_dim(node, [(gqa.PAST_KEY, 2), (gqa.PAST_VALUE, 2)])
    positions_limit = None
    cos = node.inputs[gqa.COS_CACHE] if len(node.inputs) > gqa.COS_CACHE else None
    if cos is not None:
        cos_dims = _dims(cos)
        if cos_dims and isinstance(cos_dims[0], int):
            positions_limit = cos_dims[0]
    return batch_dim, query_dim, past_dim, positions_limit


def _past_options(
    spec: GqaSpec, lowering: Lowering, past_dim, query_length: int, total: int
) -> list[tuple[str, int | None]]:
    """(name suffix, past rows) for a growing cache and a static buffer, as the node allows."""
    if not spec.has_past:
        return [("", None)] if total == query_length else []
    options: list[tuple[str, int | None]] = []
    growing_past = total - query_length
    growing_fits = not isinstance(past_dim, int) or past_dim == growing_past
    if not spec.kv_empty and not lowering.static_kv_cache and growing_fits:
        options.append((", growing cache", growing_past))
    # A decode step reads few rows of a long buffer (attention copies just the rows it
    # reads); other phases read most of a short one (attention reads the whole buffer).
    static_past = _fixed(past_dim, 3 * total if query_length == 1 else total + 3)
    if static_past >= total and not lowering.growing_kv_cache:
        options.append((", static buffer", static_past))
    return options


def _phase_candidates(
    spec: GqaSpec, lowering: Lowering, batch_dim, query_dim, past_dim
) -> list[tuple[str, int, int, int, tuple[int, ...]]]:
    """(name, B, S, T, each row's length) of the phases worth running, before the node's limits."""
    candidates: list[tuple[str, int, int, int, tuple[int, ...]]] = []
    # First prompt: a right-padded ragged batch.
    batch = _fixed(batch_dim, 2)
    query_length = _fixed(query_dim, 5)
    candidates.append(("first prompt", batch, query_length, query_length, _ragged(batch, query_length, 1)))
    # Token generation with a ragged past.
    if not isinstance(query_dim, int) or query_dim == 1:
        total = 7
        # The growing-cache promise includes aligned rows: no ragged decode.
        lengths = (total,) * batch if lowering.growing_kv_cache else _ragged(batch, total, 1)
        candidates.append(("decode", batch, 1, total, lengths))
    # Chunked prefill: ORT needs batch 1.
    chunk = _fixed(query_dim, 3)
    if chunk > 1 and (not isinstance(batch_dim, int) or batch_dim == 1):
        total = chunk + 4
        candidates.append(("chunked prefill", 1, chunk, total, (total,)))
    # A prompt long enough for causal row blocks.
    long_prompt = row_block_min_queries()
    if lowering.fast_paths and spec.causal and not isinstance(query_dim, int) and not isinstance(past_dim, int):
        long_batch = _fixed(batch_dim, 1)
        candidates.append(("long first prompt", long_batch, long_prompt, long_prompt, (long_prompt,) * long_batch))
    return candidates


def _sliding_cache_phases(spec: GqaSpec, batch_dim, query_dim, past_dim, positions_limit) -> list[Phase]:
    """Phases of a windowed cache: past is always the full capacity C; no right padding
    (ORT requires t_b >= S); lengths beyond C so the cache has dropped tokens."""
    capacity = _fixed(past_dim, spec.local_window_size + 2)
    batch = _fixed(batch_dim, 2)
    candidates = []
    prompt = _fixed(query_dim, 5)
    candidates.append(Phase("first prompt, windowed cache", batch, prompt, capacity, prompt, (prompt,) * batch))
    if not isinstance(query_dim, int) or query_dim == 1:
        total = capacity + 5
        candidates.append(Phase("decode, windowed cache", batch, 1, capacity, total, _ragged(batch, total, 1)))
    if not isinstance(batch_dim, int) or batch_dim == 1:
        for chunk in sorted({_fixed(query_dim, 3), _fixed(query_dim, capacity + 2)}):
            if chunk > 1:
                total = chunk + capacity + 3
                candidates.append(
                    Phase(f"chunked prefill of {chunk}, windowed cache", 1, chunk, capacity, total, (total,))
                )
    return [p for p in candidates if positions_limit is None or p.total_length + 3 <= positions_limit]


def _shaped(dims, sizes: dict[int, int], default_rank: int) -> tuple[int, ...]:
    """A concrete shape for ``dims``: static dims kept, symbolic ones from ``sizes`` by axis."""
    if dims is None:
        dims = [None] * default_rank
    return tuple(d if isinstance(d, int) else sizes[axis] for axis, d in enumerate(dims))


def _causal_limits(spec: GqaSpec, phase: Phase) -> np.ndarray:
    """L[b, s]: keys [.., L) are visible to query s of row b (before any window)."""
    lengths = np.array(phase.total_lengths)
    rows = np.arange(phase.query_length)
    if not spec.causal:
        return np.repeat(lengths[:, None], phase.query_length, axis=1)
    offsets = np.zeros_like(lengths) if phase.first_prompt else lengths - phase.query_length
    return np.minimum(offsets[:, None] + rows[None, :] + 1, lengths[:, None])


def _rotary_half_hint(cos_cache: ir.Value) -> int | None:
    """cos_cache.shape[1] when its shape is symbolic but an If picks between constant tables.

    Phi-3's LongRoPE picks the short or long factor table with an If; the builder
    declares the result's width symbolically, so without this hint verification would
    synthesize full-width tables and never exercise partial rotary.
    """
    producer = cos_cache.producer()
    if producer is None or producer.op_type != "If":
        return None
    index = list(producer.outputs).index(cos_cache)
    widths = set()
    for attr in producer.attributes.values():
        if attr.type != ir.AttributeType.GRAPH:
            continue
        tensor = ir.convenience.get_const_tensor(attr.value.outputs[index])
        if tensor is None or len(tensor.shape) != 2:
            return None
        widths.add(tensor.shape[1])
    return widths.pop() if len(widths) == 1 else None


def sample_head_size(node: ir.Node, spec: GqaSpec) -> int:
    """The head size verification feeds a node whose H is known only at run time: 32, or twice
    the rotary table's width when that is more (H is a multiple of 16 and >= R with cos/sin)."""
    if spec.head_size is not None:
        return spec.head_size
    half = spec.rotary_half
    if half is None and len(node.inputs) > gqa.COS_CACHE and node.inputs[gqa.COS_CACHE] is not None:
        half = _rotary_half_hint(node.inputs[gqa.COS_CACHE])
    return max(32, 2 * (half or 0))


def synthesize_inputs(
    node: ir.Node, spec: GqaSpec, phase: Phase, rng: np.random.Generator, feed_names: dict[int, str]
) -> dict[str, np.ndarray]:
    """Valid inputs for ``phase`` keyed by the one-node model's input names."""
    feeds = _Feeds(node, spec, phase, rng, feed_names)
    # In this order: each draws from ``rng`` in turn, so a seed gives the same inputs.
    feeds.put_qkv()
    feeds.put_past()
    feeds.put_scales()
    feeds.put_lengths()
    positions_limit = feeds.put_rotary()
    feeds.put_positions(positions_limit)
    feeds.put_bias()
    if gqa.HEAD_SINK in feed_names:
        feeds.put(gqa.HEAD_SINK, feeds.normal(spec.num_heads))
    for index in (gqa.Q_NORM_WEIGHT, gqa.K_NORM_WEIGHT):
        weight = 1.0 + 0.5 * rng.standard_normal(feeds.head_size)
        feeds.put(index, weight.astype(np.float32).astype(feeds.dtype))
    return feeds.feeds


class _Feeds:
    """The feeds of one phase, input by input (:func:`synthesize_inputs`)."""

    def __init__(
        self, node: ir.Node, spec: GqaSpec, phase: Phase, rng: np.random.Generator, feed_names: dict[int, str]
    ) -> None:
        self.node, self.spec, self.phase, self.rng, self.feed_names = node, spec, phase, rng, feed_names
        self.dtype = core.NUMPY_TYPES[spec.dtype]
        self.head_size = spec.head_size or sample_head_size(node, spec)
        self.kv_hidden = spec.kv_num_heads * self.head_size
        self.feeds: dict[str, np.ndarray] = {}

    def normal(self, *shape) -> np.ndarray:
        return self.rng.standard_normal(shape).astype(np.float32).astype(self.dtype)

    def put(self, index: int, array: np.ndarray) -> None:
        if index in self.feed_names:
            self.feeds[self.feed_names[index]] = array

    def put_qkv(self) -> None:
        spec, phase = self.spec, self.phase
        heads = spec.num_heads
        query_hidden = self.head_size * (heads + 2 * spec.kv_num_heads if spec.packed_qkv else heads)
        self.put(gqa.QUERY, self.normal(phase.batch, phase.query_length, query_hidden))
        if not spec.packed_qkv:
            kv_length = 0 if spec.kv_empty or phase.kv_empty else phase.query_length
            self.put(gqa.KEY, self.normal(phase.batch, kv_length, self.kv_hidden))
            self.put(gqa.VALUE, self.normal(phase.batch, kv_length, self.kv_hidden))

    def put_past(self) -> None:
        spec, phase, rng = self.spec, self.phase, self.rng
        if phase.past_length is None:
            return
        cache_width = self.head_size // 2 if spec.kv_bits == 4 else self.head_size
        past_shape = (phase.batch, spec.kv_num_heads, phase.past_length, cache_width)
        for index in (gqa.PAST_KEY, gqa.PAST_VALUE):
            if spec.kv_bits == 8:
                self.put(index, rng.integers(-128, 128, past_shape).astype(np.int8))
            elif spec.kv_bits == 4:
                self.put(index, rng.integers(0, 256, past_shape).astype(np.uint8))
            else:
                self.put(index, self.normal(*past_shape))

    def put_scales(self) -> None:
        spec = self.spec
        if spec.kv_quant is None and gqa.K_SCALE not in self.feed_names:  # ignored without quantization
            return
        scale_size = self.kv_hidden if spec.kv_quant == "PER_CHANNEL" else 1
        for index in (gqa.K_SCALE, gqa.V_SCALE):
            if index not in self.feed_names:
                continue
            dims = _dims(self.node.inputs[index])
            shape = _shaped(dims, {0: scale_size}, 1) if dims else (scale_size,)
            self.put(index, self.rng.uniform(0.01, 0.05, shape).astype(np.float32))

    def put_lengths(self) -> None:
        phase, node = self.phase, self.node
        seqlens = np.array(phase.total_lengths, dtype=np.int32) - 1
        seqlens_dims = _dims(node.inputs[gqa.SEQLENS_K])
        if seqlens_dims is not None and len(seqlens_dims) == 2:
            # (1, B) when dim 0 is 1 or dim 1 is a static size other than 1 (a partial shape may say only that).
            row = seqlens_dims[0] == 1 or (isinstance(seqlens_dims[1], int) and seqlens_dims[1] != 1)
            seqlens = seqlens.reshape((1, phase.batch) if row and seqlens_dims[1] != 1 else (phase.batch, 1))
        self.put(gqa.SEQLENS_K, seqlens)
        total_dims = _dims(node.inputs[gqa.TOTAL_SEQUENCE_LENGTH])
        total_shape = () if total_dims is not None and len(total_dims) == 0 else (1,)
        self.put(gqa.TOTAL_SEQUENCE_LENGTH, np.full(total_shape, phase.total_length, dtype=np.int32))

    def put_rotary(self) -> int:
        """cos/sin caches; returns how many positions they hold."""
        node, spec = self.node, self.spec
        positions_limit = max(self.phase.total_length + 3, 16)
        if gqa.COS_CACHE in self.feed_names:
            cos_dims = _dims(node.inputs[gqa.COS_CACHE])
            half = spec.rotary_half or _rotary_half_hint(node.inputs[gqa.COS_CACHE]) or self.head_size // 2
            shape = _shaped(cos_dims, {0: positions_limit, 1: half}, 2)
            angles = self.rng.uniform(-math.pi, math.pi, shape)
            self.put(gqa.COS_CACHE, np.cos(angles).astype(np.float32).astype(self.dtype))
            self.put(gqa.SIN_CACHE, np.sin(angles).astype(np.float32).astype(self.dtype))
        cos_value = node.inputs[gqa.COS_CACHE] if len(node.inputs) > gqa.COS_CACHE else None
        if cos_value is not None and cos_value.shape is not None and isinstance(cos_value.shape[0], int):
            positions_limit = cos_value.shape[0]
        return positions_limit

    def put_positions(self, positions_limit: int) -> None:
        if gqa.POSITION_IDS not in self.feed_names:
            return
        phase, rng = self.phase, self.rng
        dims = _dims(self.node.inputs[gqa.POSITION_IDS])
        shape = _shaped(dims, {0: phase.batch, 1: phase.query_length, 2: 1, 3: 1}, 2)  # (B, S, 1, ..) of rank > 2
        if phase.first_prompt:
            base = int(rng.integers(0, positions_limit - phase.query_length + 1))
            row = (base + np.arange(shape[1])).reshape((shape[1],) + (1,) * (len(shape) - 2))
            positions = np.broadcast_to(row, shape)
        else:
            positions = rng.integers(0, positions_limit, shape)
        self.put(gqa.POSITION_IDS, np.ascontiguousarray(np.minimum(positions, positions_limit - 1)).astype(np.int64))

    def put_bias(self) -> None:
        if gqa.ATTENTION_BIAS not in self.feed_names:
            return
        spec, phase, rng = self.spec, self.phase, self.rng
        dims = _dims(self.node.inputs[gqa.ATTENTION_BIAS])
        shape = _shaped(dims, {0: phase.batch, 1: spec.num_heads, 2: phase.query_length, 3: phase.total_length}, 4)
        bias = rng.standard_normal(shape).astype(np.float32)
        bias[rng.random(shape) < 0.15] = -np.inf
        # Keep the newest visible key of every batch row finite so no valid row is masked
        # entirely (ORT's kernels disagree there: 0 or NaN). A bias broadcast over the batch
        # (dim 0 = 1) serves every row, whose newest keys differ when causal = 0.
        limits = _causal_limits(spec, phase)
        for b in range(phase.batch):
            for s in range(phase.query_length):
                bias[min(b, shape[0] - 1), :, s, limits[b, s] - 1] = rng.standard_normal()
        self.put(gqa.ATTENTION_BIAS, bias.astype(self.dtype))


# Comparison ----------------------------------------------------------------------------------

_LABELS = ("output", "present_key", "present_value", "output_qk")


def _defined_parts(output_index: int, shape: Sequence[int], spec: GqaSpec, phase: Phase) -> list[tuple]:
    """The index tuples of output ``output_index`` (of ``shape``) that ONNX Runtime defines, one per batch row."""
    queries = core.defined_query_rows(phase.total_lengths, phase.query_length, phase.first_prompt)
    if output_index == gqa.OUTPUT:
        return [(b, slice(0, rows)) for b, rows in enumerate(queries)]
    if output_index in (gqa.PRESENT_KEY, gqa.PRESENT_VALUE):
        window = spec.local_window_size if spec.sliding_window_cache else None
        kept = core.defined_present_rows(phase.total_lengths, shape[2], window)
        return [(b, slice(None), slice(0, rows)) for b, rows in enumerate(kept)]
    if output_index == gqa.OUTPUT_QK:
        return [
            (b, slice(None), slice(0, rows), slice(0, length))
            for b, (rows, length) in enumerate(zip(queries, phase.total_lengths))
        ]
    return []


def _defined_elements(output_index: int, array: np.ndarray, spec: GqaSpec, phase: Phase) -> list[np.ndarray]:
    """The slices of ``array`` that ONNX Runtime defines, one per batch row."""
    return [array[index] for index in _defined_parts(output_index, array.shape, spec, phase)]


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """uint8 [..., H/2] int4 cache -> its levels [..., H], element 2i from the low nibble."""
    levels = np.stack([packed & 0x0F, packed >> 4], axis=-1).astype(np.int16) - 8
    return levels.reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def _as_float32(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.astype(np.float32) if v.dtype == ml_dtypes.bfloat16 else v for k, v in feeds.items()}


_TIE_RETRIES = 3  # new inputs for a quantized-cache phase that failed on rounding ties only


def quantization_ties_only(
    expected: dict[int, np.ndarray], got: dict[int, np.ndarray], spec: GqaSpec, phase: Phase
) -> bool:
    """True when the only cache disagreement is a few levels off by one.

    A new K/V value whose x / scale falls within an fp32 ulp of a rounding
    boundary (n + 0.5) rounds either way depending on the last bit of the
    rotary or scale arithmetic, in ORT and in the expansion alike; the output
    then differs by a step of the dequantized value. Such a phase is not a
    miscompile: it is run again on other inputs (a real error fails again).
    ``got`` is keyed by output position, ``expected`` too.
    """
    if spec.kv_quant is None or not got:
        return False
    if gqa.PRESENT_KEY not in got:
        # Nobody reads present, so the expansion's levels are not there to look at:
        # any output-only failure gets other inputs (a real error fails every time).
        return True
    flips, elements = 0, 0
    for index in (gqa.PRESENT_KEY, gqa.PRESENT_VALUE):
        want, have = expected.get(index), got.get(index)
        if want is None or have is None or want.shape != have.shape:
            return False
        if spec.kv_bits == 4:
            want, have = _nibbles(want), _nibbles(have)
        for want_part, have_part in zip(
            _defined_elements(index, want.astype(np.int32), spec, phase),
            _defined_elements(index, have.astype(np.int32), spec, phase),
        ):
            difference = np.abs(want_part - have_part)
            if np.any(difference > 1):
                return False
            flips += int(np.count_nonzero(difference))
            elements += difference.size
    return 0 < flips <= max(2, elements // 1000)


@dataclasses.dataclass(frozen=True)
class _NodeCheck:
    """One node's oracle (the fused node on ORT CPU) and candidate (its expansion on a runtime)."""

    spec: GqaSpec
    used_outputs: tuple[int, ...]
    oracle_outputs: tuple[int, ...]
    run_oracle: core.Runner
    run_candidate: core.Runner
    runtime_label: str
    tolerance: tuple[float, float]

    def run_phase(self, phase: Phase, feeds: dict[str, np.ndarray]) -> tuple[PhaseResult, dict, dict]:
        """One phase on both; (result, expected, got), the last two keyed by output position."""
        bfloat16 = self.spec.dtype == ir.DataType.BFLOAT16
        try:
            outputs = self.run_oracle(_as_float32(feeds) if bfloat16 else feeds)
            expected = dict(zip(self.oracle_outputs, outputs.values()))
        except Exception as error:  # an ORT failure is a verification failure, not a crash
            return PhaseResult(phase, {}, False, f"ONNX Runtime failed: {core.first_line(error)}"), {}, {}
        try:
            got = dict(zip(self.used_outputs, self.run_candidate(feeds).values()))
        except Exception as error:  # a runtime's failure is a verification failure, not a crash
            return PhaseResult(phase, {}, False, f"{self.runtime_label} failed: {core.first_line(error)}"), {}, {}
        return self.compare(phase, expected, got), expected, got

    def compare(self, phase: Phase, expected: dict[int, np.ndarray], got: dict[int, np.ndarray]) -> PhaseResult:
        errors: dict[str, float] = {}
        passed, failure = True, None
        for index in self.used_outputs:
            label = _LABELS[index]
            want, have = expected[index], got[index]
            if want.shape != have.shape:
                passed, failure = False, f"{label} shape {have.shape} != {want.shape}"
                continue
            if self.spec.kv_bits == 4 and index in (gqa.PRESENT_KEY, gqa.PRESENT_VALUE):
                want, have = _nibbles(want), _nibbles(have)
            diff = core.compare(want, have, _defined_parts(index, want.shape, self.spec, phase), self.tolerance)
            errors[label] = diff.max_abs
            if not diff.passed:
                passed = False
                failure = failure or f"{label} differs by {diff.max_abs:.3g}"
        return PhaseResult(phase, errors, passed, failure)


def _lazy(make: Callable[[], core.Runner]) -> core.Runner:
    """A runner made on first use: a load failure is reported by each phase, like a run failure."""
    made: list[core.Runner] = []

    def run(feeds):
        if not made:
            made.append(make())
        return made[0](feeds)

    return run


def _candidate_runner(
    candidate: onnx.ModelProto, runtime: str | None, total_length_input: str | None, bfloat16: bool
) -> tuple[core.Runner, str]:
    """Runs the expansion on ``runtime`` (default ORT CPU; onnx.reference for bf16, which ORT's CPU ops
    cannot run); and the runtime's label. ``total_length_input``: the input whose value is read from a
    shape instead (:func:`gqa_decompose.runtimes.total_length_from_shape`)."""
    if bfloat16 and runtime is None:
        return _lazy(lambda: core.reference_runner(candidate)), "onnx.reference"
    if runtime is None and total_length_input is None:
        return _lazy(lambda: core.ort_runner(candidate)), "ONNX Runtime"
    from gqa_decompose import runtimes

    name = runtimes.get_runtime(runtime or "onnxruntime").name
    if total_length_input is None:
        return core.runtime_runner(candidate, name), name
    run = core.runtime_runner(runtimes.total_length_from_shape(candidate, total_length_input), name)
    return (lambda feeds: run(runtimes.length_as_shape(feeds, total_length_input))), name


def _node_check(
    node: ir.Node,
    spec: GqaSpec,
    lowering: Lowering,
    opset: int,
    ir_version: int,
    options: DecomposeOptions,
    used_outputs: Sequence[int],
    runtime: str | None,
    total_length_from_shape: bool,
    fused_on_runtime: bool,
) -> tuple[_NodeCheck, dict[int, str]]:
    """The one-node oracle and candidate models of ``node``, and the oracle's feed names by input position."""
    from gqa_decompose.api import decompose

    bfloat16 = spec.dtype == ir.DataType.BFLOAT16
    oracle_outputs = sorted(set(used_outputs) | ({gqa.PRESENT_KEY, gqa.PRESENT_VALUE} if spec.has_past else set()))
    oracle = extract_node_model(
        node, opset, ir_version, outputs=oracle_outputs, as_dtype=ir.DataType.FLOAT if bfloat16 else None
    )
    constants = {t.name for t in oracle.graph.initializer}
    feed_names = {i: name for i, name in enumerate(oracle.graph.node[0].input) if name and name not in constants}
    if any(_input_given(node, index) for index in (gqa.Q_NORM_WEIGHT, gqa.K_NORM_WEIGHT)):
        oracle = normalized_oracle_model(oracle, spec)
    candidate = extract_node_model(node, opset, ir_version, outputs=used_outputs)
    if not fused_on_runtime:
        candidate = decompose(candidate, options=options)
    total_length_input = feed_names.get(gqa.TOTAL_SEQUENCE_LENGTH) if total_length_from_shape else None
    run_candidate, label = _candidate_runner(candidate, runtime, total_length_input, bfloat16)
    tolerance = core.node_tolerance(spec.dtype, lowering.compute_dtype != ir.DataType.FLOAT)
    check = _NodeCheck(
        spec,
        tuple(used_outputs),
        tuple(oracle_outputs),
        _lazy(lambda: core.ort_runner(oracle)),
        run_candidate,
        label,
        tolerance,
    )
    return check, feed_names


def verify_node_model(
    node: ir.Node,
    opset: int,
    ir_version: int,
    options: DecomposeOptions | None = None,
    *,
    used_outputs: Sequence[int] | None = None,
    phases: Sequence[Phase] | None = None,
    seed: int = 0,
    runtime: str | None = None,
    total_length_from_shape: bool = False,
    fused_on_runtime: bool = False,
    raise_obstacle: str | None = None,
) -> NodeVerification:
    """Compare ``node`` on ORT CPU with its expansion, over ``phases`` (default: all it admits).

    ``runtime`` names the runtime the expansion runs on (see :mod:`gqa_decompose.runtimes`;
    default ONNX Runtime CPU); the fused node always runs on ONNX Runtime CPU. With
    ``total_length_from_shape`` the expansion reads ``total_sequence_length`` from an
    input's shape, as real producers feed it (for runtimes that need every shape to
    follow from the input shapes). With ``fused_on_runtime`` the GQA node itself, not
    its expansion, runs on ``runtime``: does the runtime implement GroupQueryAttention?
    """
    options = options or DecomposeOptions()
    spec = parse_gqa_node(node, options)
    target, fallback = resolve_target(spec, options, opset, raise_obstacle)
    lowering = Lowering.of(node, spec, options, target, opset)
    if used_outputs is None:
        used_outputs = [i for i, v in enumerate(node.outputs) if v is not None and v.name]
    check, feed_names = _node_check(
        node,
        spec,
        lowering,
        opset,
        ir_version,
        options,
        used_outputs,
        runtime,
        total_length_from_shape,
        fused_on_runtime,
    )
    if phases is None:
        phases = phases_for(node, spec, lowering)
    results = _run_phases(check, node, spec, phases, np.random.default_rng(seed), feed_names)
    if not results:
        return NodeVerification(
            spec.node_name, (), skipped="no phase fits the node's static shapes", target=target, fallback=fallback
        )
    return NodeVerification(spec.node_name, tuple(results), target=target, fallback=fallback)


def _run_phases(
    check: _NodeCheck,
    node: ir.Node,
    spec: GqaSpec,
    phases: Sequence[Phase],
    rng: np.random.Generator,
    feed_names: dict[int, str],
) -> list[PhaseResult]:
    """Run ``check`` on random inputs for each phase, one result per phase.

    A failure that only comes from quantization rounding ties is retried with
    fresh inputs (up to _TIE_RETRIES times): such a tie is not an expansion bug.
    """
    results = []
    for phase in phases:
        for _ in range(_TIE_RETRIES + 1):
            result, expected, got = check.run_phase(phase, synthesize_inputs(node, spec, phase, rng, feed_names))
            if result.passed or not quantization_ties_only(expected, got, spec, phase):
                break
        results.append(result)
    return results


def _node_signature(node: ir.Node, used_outputs: Sequence[int]) -> tuple:
    """What the one-node model of ``node`` depends on; equal signatures verify alike."""
    attributes = tuple(sorted((name, repr(attr.value)) for name, attr in node.attributes.items()))
    inputs = []
    for value in node.inputs:
        if value is None:
            inputs.append(None)
            continue
        constant = ir.convenience.get_const_tensor(value)
        inputs.append((value.dtype, str(value.shape), id(constant) if constant is not None else None))
    return attributes, tuple(inputs), tuple(used_outputs)


def verify(
    original: onnx.ModelProto | ir.Model,
    decomposed: onnx.ModelProto | ir.Model | None = None,
    *,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    runtime: str | None = None,
    total_length_from_shape: bool = False,
    options: DecomposeOptions | None = None,
    **fields,
) -> VerificationReport:
    """Check each GQA node of ``original`` against its expansion on ONNX Runtime CPU.

    ``original`` is not modified (an ``onnx_ir.Model`` is copied first). When
    ``decomposed`` is given, it must hold no GroupQueryAttention node.
    ``options`` are the :class:`DecomposeOptions` the model was decomposed with (or ``fields``, its fields
    as keywords).
    ``runtime`` runs each expansion on another runtime (:mod:`gqa_decompose.runtimes`)
    instead of ONNX Runtime CPU; the fused node is always run on ONNX Runtime CPU.
    ``total_length_from_shape``: see :func:`verify_node_model`.
    """
    if isinstance(original, onnx.ModelProto):
        model = ir.serde.deserialize_model(original)
    else:
        model = original.clone()  # tensors are shared, so external data stays where it is
    InferGqaTypesPass()(model)
    decompose_options = options_of(options, fields)
    found = find_gqa_nodes(model)
    # Each one-node model holds only the GQA node, so it takes the opset the rewrite gives that node (its
    # container's: a function's own import, or the model's as raised).
    plan = plan_gqa(model, decompose_options, found)
    settings = dict(seed=seed, runtime=runtime, total_length_from_shape=total_length_from_shape)
    nodes = []
    verified: dict[tuple, NodeVerification] = {}
    for index, item in enumerate(plan.nodes):
        verdict = _verify_planned(item, model.ir_version, decompose_options, plan.raise_obstacle, settings, verified)
        nodes.append(verdict)
        if progress is not None:
            progress(index + 1, len(found))
    leftover: tuple[str, ...] = ()
    if decomposed is not None:
        decomposed_ir = (
            ir.serde.deserialize_model(decomposed) if isinstance(decomposed, onnx.ModelProto) else decomposed
        )
        leftover = tuple(node.name for _, node in find_gqa_nodes(decomposed_ir))
    return VerificationReport(tuple(nodes), leftover)


def _verify_planned(
    item: PlannedGqa,
    ir_version: int,
    options: DecomposeOptions,
    raise_obstacle: str | None,
    settings: dict,
    verified: dict[tuple, NodeVerification],
) -> NodeVerification:
    """One planned GQA node: its refusal, the verdict of an identical node verified before (``verified``, by
    signature), or its own verification (``settings``: seed, runtime, total_length_from_shape)."""
    node, opset = item.node, item.opset
    used = [i for i in range(len(node.outputs)) if output_is_read(node, i)]
    if gqa.OUTPUT not in used:
        used.insert(0, gqa.OUTPUT)
    signature = (opset, _node_signature(node, used))
    if item.refusal is not None:
        return NodeVerification(node.name or "<unnamed GroupQueryAttention>", (), refused=item.refusal.reason)
    if signature in verified:
        # Same opset, attributes, input types, shapes and constants: the same one-node model.
        return dataclasses.replace(verified[signature], name=node.name or verified[signature].name)
    result = verify_node_model(
        node, opset, ir_version, options, used_outputs=used, raise_obstacle=raise_obstacle, **settings
    )
    verified[signature] = result
    return result
