"""Model-level parity with ONNX Runtime CPU: a prompt, then decode steps, on the original and the rewritten model.

``verify.py`` checks each GQA node alone; this module checks what users run. From the graph's inputs it
synthesizes a generation loop, runs it on both models in lock step and compares every output of every step:

* ``input_ids``: random tokens below the vocabulary size (genai_config.json's ``vocab_size``, else the rows of
  the embedding table ``input_ids`` is gathered from, else the logits' last dim);
* ``attention_mask``: right-padded rows for batch > 1 (row b is 2·b tokens shorter, at least 1), ``[B, T]``
  with T the longest row, extended by a column of ones per decode step;
* ``position_ids``: ``cumsum(mask) - 1`` (0 on padding), the new tokens' columns;
* ``past_key_values.*``: in every cache form the declared shapes and the options admit, one loop each —
  empty and growing (present has P + S rows), and a static max-length buffer; the one the model is deployed
  with first (onnxruntime-genai's ``past_present_share_buffer``, ``--kv-cache static|growing``), the other
  whatever genai_config.json says; a ``sliding_window_cache`` layer's past is a ring of its capacity in both;
* symbolic dims: the batch, prompt length and buffer lengths above, or ``dims`` (``--dim name=value``).

Feeds given by the user (``feeds``, ``--inputs feeds.npz``) replace the synthesized prompt feeds. Each decode
step feeds one new token per row, the original model's greedy choice (both models see the same tokens), and
each model its own present back as past. Compared, per step and output, on the elements ORT defines: logits of
query rows s < t_b in a right-padded prompt; present rows < t_b (windowed ring: < L(t_b)); everything of other
outputs. Integer (quantized) presents are compared on the same rows, exactly. Errors are max |a − b| and that
divided by max |expected|; an element passes when |a − b| <= atol + rtol·|expected| (:mod:`verify_core`).
Greedy next tokens (argmax of the last valid row) are compared too.

ORT CPU runs a step with S > 1 after a past only for batch 1, so every decode step has S = 1; and it rejects
right padding with a windowed cache, so such models get rows of equal length.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from gqa_decompose import spec as gqa
from gqa_decompose import verify_core as core
from gqa_decompose.errors import GqaDecomposeError
from gqa_decompose.model_io import read_genai_config, shares_kv_buffer
from gqa_decompose.passes import InferGqaTypesPass, find_gqa_nodes
from gqa_decompose.passes.decompose_ops import find_op_nodes
from gqa_decompose.spec import DecomposeOptions, GqaSpec, options_of, parse_gqa_node
from gqa_decompose.verify import unfused_qk_norm_nodes

__all__ = [
    "MODEL_TOLERANCES",
    "CacheInput",
    "ModelVerification",
    "OutputError",
    "StepResult",
    "load_feeds",
    "read_genai_config",
    "verify_model",
]

MODEL_TOLERANCES = core.MODEL_TOLERANCES  # (atol, rtol) by the model's float type
NATIVE_PRECISION_MODEL_TOLERANCES = core.NATIVE_PRECISION_MODEL_TOLERANCES
DEFAULT_PROMPT_LENGTH = 8
# A static buffer as long as genai's max_length, but at most this many rows unless a --dim asks for more
# (max_length is often the model's whole context: 128k rows per layer would cost gigabytes for nothing).
STATIC_BUFFER_CAP = 256


@dataclasses.dataclass(frozen=True)
class OutputError:
    """One output of one step: max |a − b|, that over max |expected|, and whether every element passed."""

    name: str
    max_abs: float
    max_rel: float
    passed: bool


@dataclasses.dataclass(frozen=True)
class StepResult:
    """One run of both models: step 0 is the prompt, then one decode step each."""

    step: int
    query_length: int
    total_lengths: tuple[int, ...]  # t_b per batch row after this step
    outputs: tuple[OutputError, ...]
    expected_tokens: tuple[int, ...] | None  # greedy next token per row (original); None without logits
    got_tokens: tuple[int, ...] | None
    failure: str | None = None  # the rewritten model failed to run, or a shape differs

    @property
    def kind(self) -> str:
        return "prompt" if self.step == 0 else "decode"

    @property
    def passed(self) -> bool:
        return self.failure is None and all(o.passed for o in self.outputs)

    @property
    def tokens_agree(self) -> int:
        if self.expected_tokens is None or self.got_tokens is None:
            return 0
        return sum(a == b for a, b in zip(self.expected_tokens, self.got_tokens))


@dataclasses.dataclass(frozen=True)
class CacheInput:
    """A past input, the present output it becomes, and the layout it is fed in."""

    past: str
    present: str | None
    dtype: np.dtype
    heads: int
    width: int  # last dim: head size (half of it for an int4 cache)
    capacity: int | None  # rows of a static buffer or windowed ring; None: growing (starts empty)
    window: int | None  # local_window_size of a sliding_window_cache layer


@dataclasses.dataclass(frozen=True)
class ModelVerification:
    """Result of :func:`verify_model`."""

    batch: int
    prompt_length: int
    cache_layout: str  # "growing", "static buffer of N rows", "none"; ", windowed ring" when a layer has one
    tolerance: tuple[float, float]
    steps: tuple[StepResult, ...]
    skipped: str | None = None  # why nothing ran (not a failure)
    notes: tuple[str, ...] = ()
    also: tuple[ModelVerification, ...] = ()  # the same loop with the other cache forms the model admits

    @property
    def passed(self) -> bool:
        """This loop and every other cache form's passed."""
        return (
            self.skipped is None
            and bool(self.steps)
            and all(s.passed for s in self.steps)
            and all(other.passed for other in self.also)
        )

    def max_errors(self) -> dict[str, tuple[float, float]]:
        """Output name -> (max abs, max rel) over all steps."""
        worst: dict[str, tuple[float, float]] = {}
        for step in self.steps:
            for error in step.outputs:
                abs_, rel = worst.get(error.name, (0.0, 0.0))
                worst[error.name] = (max(abs_, error.max_abs), max(rel, error.max_rel))
        return worst

    def max_error(self, kind: str) -> float | None:
        """Max abs error over outputs of one kind: "logits", "present" or "other"."""
        values = [v[0] for name, v in self.max_errors().items() if _output_kind(name) == kind]
        return max(values) if values else None

    @property
    def token_agreement(self) -> tuple[int, int]:
        """(agreeing, compared) greedy next tokens over all steps and rows."""
        compared = [s for s in self.steps if s.expected_tokens is not None and s.got_tokens is not None]
        return sum(s.tokens_agree for s in compared), sum(len(s.expected_tokens) for s in compared)

    def summary(self) -> str:
        """One line: the verdict over every cache form, then each form's figures."""
        if self.skipped:
            return f"model not verified ({self.skipped})"
        status = "model verified" if self.passed else "MODEL VERIFICATION FAILED"
        others = "".join(f"; prompt + {other._figures()}" for other in self.also)
        return f"{status}: prompt + {self._figures()}{others}"

    def _figures(self) -> str:
        agree, total = self.token_agreement
        parts = [f"{len(self.steps) - 1} decode steps, batch {self.batch}, {self.cache_layout}"]
        for kind in ("logits", "present", "other"):
            error = self.max_error(kind)
            if error is not None:
                parts.append(f"{kind} max error {error:.2g}")
        if total:
            parts.append(f"greedy tokens {agree}/{total} agree")
        failures = [f"step {s.step}: {s.failure or _first_failed(s)}" for s in self.steps if not s.passed]
        return ", ".join(parts) + (f"; {'; '.join(failures)}" if failures else "")


def _first_failed(step: StepResult) -> str:
    bad = [o for o in step.outputs if not o.passed]
    return f"{bad[0].name} differs by {bad[0].max_abs:.3g}" if bad else ""


def _output_kind(name: str) -> str:
    if name == "logits" or name.endswith("logits"):
        return "logits"
    return "present" if name.startswith("present") else "other"


# Reading the model -----------------------------------------------------------------------------------------


def _dims(value: ir.Value) -> list[int | str | None]:
    return core.dims(value) or []


def _trace_to_graph_input(value: ir.Value | None, graph: ir.Graph) -> ir.Value | None:
    """The graph input ``value`` is (or comes from through single-input ops such as Identity or Cast)."""
    for _ in range(4):
        if value is None:
            return None
        if value.is_graph_input() and value in graph.inputs:
            return value
        producer = value.producer()
        if producer is None or len([i for i in producer.inputs if i is not None]) != 1:
            return None
        value = producer.inputs[0]
    return None


def _trace_to_graph_output(value: ir.Value | None, graph: ir.Graph) -> ir.Value | None:
    for _ in range(4):
        if value is None:
            return None
        if value in graph.outputs:
            return value
        users = [use.node for use in value.uses()]
        if len(users) != 1 or len(users[0].outputs) != 1:
            return None
        value = users[0].outputs[0]
    return None


def _vocab_size(model: ir.Model, config: dict, ids_name: str, logits: ir.Value | None) -> int:
    vocab = config.get("model", {}).get("vocab_size")
    if isinstance(vocab, int) and vocab > 0:
        return vocab
    ids = next((v for v in model.graph.inputs if v.name == ids_name), None)
    if ids is not None:
        for use in ids.uses():
            node = use.node
            if node.op_type == "Gather" and use.idx == 1 and node.inputs[0] is not None:
                table = node.inputs[0]
                if table.shape is not None and isinstance(table.shape[0], int):
                    return table.shape[0]
    if logits is not None and logits.shape is not None and isinstance(logits.shape[-1], int):
        return logits.shape[-1]
    return 32


@dataclasses.dataclass(frozen=True)
class _Plan:
    """How to drive one model: input names, sizes, cache layout."""

    ids: str | None
    mask: str | None
    positions: str | None
    ids_dtype: np.dtype
    mask_dtype: np.dtype
    positions_dtype: np.dtype
    caches: tuple[CacheInput, ...]
    logits: str | None
    vocab: int
    batch: int
    prompt_length: int
    padded: bool  # right-padded rows for batch > 1
    dims: dict[str, int]
    layout: str


@dataclasses.dataclass(frozen=True)
class _Io:
    """The graph inputs and output a generation loop drives (None: the model has no such input)."""

    ids: str | None
    mask: str | None
    positions: str | None
    logits: ir.Value | None


def _find_io(model: ir.Model, config: dict) -> _Io:
    """input_ids, attention_mask, position_ids and logits, by genai_config.json's names or the usual ones."""
    decoder = config.get("model", {}).get("decoder", {})
    names, output_names = decoder.get("inputs", {}), decoder.get("outputs", {})
    inputs = {v.name for v in model.graph.inputs}

    def find(key: str) -> str | None:
        name = names.get(key, key)
        return name if name in inputs else None

    logits_name = output_names.get("logits", "logits")
    logits = next((v for v in model.graph.outputs if v.name == logits_name), None)
    return _Io(find("input_ids"), find("attention_mask"), find("position_ids"), logits)


def _sizes(
    ids: ir.Value | None, feeds: Mapping[str, np.ndarray], batch: int | None, bound: dict[str, int]
) -> tuple[int, int]:
    """(batch, prompt length): --batch, then the user's feeds, then --dim on input_ids' dims, then defaults.
    Binds input_ids' symbolic dims in ``bound``."""
    ids_dims = _dims(ids) if ids is not None else []
    if ids is not None and ids.name in feeds:
        feed_batch, prompt_length = feeds[ids.name].shape[:2]
        batch = batch or feed_batch
        if batch != feed_batch:
            raise GqaDecomposeError(f"--batch {batch} contradicts the fed {ids.name} of batch {feed_batch}")
    else:
        prompt_length = (
            _dim_size(ids_dims[1], bound, DEFAULT_PROMPT_LENGTH) if len(ids_dims) > 1 else (DEFAULT_PROMPT_LENGTH)
        )
    if batch is None:
        batch = _dim_size(ids_dims[0], bound, 2) if ids_dims else 2
    if len(ids_dims) > 1:
        for dim, size in ((ids_dims[0], batch), (ids_dims[1], prompt_length)):
            if isinstance(dim, str):
                bound.setdefault(dim, size)
    return batch, prompt_length


def _dim_size(dim: int | str | None, bound: Mapping[str, int], default: int) -> int:
    if isinstance(dim, int):
        return dim
    return bound.get(dim, default) if dim else default


@dataclasses.dataclass(frozen=True)
class _CacheSource:
    """The attention node a past input feeds, the output its present leaves by, and the cache's form."""

    node: ir.Node
    present_index: int
    kv_heads: int
    width: int  # last dim: head size (half of it for an int4 cache)
    window: int | None  # local_window_size of a sliding_window_cache layer


# com.microsoft.MultiHeadAttention's past_key / past_value inputs and present_key / present_value outputs.
_MHA_PASTS = ((6, 1), (7, 2))


def _past_sources(model: ir.Model, specs: Mapping[ir.Node, GqaSpec]) -> dict[str, _CacheSource]:
    """Graph input name -> where it is read, for each past a GQA node (or a MultiHeadAttention node, in a
    model without GQA: a torch dynamo export with H = Hkv) reads."""
    sources: dict[str, _CacheSource] = {}
    for _, node in find_gqa_nodes(model):
        spec = specs.get(node)
        if spec is None or not spec.has_past:
            continue
        width = spec.head_size // 2 if spec.kv_bits == 4 else spec.head_size
        window = spec.local_window_size if spec.sliding_window_cache else None
        for index, present in ((gqa.PAST_KEY, gqa.PRESENT_KEY), (gqa.PAST_VALUE, gqa.PRESENT_VALUE)):
            source = _trace_to_graph_input(node.inputs[index], model.graph)
            if source is not None:
                sources[source.name] = _CacheSource(node, present, spec.kv_num_heads, width, window)
    if not specs:
        sources.update(_mha_past_sources(model))
        sources.update({k: v for k, v in concat_past_sources(model).items() if k not in sources})
    return sources


def _mha_past_sources(model: ir.Model) -> dict[str, _CacheSource]:
    sources: dict[str, _CacheSource] = {}
    for node in model.graph:
        if (node.domain, node.op_type) != ("com.microsoft", "MultiHeadAttention") or "num_heads" not in node.attributes:
            continue
        heads = node.attributes["num_heads"].as_int()
        for index, present in _MHA_PASTS:
            value = node.inputs[index] if index < len(node.inputs) else None
            source = _trace_to_graph_input(value, model.graph)
            dims = _dims(source) if source is not None and source.shape is not None else []
            if source is not None and len(dims) == 4 and isinstance(dims[3], int):
                sources[source.name] = _CacheSource(node, present, heads, dims[3], None)
    return sources


def concat_past_sources(model: ir.Model) -> dict[str, _CacheSource]:
    """Pasts a graph Concat grows on the row axis into a present output, as the builder's cpu fp16 graph does
    before repeating the KV heads for MultiHeadAttention: heads and head size from the new rows' inferred type."""
    sources: dict[str, _CacheSource] = {}
    for value in model.graph.inputs:
        for concat, _ in value.uses():
            if concat.op_type != "Concat" or concat.domain not in ("", "ai.onnx") or len(concat.inputs) != 2:
                continue
            axis = concat.attributes["axis"].as_int() if "axis" in concat.attributes else None
            new_rows = concat.inputs[1]
            dims = _dims(new_rows) if new_rows is not None and new_rows.shape is not None else []
            is_present = concat.outputs[0] in model.graph.outputs
            if concat.inputs[0] is value and axis in (2, -2) and is_present and len(dims) == 4:
                if isinstance(dims[1], int) and isinstance(dims[3], int):
                    sources[value.name] = _CacheSource(concat, 0, dims[1], dims[3], None)
    return sources


@dataclasses.dataclass(frozen=True)
class _Run:
    """What every cache of one loop shares: the cache form and the sizes it must hold."""

    static: bool
    prompt_length: int
    steps: int
    max_length: int | None  # genai's search.max_length
    window_size: int | None  # genai's sliding_window.window_size


def _capacity(value: ir.Value, source: _CacheSource, declared: int | None, run: _Run) -> int | None:
    """Rows of past ``value`` in the first step: a ring's or static buffer's capacity; None: growing."""
    rows_dim = (_dims(value) or [None] * 4)[2]
    if source.window is not None:
        return max(declared or run.window_size or source.window, source.window)
    needed = run.prompt_length + run.steps
    if run.static:
        capacity = max(declared or min(int(run.max_length or STATIC_BUFFER_CAP), STATIC_BUFFER_CAP), 1)
        if capacity >= needed:
            return capacity
        if declared or (run.max_length and run.max_length < needed):
            raise GqaDecomposeError(
                f"a static KV buffer of {capacity} rows cannot hold a prompt of {run.prompt_length} "
                f"and {run.steps} decode steps"
            )
        return needed
    if declared:
        raise GqaDecomposeError(
            f"--dim {rows_dim}={declared}: past '{value.name}' grows from empty in this layout; "
            "a past length applies to a static KV buffer (--kv-cache static)"
        )
    return None


def _cache_input(
    value: ir.Value, source: _CacheSource, model: ir.Model, bound: dict[str, int], run: _Run
) -> CacheInput:
    """One past input in ``run``'s form; binds its symbolic row dim to the capacity."""
    node = source.node
    present_value = _trace_to_graph_output(
        node.outputs[source.present_index] if len(node.outputs) > source.present_index else None, model.graph
    )
    present = present_value.name if present_value is not None else _present_by_name(value.name, model.graph)
    past_dims = _dims(value) or [None] * 4
    heads = past_dims[1] if isinstance(past_dims[1], int) else source.kv_heads
    width = past_dims[3] if isinstance(past_dims[3], int) else source.width
    if width is None:  # a head size known only at run time: --dim binds it
        width = bound.get(past_dims[3]) if isinstance(past_dims[3], str) else None
    if width is None:
        raise GqaDecomposeError(
            f"cannot synthesize input '{value.name}': its head size is known only at run time; "
            + (f"bind it with --dim {past_dims[3]}=N" if isinstance(past_dims[3], str) else "give it with --inputs")
        )
    rows_dim = past_dims[2]
    declared = rows_dim if isinstance(rows_dim, int) else bound.get(rows_dim) if rows_dim else None
    capacity = _capacity(value, source, declared, run)
    if isinstance(rows_dim, str) and capacity is not None:
        bound.setdefault(rows_dim, capacity)
    return CacheInput(value.name, present, _numpy_type(value, np.float32), heads, width, capacity, source.window)


def _layout_label(caches: Sequence[CacheInput]) -> str:
    """ "growing cache", "static buffer of N rows", "windowed ring" (joined), or "no KV cache"."""
    buffers = [c.capacity for c in caches if c.window is None and c.capacity is not None]
    parts = []
    if buffers:
        parts.append(f"static buffer of {max(buffers)} rows")
    elif any(c.window is None for c in caches):
        parts.append("growing cache")
    if any(c.window is not None for c in caches):
        parts.append("windowed ring")
    return ", ".join(parts) or "no KV cache"


def _numpy_type(value: ir.Value | None, default) -> np.dtype:
    if value is None or value.dtype not in core.NUMPY_TYPES:
        return np.dtype(default)
    return np.dtype(core.NUMPY_TYPES[value.dtype])


def _plan(
    model: ir.Model,
    specs: Mapping[ir.Node, GqaSpec],
    config: dict,
    options: DecomposeOptions,
    batch: int | None,
    dims: Mapping[str, int],
    feeds: Mapping[str, np.ndarray],
    steps: int,
    static: bool,
) -> _Plan:
    """How to drive ``model``: a growing cache, or a ``static`` buffer (rings stay rings)."""
    by_name = {v.name: v for v in model.graph.inputs}
    io = _find_io(model, config)
    bound: dict[str, int] = dict(dims)
    batch, prompt_length = _sizes(by_name.get(io.ids or ""), feeds, batch, bound)
    window_config = config.get("model", {}).get("decoder", {}).get("sliding_window") or {}
    run = _Run(
        static,
        prompt_length,
        steps,
        config.get("search", {}).get("max_length"),
        int(window_config.get("window_size") or 0) or None,
    )
    sources = _past_sources(model, specs)
    caches = tuple(_cache_input(v, sources[v.name], model, bound, run) for v in model.graph.inputs if v.name in sources)
    windowed = any(c.window is not None for c in caches)
    return _Plan(
        ids=io.ids,
        mask=io.mask,
        positions=io.positions,
        ids_dtype=_numpy_type(by_name.get(io.ids or ""), np.int64),
        mask_dtype=_numpy_type(by_name.get(io.mask or ""), np.int64),
        positions_dtype=_numpy_type(by_name.get(io.positions or ""), np.int64),
        caches=caches,
        logits=io.logits.name if io.logits is not None else None,
        vocab=_vocab_size(model, config, io.ids or "", io.logits),
        batch=batch,
        prompt_length=prompt_length,
        padded=batch > 1 and not windowed and not options.growing_kv_cache and bool(caches),
        dims=bound,
        layout=_layout_label(caches),
    )


def _cache_forms(config: dict, options: DecomposeOptions) -> list[bool]:
    """The cache forms to drive, as ``static`` flags: the one the options promise, else both, the one
    genai_config.json names (``past_present_share_buffer``) first."""
    if options.growing_kv_cache:
        return [False]
    if options.static_kv_cache:
        return [True]
    first = shares_kv_buffer(config)
    return [first, not first]


def _present_by_name(past: str, graph: ir.Graph) -> str | None:
    """past_key_values.0.key -> present.0.key, past_key_0 -> present_key_0: the usual exporters' names."""
    outputs = {v.name for v in graph.outputs}
    for old, new in (("past_key_values", "present"), ("past", "present")):
        candidate = past.replace(old, new, 1)
        if candidate != past and candidate in outputs:
            return candidate
    return None


def _synthesize_other(value: ir.Value, dims: Mapping[str, int], rng: np.random.Generator) -> np.ndarray:
    """An input the generation loop does not know: random values of its declared shape."""
    shape = []
    for dim in _dims(value) if value.shape is not None else []:
        if isinstance(dim, int):
            shape.append(dim)
        elif dim in dims:
            shape.append(dims[dim])
        else:
            raise GqaDecomposeError(
                f"cannot synthesize input '{value.name}': its dim '{dim}' is unbound; "
                f"bind it with --dim {dim}=N or give the input with --inputs"
            )
    if value.shape is None:
        raise GqaDecomposeError(f"cannot synthesize input '{value.name}' of unknown shape; give it with --inputs")
    dtype = core.NUMPY_TYPES.get(value.dtype)
    if dtype is None:
        raise GqaDecomposeError(f"cannot synthesize input '{value.name}' of type {value.dtype}; give it with --inputs")
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(shape).astype(dtype)
    if value.dtype == ir.DataType.BOOL:
        return np.ones(shape, bool)
    return np.zeros(shape, dtype)


# Running -------------------------------------------------------------------------------------------------


def _prepare_for_ort(model: ir.Model) -> list[str]:
    """Make ORT's arithmetic deterministic between the two models; returns notes on what changed.

    MatMulNBits (and QMoE) with accuracy_level 4 quantizes activations to int8 at run time, so a 1e-7 difference
    upstream moves logits by ~1e-2; both models are compared with accuracy_level 1 (fp32) instead
    (:func:`verify_core.exact_accuracy_levels`; :func:`verify_core.ort_session` fuses the rewrite at level 1).
    """
    changed = core.exact_accuracy_levels(model)
    return (
        [f"{changed} MatMulNBits/QMoE nodes compared at accuracy_level 1 (int8 activations amplify rounding)"]
        if changed
        else []
    )


def _normalize_qk_outside(model: ir.Model, specs: Mapping[ir.Node, GqaSpec]) -> list[str]:
    """Move each GQA node's q/k norm (§16) out of the node (:func:`verify.unfused_qk_norm_nodes`), so
    ORT CPU runs the original. Returns a note on what changed."""
    changed = 0
    for container, node in find_gqa_nodes(model):
        spec = specs.get(node)
        if spec is not None and (spec.q_norm or spec.k_norm):
            container.insert_before(node, unfused_qk_norm_nodes(node, spec))
            changed += 1
    if not changed:
        return []
    return [
        f"{changed} GQA nodes with q/k norm weights (which ORT CPU rejects) run in the original "
        "as ORT's SimplifiedLayerNormalization on the heads, then GQA without the weights"
    ]


def load_feeds(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` file, by name (``--inputs``)."""
    try:
        with np.load(path) as archive:
            return {name: archive[name] for name in archive.files}
    except (OSError, ValueError) as error:
        raise GqaDecomposeError(f"cannot read feeds from {path}: {error}") from error


def _as_ir(model: onnx.ModelProto | ir.Model | str | os.PathLike) -> tuple[ir.Model, pathlib.Path | None]:
    from gqa_decompose import model_io

    if isinstance(model, ir.Model):
        return model.clone(), None  # tensors shared: external data stays where it is
    if isinstance(model, onnx.ModelProto):
        return ir.serde.deserialize_model(model), None
    path = pathlib.Path(model).absolute()
    return model_io.load_model(path), path


def verify_model(
    original: onnx.ModelProto | ir.Model | str | os.PathLike,
    decomposed: onnx.ModelProto | ir.Model | str | os.PathLike | None = None,
    *,
    steps: int = 4,
    batch: int | None = None,
    dims: Mapping[str, int] | None = None,
    feeds: Mapping[str, np.ndarray] | str | os.PathLike | None = None,
    genai_config: str | os.PathLike | dict | None = None,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    cache_forms: Sequence[str] | None = None,
    options: DecomposeOptions | None = None,
    **fields,
) -> ModelVerification:
    """Run a prompt and ``steps`` decode steps on ``original`` and ``decomposed`` (ORT CPU) and compare.

    Every cache form the declared shapes and the options admit is driven, a growing cache and a static buffer,
    the one genai_config.json's ``past_present_share_buffer`` names first (the result; ``also``: the others).
    A form the shapes rule out (a bound past length, a fed past) is left out, said in the notes.

    Args:
        original: the model with GroupQueryAttention nodes: a ModelProto, an onnx_ir.Model (not modified)
            or a path (its folder's genai_config.json is read).
        decomposed: the rewritten model; default: ``original`` decomposed with ``options``.
        steps: decode steps after the prompt, each one token per row.
        batch: batch size (default 2: a right-padded ragged batch; or the fed input_ids' batch).
        dims: sizes of symbolic dims by name, e.g. ``{"sequence_length": 16}`` for the prompt length or
            ``{"past_sequence_length": 512}`` for a static buffer's rows.
        feeds: the prompt's inputs by name (or an .npz path); missing ones are synthesized.
        genai_config: onnxruntime-genai's config (a path or the parsed dict), for the vocabulary size,
            input/output names and ``past_present_share_buffer``; default: beside ``original``'s path.
        cache_forms: drive only these of "growing" and "static" (default: every form admitted).
        options: the :class:`DecomposeOptions` the model was (or is to be) decomposed with (or ``fields``,
            its fields as keywords).

    Raises:
        GqaDecomposeError: the original model cannot be driven (an input that cannot be synthesized, or
            ONNX Runtime rejects the original model on the synthesized feeds).
    """
    decompose_options = options_of(options, fields)
    model, config, feeds = _load_inputs(original, genai_config, feeds)
    specs, companions = _nodes(model, decompose_options)
    skipped = _skip_reason(specs, companions)
    if skipped:
        return ModelVerification(0, 0, "none", (0.0, 0.0), (), skipped=skipped)
    rewritten, plans, tolerance, notes = _prepare_comparison(
        model, decomposed, specs, companions, config, decompose_options, batch, dims, feeds, steps, cache_forms
    )
    return _compare_forms(model, rewritten, plans, feeds, tolerance, notes, steps, seed, progress)


def _load_inputs(
    original: onnx.ModelProto | ir.Model | str | os.PathLike,
    genai_config: str | os.PathLike | dict | None,
    feeds: Mapping[str, np.ndarray] | str | os.PathLike | None,
) -> tuple[ir.Model, dict, dict[str, np.ndarray]]:
    """A copy of the original model (the caller's is not modified), its genai config and the prompt's feeds."""
    model, path = _as_ir(original)
    config = _config(genai_config, path)
    return model, config, dict((load_feeds(feeds) if isinstance(feeds, (str, os.PathLike)) else feeds) or {})


def _prepare_comparison(
    model: ir.Model,
    decomposed: onnx.ModelProto | ir.Model | str | os.PathLike | None,
    specs: Mapping[ir.Node, GqaSpec],
    companions: Sequence[ir.Node],
    config: dict,
    options: DecomposeOptions,
    batch: int | None,
    dims: Mapping[str, int] | None,
    feeds: Mapping[str, np.ndarray],
    steps: int,
    cache_forms: Sequence[str] | None,
) -> tuple[ir.Model, list[_Plan], tuple[float, float], list[str]]:
    """The rewritten model, one plan per cache form to drive (the deployed one first), the tolerance and the
    notes; both models made deterministic on ORT. GqaDecomposeError: the original cannot be driven as asked."""
    dtypes = {s.dtype for s in specs.values()} or {_node_float_type(node) for node in companions}
    tolerance = core.model_tolerance(dtypes, options.native_precision)
    rewritten = _rewritten(model, decomposed, options)
    forms = _selected_forms(config, options, bool(specs), cache_forms)
    plans, notes = _plans(model, specs, config, options, batch, dict(dims or {}), feeds, steps, forms)
    _reject_unknown_feeds(model, feeds)
    notes = _prepared_notes(model, rewritten, specs, plans[0], notes)
    return rewritten, plans, tolerance, notes


def _compare_forms(
    model: ir.Model,
    rewritten: ir.Model,
    plans: Sequence[_Plan],
    feeds: Mapping[str, np.ndarray],
    tolerance: tuple[float, float],
    notes: list[str],
    steps: int,
    seed: int,
    progress: Callable[[int, int], None] | None,
) -> ModelVerification:
    """Each plan driven on both models' ORT CPU sessions; a rewritten model ORT cannot load fails the first step."""
    try:
        sessions = _sessions(model, rewritten)
    except _RewrittenDoesNotLoad as error:  # a failed verification, not an error
        step = StepResult(0, plans[0].prompt_length, (), (), None, None, str(error))
        return _verification(plans[:1], [(step,)], tolerance, notes)
    results = [
        _drive(_Loop(model, plan, feeds, np.random.default_rng(seed)), *sessions, tolerance, steps, step_progress)
        for plan, step_progress in zip(plans, _form_progress(progress, len(plans), steps))
    ]
    return _verification(plans, results, tolerance, notes)


def _nodes(model: ir.Model, options: DecomposeOptions) -> tuple[dict[ir.Node, GqaSpec], list[ir.Node]]:
    """The model's GQA nodes (typed, then parsed: a refusal raises) and its companion-op nodes."""
    InferGqaTypesPass()(model)
    specs = {node: parse_gqa_node(node, options) for _, node in find_gqa_nodes(model)}
    return specs, [item.node for item in find_op_nodes(model, options.ops)]


def _reject_unknown_feeds(model: ir.Model, feeds: Mapping[str, np.ndarray]) -> None:
    unknown = set(feeds) - {v.name for v in model.graph.inputs}
    if unknown:
        raise GqaDecomposeError(f"fed inputs the model does not have: {', '.join(sorted(unknown))}")


def _prepared_notes(
    model: ir.Model, rewritten: ir.Model, specs: Mapping[ir.Node, GqaSpec], first: _Plan, notes: list[str]
) -> list[str]:
    """Both models made deterministic on ORT (and the original's q/k norms moved out); every note, in order."""
    if not specs and first.caches:
        notes = notes + ["no GroupQueryAttention: the caches grow by concatenation, so only a growing cache is driven"]
    notes = _prepare_for_ort(model) + notes + _normalize_qk_outside(model, specs) + _batch_notes(first)
    _prepare_for_ort(rewritten)
    return notes


def _selected_forms(
    config: dict, options: DecomposeOptions, has_gqa: bool, cache_forms: Sequence[str] | None
) -> list[bool]:
    """The cache forms to drive (``static`` flags), the deployed one first; without GQA one growing cache."""
    forms = [
        static
        for static in (_cache_forms(config, options) if has_gqa else [False])
        if cache_forms is None or ("static" if static else "growing") in cache_forms
    ]
    if not forms:
        raise GqaDecomposeError(f"no cache form of {list(cache_forms or [])} fits the options")
    return forms


def _form_progress(
    progress: Callable[[int, int], None] | None, forms: int, steps: int
) -> list[Callable[[int, int], None] | None]:
    """Per cache form, a step callback reporting progress over every form's steps."""
    if progress is None:
        return [None] * forms
    total = forms * (steps + 1)
    return [lambda step, _, done=index * (steps + 1): progress(done + step, total) for index in range(forms)]


def _verification(
    plans: Sequence[_Plan], results: Sequence[tuple[StepResult, ...]], tolerance: tuple[float, float], notes: list[str]
) -> ModelVerification:
    """The first form's verification, the others in ``also``; the notes carry the other forms' verdicts."""
    first = plans[0]
    also = tuple(
        ModelVerification(p.batch, p.prompt_length, p.layout, tolerance, r) for p, r in zip(plans[1:], results[1:])
    )
    notes = notes + [
        f"also driven ({'passed' if other.passed else 'FAILED'}): prompt + {other._figures()}" for other in also
    ]
    return ModelVerification(
        first.batch, first.prompt_length, first.layout, tolerance, results[0], notes=tuple(notes), also=also
    )


def _skip_reason(specs: Mapping[ir.Node, GqaSpec], companions: Sequence[ir.Node]) -> str | None:
    if not specs and not companions:
        return "no GroupQueryAttention node nor companion-op node"
    if any(spec.dtype == ir.DataType.BFLOAT16 for spec in specs.values()):
        return "ONNX Runtime CPU has no bfloat16 GroupQueryAttention kernel"
    return None


def _node_float_type(node: ir.Node) -> ir.DataType:
    """The float type a companion-op node computes in (its first input's), for the model's tolerance."""
    value = node.inputs[0] if node.inputs else None
    return value.dtype if value is not None and value.dtype is not None else ir.DataType.FLOAT


def _batch_notes(plan: _Plan) -> list[str]:
    if plan.padded:
        return ["right-padded batch: row b is 2*b tokens shorter"]
    if plan.batch > 1 and any(c.window is not None for c in plan.caches):
        return ["rows of equal length: ORT rejects right padding with a windowed KV cache"]
    return []


class _RewrittenDoesNotLoad(Exception):
    pass


def _sessions(model: ir.Model, rewritten: ir.Model) -> tuple:
    """ORT CPU sessions of the original and the rewritten model. The original failing to load is an error
    (nothing to compare with); the rewritten one failing raises :class:`_RewrittenDoesNotLoad`."""
    try:
        original_session = core.ort_session(model)
    except Exception as error:
        raise GqaDecomposeError(f"ONNX Runtime CPU cannot load the original model: {core.first_line(error)}") from error
    try:
        return original_session, core.ort_session(rewritten)
    except Exception as error:
        raise _RewrittenDoesNotLoad(
            f"ONNX Runtime cannot load the rewritten model: {core.first_line(error)}"
        ) from error


def _config(genai_config: str | os.PathLike | dict | None, path: pathlib.Path | None) -> dict:
    if isinstance(genai_config, dict):
        return genai_config
    if genai_config is not None:
        return json.loads(pathlib.Path(genai_config).read_text())
    return read_genai_config(path)


def _rewritten(model: ir.Model, decomposed, options: DecomposeOptions) -> ir.Model:
    from gqa_decompose.api import rewrite

    if decomposed is not None:
        return _as_ir(decomposed)[0]
    rewritten = model.clone()
    rewrite(rewritten, options)
    return rewritten


def _plans(
    model: ir.Model,
    specs: Mapping[ir.Node, GqaSpec],
    config: dict,
    options: DecomposeOptions,
    batch: int | None,
    dims: dict[str, int],
    feeds: Mapping[str, np.ndarray],
    steps: int,
    forms: Sequence[bool],
) -> tuple[list[_Plan], list[str]]:
    """One plan per cache form to drive (``static`` flags), and notes on forms left out. The first form's errors
    are raised (the user asked for it, or genai_config.json names it); another form the shapes rule out is a note."""
    plans = [_plan(model, specs, config, options, batch, dims, feeds, steps, forms[0])]
    notes = []
    for static in forms[1:]:
        label = "a static buffer" if static else "a growing cache"
        if any(c.past in feeds for c in plans[0].caches):
            notes.append(f"not driven with {label}: the past is fed (--inputs)")
            continue
        try:
            plan = _plan(model, specs, config, options, batch, dims, feeds, steps, static)
        except GqaDecomposeError as error:
            notes.append(f"not driven with {label}: {error.reason}")
            continue
        if plan.layout != plans[0].layout:  # rings only, or no cache: one form
            plans.append(plan)
    return plans, notes


def _drive(
    loop: _Loop,
    original_session,
    rewritten_session,
    tolerance: tuple[float, float],
    steps: int,
    progress: Callable[[int, int], None] | None,
) -> tuple[StepResult, ...]:
    """The prompt and ``steps`` decode steps on both sessions in lock step; stops at the rewritten model's
    first failure to run."""
    plan = loop.plan
    rewritten_inputs = {i.name for i in rewritten_session.get_inputs()}
    results = []
    rewritten_past = None
    for step in range(steps + 1):
        step_feeds, lengths = loop.feeds(step)
        try:
            expected = core.run_session(original_session, step_feeds)
        except Exception as error:
            raise GqaDecomposeError(
                f"model-level verification: ONNX Runtime CPU fails on the original model at step {step} "
                f"({_shapes(step_feeds)}): {core.first_line(error)}; "
                "bind symbolic dims with --dim or give the prompt's inputs with --inputs"
            ) from error
        rewritten_feeds = {**step_feeds, **(rewritten_past or {})}
        try:
            got = core.run_session(
                rewritten_session, {k: v for k, v in rewritten_feeds.items() if k in rewritten_inputs}
            )
        except Exception as error:
            results.append(
                StepResult(
                    step,
                    loop.query_length,
                    tuple(int(t) for t in lengths),
                    (),
                    None,
                    None,
                    f"the rewritten model fails on ONNX Runtime: {core.first_line(error)}",
                )
            )
            break
        result = _compare_step(step, plan, lengths, loop.query_length, expected, got, tolerance)
        results.append(result)
        loop.advance(expected, result.expected_tokens)
        rewritten_past = {c.past: got[c.present] for c in plan.caches if c.present in got}
        if progress is not None:
            progress(step + 1, steps + 1)
    return tuple(results)


def _shapes(feeds: Mapping[str, np.ndarray]) -> str:
    shown = list(feeds.items())[:3]
    return ", ".join(f"{k} {list(v.shape)}" for k, v in shown) + (", ..." if len(feeds) > 3 else "")


class _Loop:
    """The generation loop's inputs: the prompt, then one token per row per step."""

    def __init__(self, model: ir.Model, plan: _Plan, user_feeds: dict[str, np.ndarray], rng):
        self.model, self.plan, self.rng = model, plan, rng
        batch, length = plan.batch, plan.prompt_length
        if plan.mask and plan.mask in user_feeds:
            mask = user_feeds[plan.mask].astype(np.int64)
        else:
            row_lengths = [max(1, length - 2 * b) if plan.padded else length for b in range(batch)]
            mask = np.array([[1] * t + [0] * (length - t) for t in row_lengths], np.int64)
        self.mask = mask
        if plan.ids and plan.ids in user_feeds:
            ids = user_feeds[plan.ids]
        else:
            ids = rng.integers(0, plan.vocab, (batch, length))
        self.ids = np.asarray(ids).astype(plan.ids_dtype)
        self.user_feeds = user_feeds
        self.past: dict[str, np.ndarray] = {}
        for cache in plan.caches:
            if cache.past in user_feeds:
                self.past[cache.past] = user_feeds[cache.past]
                continue
            rows = cache.capacity or 0
            self.past[cache.past] = np.zeros((batch, cache.heads, rows, cache.width), cache.dtype)
        self.query_length = self.ids.shape[1]
        self.others: dict[str, np.ndarray] = {}
        known = {plan.ids, plan.mask, plan.positions, *(c.past for c in plan.caches)}
        by_name = {value.name: value for value in model.graph.inputs}
        ids_dims = _dims(by_name[plan.ids]) if plan.ids in by_name and by_name[plan.ids].shape is not None else []
        sequence_dim = ids_dims[1] if len(ids_dims) > 1 and isinstance(ids_dims[1], str) else None
        self.other_sequence_axes: dict[str, int] = {}  # others as long as the prompt (a BERT's token_type_ids)
        for value in model.graph.inputs:
            if value.name in known:
                continue
            self.others[value.name] = user_feeds.get(value.name)
            if self.others[value.name] is None:
                self.others[value.name] = _synthesize_other(value, plan.dims, rng)
            dims = _dims(value) if value.shape is not None else []
            if sequence_dim is not None and sequence_dim in dims:
                self.other_sequence_axes[value.name] = dims.index(sequence_dim)

    def feeds(self, step: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        plan = self.plan
        feeds: dict[str, np.ndarray] = {}
        if plan.ids:
            feeds[plan.ids] = self.ids
        if plan.mask:
            feeds[plan.mask] = self.mask.astype(plan.mask_dtype)
        lengths = self.mask.sum(axis=1)
        if plan.positions:
            if step == 0 and plan.positions in self.user_feeds:
                feeds[plan.positions] = self.user_feeds[plan.positions]
            else:
                positions = np.maximum(np.cumsum(self.mask, axis=1) - 1, 0)[:, -self.ids.shape[1] :]
                feeds[plan.positions] = positions.astype(plan.positions_dtype)
        feeds.update(self.past)
        feeds.update(self.others)
        self.query_length = self.ids.shape[1]
        return feeds, lengths

    def advance(self, outputs: dict[str, np.ndarray], tokens: tuple[int, ...] | None) -> None:
        """Next step: the original's greedy tokens (random ones without logits), presents as pasts."""
        plan = self.plan
        if tokens is None:
            tokens = tuple(int(t) for t in self.rng.integers(0, plan.vocab, plan.batch))
        new = np.array(tokens, dtype=plan.ids_dtype)[:, None]
        self.mask = np.concatenate([self.mask, np.ones((plan.batch, 1), self.mask.dtype)], axis=1)
        if plan.caches:
            self.ids = new
            for cache in plan.caches:
                if cache.present in outputs:
                    self.past[cache.past] = outputs[cache.present]
        else:  # no cache: each step runs the whole sequence again; the others grow with it (last column repeated)
            self.ids = np.concatenate([self.ids, new], axis=1)
            for name, axis in self.other_sequence_axes.items():
                other = self.others[name]
                self.others[name] = np.concatenate([other, np.take(other, [-1], axis=axis)], axis=axis)


def _compare_step(
    step: int,
    plan: _Plan,
    lengths: np.ndarray,
    query_length: int,
    expected: dict[str, np.ndarray],
    got: dict[str, np.ndarray],
    tolerance: tuple[float, float],
) -> StepResult:
    errors = []
    failure = None
    for name, want in expected.items():
        have = got.get(name)
        if have is None:
            failure = failure or f"the rewritten model has no output '{name}'"
            continue
        if want.shape != have.shape:
            failure = failure or f"{name} shape {list(have.shape)} != {list(want.shape)}"
            continue
        diff = core.compare(want, have, _defined_parts(name, want, plan, step, lengths, query_length), tolerance)
        errors.append(OutputError(name, diff.max_abs, diff.max_rel, diff.passed))
    expected_tokens = got_tokens = None
    if plan.logits in expected and plan.logits in got and expected[plan.logits].ndim == 3 and failure is None:
        last = [rows - 1 for rows in core.defined_query_rows(lengths, query_length, step == 0)]
        expected_tokens = tuple(int(np.argmax(expected[plan.logits][b, row])) for b, row in enumerate(last))
        got_tokens = tuple(int(np.argmax(got[plan.logits][b, row])) for b, row in enumerate(last))
    return StepResult(
        step, query_length, tuple(int(t) for t in lengths), tuple(errors), expected_tokens, got_tokens, failure
    )


def _defined_parts(
    name: str, want: np.ndarray, plan: _Plan, step: int, lengths: np.ndarray, query_length: int
) -> list[tuple]:
    """The index tuples of output ``name`` that ORT defines: a present's rows < t_b (ring: < L(t_b)), whatever
    its type (quantized levels too); logits of the defined query rows; all of any other output."""
    cache = next((c for c in plan.caches if c.present == name), None)
    if cache is not None and want.ndim == 4:
        rows = core.defined_present_rows(lengths, want.shape[2], cache.window)
        return [(b, slice(None), slice(0, kept)) for b, kept in enumerate(rows)]
    if name == plan.logits and want.ndim == 3 and want.shape[1] == query_length:
        rows = core.defined_query_rows(lengths, query_length, step == 0)
        return [(b, slice(0, kept)) for b, kept in enumerate(rows)]
    return [(...,)]
