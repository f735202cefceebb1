"""Model-level parity with ONNX Runtime CPU: a prompt, then decode steps, on the original and the rewritten model.

``verify.py`` checks each GQA node alone; this module checks what users run. From the graph's inputs it
synthesizes a generation loop, runs it on both models in lock step and compares every output of every step:

* ``input_ids``: random tokens below the vocabulary size (genai_config.json's ``vocab_size``, else the rows of
  the embedding table ``input_ids`` is gathered from, else the logits' last dim);
* ``attention_mask``: right-padded rows for batch > 1 (row b is 2·b tokens shorter, at least 1), ``[B, T]``
  with T the longest row, extended by a column of ones per decode step;
* ``position_ids``: ``cumsum(mask) - 1`` (0 on padding), the new tokens' columns;
* ``past_key_values.*``: in the layout the model is deployed with — empty and growing (present has P + S
  rows), or a static max-length buffer (onnxruntime-genai's ``past_present_share_buffer``, or
  ``--kv-cache static``), or, for a ``sliding_window_cache`` layer, a ring of its capacity;
* symbolic dims: the batch, prompt length and buffer lengths above, or ``dims`` (``--dim name=value``).

Feeds given by the user (``feeds``, ``--inputs feeds.npz``) replace the synthesized prompt feeds. Each decode
step feeds one new token per row, the original model's greedy choice (both models see the same tokens), and
each model its own present back as past. Compared, per step and output, on the elements ORT defines: logits of
query rows s < t_b in a right-padded prompt; present rows < t_b (windowed ring: < L(t_b)); everything of other
outputs. Errors are max |a − b| and that divided by max |expected|; an element passes when
|a − b| <= atol + rtol·|expected|. Greedy next tokens (argmax of the last valid row) are compared too.

ORT CPU runs a step with S > 1 after a past only for batch 1, so every decode step has S = 1; and it rejects
right padding with a windowed cache, so such models get rows of equal length.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from collections.abc import Callable, Mapping

import numpy as np
import onnx
import onnx_ir as ir

from gqa_decompose import spec as gqa
from gqa_decompose.errors import GqaDecomposeError
from gqa_decompose.model_io import read_genai_config, shares_kv_buffer
from gqa_decompose.passes import InferGqaTypesPass, find_gqa_nodes
from gqa_decompose.spec import DecomposeOptions, GqaSpec, parse_gqa_node
from gqa_decompose.verify import unfused_qk_norm_nodes, windowed_rows

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

# (atol, rtol) by the model's float type; errors compound over layers, so looser than node-level.
MODEL_TOLERANCES = {
    ir.DataType.FLOAT: (1e-4, 1e-4),
    ir.DataType.FLOAT16: (2e-2, 1e-2),
}
NATIVE_PRECISION_MODEL_TOLERANCES = {ir.DataType.FLOAT16: (5e-2, 2e-2)}
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

    @property
    def passed(self) -> bool:
        return self.skipped is None and bool(self.steps) and all(s.passed for s in self.steps)

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
        if self.skipped:
            return f"model not verified ({self.skipped})"
        status = "model verified" if self.passed else "MODEL VERIFICATION FAILED"
        agree, total = self.token_agreement
        parts = [f"{len(self.steps) - 1} decode steps, batch {self.batch}, {self.cache_layout}"]
        for kind in ("logits", "present", "other"):
            error = self.max_error(kind)
            if error is not None:
                parts.append(f"{kind} max error {error:.2g}")
        if total:
            parts.append(f"greedy tokens {agree}/{total} agree")
        failures = [f"step {s.step}: {s.failure or _first_failed(s)}" for s in self.steps if not s.passed]
        return f"{status}: prompt + {', '.join(parts)}" + (f"; {'; '.join(failures)}" if failures else "")


def _first_failed(step: StepResult) -> str:
    bad = [o for o in step.outputs if not o.passed]
    return f"{bad[0].name} differs by {bad[0].max_abs:.3g}" if bad else ""


def _output_kind(name: str) -> str:
    if name == "logits" or name.endswith("logits"):
        return "logits"
    return "present" if name.startswith("present") else "other"


# Reading the model -----------------------------------------------------------------------------------------


def _dim_names(value: ir.Value) -> list[int | str | None]:
    if value.shape is None:
        return []
    return [d if isinstance(d, int) else d.value for d in value.shape]


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


_NUMPY_TYPES = {
    ir.DataType.FLOAT: np.float32,
    ir.DataType.FLOAT16: np.float16,
    ir.DataType.INT8: np.int8,
    ir.DataType.UINT8: np.uint8,
    ir.DataType.INT64: np.int64,
    ir.DataType.INT32: np.int32,
}


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


def _plan(
    model: ir.Model,
    specs: dict[str, GqaSpec],
    config: dict,
    options: DecomposeOptions,
    batch: int | None,
    dims: Mapping[str, int],
    feeds: Mapping[str, np.ndarray],
    steps: int,
) -> _Plan:
    graph = model.graph
    by_name = {v.name: v for v in graph.inputs}
    names = config.get("model", {}).get("decoder", {}).get("inputs", {})
    output_names = config.get("model", {}).get("decoder", {}).get("outputs", {})

    def find(key: str, default: str) -> str | None:
        name = names.get(key, default)
        return name if name in by_name else None

    ids, mask, positions = find("input_ids", "input_ids"), find("attention_mask", "attention_mask"), None
    positions = find("position_ids", "position_ids")
    logits_name = output_names.get("logits", "logits")
    logits = next((v for v in graph.outputs if v.name == logits_name), None)
    bound: dict[str, int] = dict(dims)

    def np_type(name: str | None, default) -> np.dtype:
        if name is None or by_name[name].dtype not in _NUMPY_TYPES:
            return np.dtype(default)
        return np.dtype(_NUMPY_TYPES[by_name[name].dtype])

    # Batch and prompt length: --batch, then the user's feeds, then --dim on input_ids' dims, then defaults.
    ids_dims = _dim_names(by_name[ids]) if ids else []
    if ids and ids in feeds:
        feed_batch, prompt_length = feeds[ids].shape[:2]
        batch = batch or feed_batch
        if batch != feed_batch:
            raise GqaDecomposeError(f"--batch {batch} contradicts the fed {ids} of batch {feed_batch}")
    else:
        prompt_length = DEFAULT_PROMPT_LENGTH
        if len(ids_dims) > 1:
            if isinstance(ids_dims[1], int):
                prompt_length = ids_dims[1]
            elif ids_dims[1] in bound:
                prompt_length = bound[ids_dims[1]]
    if batch is None:
        batch = 2
        if ids_dims and isinstance(ids_dims[0], int):
            batch = ids_dims[0]
        elif ids_dims and ids_dims[0] in bound:
            batch = bound[ids_dims[0]]
    if len(ids_dims) > 1:
        for dim, size in ((ids_dims[0], batch), (ids_dims[1], prompt_length)):
            if isinstance(dim, str):
                bound.setdefault(dim, size)

    static = (options.static_kv_cache or shares_kv_buffer(config)) and not options.growing_kv_cache
    max_length = config.get("search", {}).get("max_length")
    caches = []
    window_config = config.get("model", {}).get("decoder", {}).get("sliding_window") or {}
    nodes_by_past: dict[str, tuple[ir.Node, GqaSpec, int]] = {}
    for _, node in find_gqa_nodes(model):
        spec = specs.get(node.name)
        if spec is None or not spec.has_past:
            continue
        for index in (gqa.PAST_KEY, gqa.PAST_VALUE):
            source = _trace_to_graph_input(node.inputs[index], graph)
            if source is not None:
                nodes_by_past[source.name] = (node, spec, index)
    for value in graph.inputs:
        if value.name not in nodes_by_past:
            continue
        node, spec, index = nodes_by_past[value.name]
        present_index = gqa.PRESENT_KEY if index == gqa.PAST_KEY else gqa.PRESENT_VALUE
        present_value = _trace_to_graph_output(
            node.outputs[present_index] if len(node.outputs) > present_index else None, graph
        )
        present = present_value.name if present_value is not None else _present_by_name(value.name, graph)
        past_dims = _dim_names(value) or [None] * 4
        heads = past_dims[1] if isinstance(past_dims[1], int) else spec.kv_num_heads
        width = past_dims[3] if isinstance(past_dims[3], int) else (
            spec.head_size // 2 if spec.kv_bits == 4 else spec.head_size)
        rows_dim = past_dims[2]
        declared = rows_dim if isinstance(rows_dim, int) else bound.get(rows_dim) if rows_dim else None
        window = spec.local_window_size if spec.sliding_window_cache else None
        if window is not None:
            capacity = declared or int(window_config.get("window_size") or 0) or window
            capacity = max(capacity, window)
        elif static:
            capacity = declared or min(int(max_length or STATIC_BUFFER_CAP), STATIC_BUFFER_CAP)
            capacity = max(capacity, 1)
            if capacity < prompt_length + steps:
                if declared or (max_length and max_length < prompt_length + steps):
                    raise GqaDecomposeError(
                        f"a static KV buffer of {capacity} rows cannot hold a prompt of {prompt_length} "
                        f"and {steps} decode steps"
                    )
                capacity = prompt_length + steps
        else:
            if declared:
                raise GqaDecomposeError(
                    f"--dim {rows_dim}={declared}: past '{value.name}' grows from empty in this layout; "
                    "a past length applies to a static KV buffer (--kv-cache static)"
                )
            capacity = None
        caches.append(CacheInput(value.name, present, np_type(value.name, np.float32), heads, width, capacity, window))
        if isinstance(rows_dim, str) and capacity is not None:
            bound.setdefault(rows_dim, capacity)
    windowed = any(c.window is not None for c in caches)
    padded = batch > 1 and not windowed and not options.growing_kv_cache and bool(caches)
    buffers = [c.capacity for c in caches if c.window is None and c.capacity is not None]
    parts = []
    if buffers:
        parts.append(f"static buffer of {max(buffers)} rows")
    elif any(c.window is None for c in caches):
        parts.append("growing cache")
    if windowed:
        parts.append("windowed ring")
    layout = ", ".join(parts) or "no KV cache"
    vocab = _vocab_size(model, config, ids or "", logits)
    return _Plan(
        ids=ids,
        mask=mask,
        positions=positions,
        ids_dtype=np_type(ids, np.int64),
        mask_dtype=np_type(mask, np.int64),
        positions_dtype=np_type(positions, np.int64),
        caches=tuple(caches),
        logits=logits.name if logits is not None else None,
        vocab=vocab,
        batch=batch,
        prompt_length=prompt_length,
        padded=padded,
        dims=bound,
        layout=layout,
    )


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
    for dim in _dim_names(value) if value.shape is not None else []:
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
    dtype = _NUMPY_TYPES.get(value.dtype)
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

    MatMulNBits with accuracy_level 4 quantizes activations to int8 at run time, so a 1e-7 difference
    upstream moves logits by ~1e-2; both models are compared with accuracy_level 1 (fp32) instead.
    """
    changed = 0
    for graph in (model.graph, *model.graph.subgraphs()):
        for node in graph:
            if node.op_type == "MatMulNBits" and node.domain == "com.microsoft":
                level = node.attributes.get("accuracy_level")
                if level is not None and level.value not in (0, 1):
                    node.attributes["accuracy_level"] = ir.AttrInt64("accuracy_level", 1)
                    changed += 1
    return [f"{changed} MatMulNBits nodes compared at accuracy_level 1 (int8 activations amplify rounding)"] if changed else []


def _normalize_qk_outside(model: ir.Model, specs: dict[str, GqaSpec]) -> int:
    """Move each GQA node's q/k norm (§16) out of the node (:func:`verify.unfused_qk_norm_nodes`), so
    ORT CPU runs the original. Returns how many nodes changed."""
    changed = 0
    for container, node in find_gqa_nodes(model):
        spec = specs.get(node.name)
        if spec is not None and (spec.q_norm or spec.k_norm):
            container.insert_before(node, unfused_qk_norm_nodes(node, spec))
            changed += 1
    return changed


def _session(model: ir.Model):
    import onnxruntime as ort

    proto = ir.serde.serialize_model(model)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    folders = {pathlib.Path(t.base_dir) for t in _external_tensors(model)}
    if len(folders) > 1:
        raise GqaDecomposeError("model-level verification needs every external-data file in one folder")
    if folders:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folders.pop()))
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _external_tensors(model: ir.Model) -> list[ir.ExternalTensor]:
    tensors = []
    for graph in (model.graph, *model.graph.subgraphs()):
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                tensors.append(value.const_value)
    return tensors


def _compare(
    name: str, expected: np.ndarray, got: np.ndarray, rows: list[slice | tuple], tolerance: tuple[float, float]
) -> OutputError:
    atol, rtol = tolerance
    worst = scale = 0.0
    passed = True
    for index in rows:
        want = expected[index].astype(np.float64)
        have = got[index].astype(np.float64)
        if want.size == 0:
            continue
        both_inf = np.isinf(want) & (want == have)
        with np.errstate(invalid="ignore"):
            difference = np.where(both_inf, 0.0, np.abs(want - have))
        difference = np.where(np.isnan(difference), np.inf, difference)
        finite = np.abs(np.where(np.isfinite(want), want, 0.0))
        worst = max(worst, float(difference.max()))
        scale = max(scale, float(finite.max()))
        passed &= bool(np.all(difference <= atol + rtol * finite))
    relative = worst / scale if scale > 0 else (0.0 if worst == 0 else math.inf)
    return OutputError(name, worst, relative, passed)


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
    **options,
) -> ModelVerification:
    """Run a prompt and ``steps`` decode steps on ``original`` and ``decomposed`` (ORT CPU) and compare.

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
        options: fields of :class:`DecomposeOptions`, as the model was (or is to be) decomposed with.

    Raises:
        GqaDecomposeError: the original model cannot be driven (an input that cannot be synthesized, or
            ONNX Runtime rejects the original model on the synthesized feeds).
    """
    from gqa_decompose.api import rewrite

    decompose_options = DecomposeOptions(**options)
    model, path = _as_ir(original)
    if isinstance(genai_config, dict):
        config = genai_config
    elif genai_config is not None:
        config = json.loads(pathlib.Path(genai_config).read_text())
    else:
        config = read_genai_config(path)
    if isinstance(feeds, (str, os.PathLike)):
        feeds = load_feeds(feeds)
    feeds = dict(feeds or {})
    InferGqaTypesPass()(model)
    specs: dict[str, GqaSpec] = {}
    for _, node in find_gqa_nodes(model):
        specs[node.name] = parse_gqa_node(node, decompose_options)
    if not specs:
        return ModelVerification(0, 0, "none", (0.0, 0.0), (), skipped="no GroupQueryAttention node")
    dtypes = {spec.dtype for spec in specs.values()}
    if ir.DataType.BFLOAT16 in dtypes:
        return ModelVerification(0, 0, "none", (0.0, 0.0), (),
                                 skipped="ONNX Runtime CPU has no bfloat16 GroupQueryAttention kernel")
    dtype = ir.DataType.FLOAT16 if ir.DataType.FLOAT16 in dtypes else ir.DataType.FLOAT
    tolerance = MODEL_TOLERANCES[dtype]
    if decompose_options.native_precision:
        tolerance = NATIVE_PRECISION_MODEL_TOLERANCES.get(dtype, tolerance)
    if decomposed is None:
        rewritten = model.clone()
        rewrite(rewritten, decompose_options)
    else:
        rewritten, _ = _as_ir(decomposed)
    plan = _plan(model, specs, config, decompose_options, batch, dict(dims or {}), feeds, steps)
    unknown = set(feeds) - {v.name for v in model.graph.inputs}
    if unknown:
        raise GqaDecomposeError(f"fed inputs the model does not have: {', '.join(sorted(unknown))}")
    notes = _prepare_for_ort(model)
    _prepare_for_ort(rewritten)
    normalized = _normalize_qk_outside(model, specs)
    if normalized:
        notes.append(f"{normalized} GQA nodes with q/k norm weights (which ORT CPU rejects) run in the original "
                     "as ORT's SimplifiedLayerNormalization on the heads, then GQA without the weights")
    if plan.padded:
        notes.append("right-padded batch: row b is 2*b tokens shorter")
    elif plan.batch > 1 and any(c.window is not None for c in plan.caches):
        notes.append("rows of equal length: ORT rejects right padding with a windowed KV cache")
    rng = np.random.default_rng(seed)
    try:
        original_session = _session(model)
    except Exception as error:
        raise GqaDecomposeError(f"ONNX Runtime CPU cannot load the original model: {_first_line(error)}") from error
    try:
        rewritten_session = _session(rewritten)
    except Exception as error:  # the rewritten model does not even load: a failed verification
        step = StepResult(0, plan.prompt_length, (), (), None, None,
                          f"ONNX Runtime cannot load the rewritten model: {_first_line(error)}")
        return ModelVerification(plan.batch, plan.prompt_length, plan.layout, tolerance, (step,), notes=tuple(notes))
    loop = _Loop(model, plan, feeds, rng)
    rewritten_inputs = {i.name for i in rewritten_session.get_inputs()}
    results = []
    rewritten_past = None
    for step in range(steps + 1):
        step_feeds, lengths = loop.feeds(step)
        try:
            expected = dict(zip([o.name for o in original_session.get_outputs()],
                                original_session.run(None, step_feeds)))
        except Exception as error:
            raise GqaDecomposeError(
                f"model-level verification: ONNX Runtime CPU fails on the original model at step {step} "
                f"({_shapes(step_feeds)}): {_first_line(error)}; "
                "bind symbolic dims with --dim or give the prompt's inputs with --inputs"
            ) from error
        rewritten_feeds = {**step_feeds, **(rewritten_past or {})}
        rewritten_feeds = {k: v for k, v in rewritten_feeds.items() if k in rewritten_inputs}
        try:
            got = dict(zip([o.name for o in rewritten_session.get_outputs()],
                           rewritten_session.run(None, rewritten_feeds)))
        except Exception as error:
            results.append(StepResult(step, loop.query_length, tuple(int(t) for t in lengths), (), None, None,
                                      f"the rewritten model fails on ONNX Runtime: {_first_line(error)}"))
            break
        result = _compare_step(step, plan, step_feeds, lengths, loop.query_length, expected, got, tolerance)
        results.append(result)
        loop.advance(expected, result.expected_tokens)
        rewritten_past = {c.past: got[c.present] for c in plan.caches if c.present in got}
        if progress is not None:
            progress(step + 1, steps + 1)
    return ModelVerification(plan.batch, plan.prompt_length, plan.layout, tolerance, tuple(results),
                             notes=tuple(notes))


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


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
        for value in model.graph.inputs:
            if value.name in known:
                continue
            self.others[value.name] = user_feeds.get(value.name)
            if self.others[value.name] is None:
                self.others[value.name] = _synthesize_other(value, plan.dims, rng)

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
                positions = np.maximum(np.cumsum(self.mask, axis=1) - 1, 0)[:, -self.ids.shape[1]:]
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
        else:  # no cache: each step runs the whole sequence again
            self.ids = np.concatenate([self.ids, new], axis=1)


def _compare_step(
    step: int,
    plan: _Plan,
    feeds: dict[str, np.ndarray],
    lengths: np.ndarray,
    query_length: int,
    expected: dict[str, np.ndarray],
    got: dict[str, np.ndarray],
    tolerance: tuple[float, float],
) -> StepResult:
    windows = {c.present: c.window for c in plan.caches if c.window is not None and c.present}
    presents = {c.present for c in plan.caches if c.present}
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
        if name in presents and want.ndim == 4:
            rows = []
            for b, length in enumerate(lengths):
                kept = int(length)
                if name in windows:
                    kept = windowed_rows(kept, want.shape[2], windows[name])
                rows.append((b, slice(None), slice(0, kept)))
        elif name == plan.logits and want.ndim == 3 and want.shape[1] == query_length:
            rows = [(b, slice(0, _valid_rows(step, int(length), query_length))) for b, length in enumerate(lengths)]
        else:
            rows = [(...,)]
        if want.dtype.kind not in "fc":  # a quantized cache's levels, or ids: exact on the defined elements only
            same = all(np.array_equal(want[index], have[index]) for index in rows)
            errors.append(OutputError(name, 0.0 if same else math.inf, 0.0 if same else math.inf, same))
            continue
        errors.append(_compare(name, want, have, rows, tolerance))
    expected_tokens = got_tokens = None
    if plan.logits in expected and plan.logits in got and expected[plan.logits].ndim == 3 and failure is None:
        last = [_valid_rows(step, int(length), query_length) - 1 for length in lengths]
        expected_tokens = tuple(int(np.argmax(expected[plan.logits][b, row])) for b, row in enumerate(last))
        got_tokens = tuple(int(np.argmax(got[plan.logits][b, row])) for b, row in enumerate(last))
    return StepResult(step, query_length, tuple(int(t) for t in lengths), tuple(errors), expected_tokens,
                      got_tokens, failure)


def _valid_rows(step: int, length: int, query_length: int) -> int:
    """Query rows ORT defines: in a right-padded prompt s < t_b, afterwards all of them."""
    return min(length, query_length) if step == 0 else query_length
