"""What every verification shares: sessions per runtime, the elements GQA defines, tolerances, and the diff.

Three checks stand on this module: node-level (:mod:`gqa_decompose.verify`, each GQA node against its
expansion), model-level (:mod:`gqa_decompose.verify_model`, a prompt and decode steps on both models) and
other runtimes (:mod:`gqa_decompose.runtime_check`). A tolerance or "defined elements" fix made here holds
for all three.

The elements ONNX Runtime defines (semantics doc §12, §13), per batch row b of valid length t_b:

* output (and logits) rows of a first prompt: query rows s < t_b (right-padded queries are undefined);
  after the first prompt every query row;
* present rows < t_b (ORT zeroes the rest, or keeps whatever a shared buffer held); of a windowed ring,
  rows < L(t_b) (:func:`windowed_rows`); integer (quantized) caches alike;
* output_qk columns < t_b of the defined query rows.

Comparison: |a − b| per element, 0 where both are the same infinity, inf where either is NaN (or only one
is infinite); an element passes when |a − b| <= atol + rtol·|expected| (non-finite expected: atol only).
Integer tensors get (0, 0): equal levels or a failure, with the level difference as the error.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Callable, Iterable, Mapping, Sequence

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir

from gqa_decompose.errors import GqaDecomposeError

__all__ = [
    "APPROXIMATING_OPS",
    "EXACT_ACCURACY_LEVEL",
    "MODEL_TOLERANCES",
    "NATIVE_PRECISION_MODEL_TOLERANCES",
    "NATIVE_PRECISION_NODE_TOLERANCES",
    "NODE_TOLERANCES",
    "NUMPY_TYPES",
    "Diff",
    "Runner",
    "compare",
    "defined_present_rows",
    "defined_query_rows",
    "dims",
    "exact_accuracy_levels",
    "first_line",
    "model_tolerance",
    "node_tolerance",
    "ort_runner",
    "ort_session",
    "reference_runner",
    "run_session",
    "runtime_runner",
    "windowed_rows",
]

# Tolerances --------------------------------------------------------------------------------------------------

# (atol, rtol) of one node against ORT's fused kernel, by the node's float type.
NODE_TOLERANCES = {
    ir.DataType.FLOAT: (1e-5, 1e-5),
    ir.DataType.FLOAT16: (2e-3, 1e-3),
    # ORT has no bfloat16 GQA kernel: the oracle is its fp32 kernel on the same
    # (bf16-representable) inputs, and the expansion, which ORT's CPU ops cannot
    # run in bf16 either, runs on onnx.reference. Q, K and the output are
    # rounded to bf16 on our side only, hence a bf16-ulp tolerance.
    ir.DataType.BFLOAT16: (2e-2, 1e-2),
}
# With native_precision the expansion computes in fp16/bf16 while ORT's kernel uses fp32.
NATIVE_PRECISION_NODE_TOLERANCES = {
    ir.DataType.FLOAT16: (1e-2, 1e-2),
    ir.DataType.BFLOAT16: (5e-2, 2e-2),
}
# A whole model's outputs: errors compound over layers, so looser than one node.
MODEL_TOLERANCES = {
    ir.DataType.FLOAT: (1e-4, 1e-4),
    ir.DataType.FLOAT16: (2e-2, 1e-2),
}
NATIVE_PRECISION_MODEL_TOLERANCES = {ir.DataType.FLOAT16: (5e-2, 2e-2)}

NUMPY_TYPES = {
    ir.DataType.FLOAT: np.float32,
    ir.DataType.FLOAT16: np.float16,
    ir.DataType.BFLOAT16: ml_dtypes.bfloat16,
    ir.DataType.INT8: np.int8,
    ir.DataType.UINT8: np.uint8,
    ir.DataType.INT32: np.int32,
    ir.DataType.INT64: np.int64,
    ir.DataType.BOOL: np.bool_,
}


def node_tolerance(dtype: ir.DataType, native_precision: bool) -> tuple[float, float]:
    """(atol, rtol) for one node of float type ``dtype`` (computed in it when ``native_precision``)."""
    if native_precision and dtype in NATIVE_PRECISION_NODE_TOLERANCES:
        return NATIVE_PRECISION_NODE_TOLERANCES[dtype]
    return NODE_TOLERANCES[dtype]


def model_tolerance(dtypes: Iterable[ir.DataType], native_precision: bool = False) -> tuple[float, float]:
    """(atol, rtol) for a whole model whose GQA nodes have float types ``dtypes``: the loosest one's."""
    dtype = ir.DataType.FLOAT16 if ir.DataType.FLOAT16 in set(dtypes) else ir.DataType.FLOAT
    if native_precision:
        return NATIVE_PRECISION_MODEL_TOLERANCES.get(dtype, MODEL_TOLERANCES[dtype])
    return MODEL_TOLERANCES[dtype]


def model_tolerance_of(array: np.ndarray) -> tuple[float, float]:
    """The whole-model tolerance for an output of ``array``'s type (fp16: fp16's, anything else fp32's)."""
    return MODEL_TOLERANCES[ir.DataType.FLOAT16 if array.dtype == np.float16 else ir.DataType.FLOAT]


# The elements GQA defines ------------------------------------------------------------------------------------


def windowed_rows(length: int, capacity: int, window: int) -> int:
    """L(t_b): rows of a windowed cache of ``capacity`` rows that hold tokens (semantics doc §12)."""
    if length <= capacity:
        return length
    gap = capacity - window + 1
    return length - gap * math.ceil((length - capacity) / gap)


def defined_query_rows(lengths: Sequence[int], query_length: int, first_prompt: bool) -> list[int]:
    """Query rows defined per batch row: s < t_b in a (right-padded) first prompt, else all of them."""
    return [min(int(t), query_length) if first_prompt else query_length for t in lengths]


def defined_present_rows(lengths: Sequence[int], capacity: int, window: int | None = None) -> list[int]:
    """Present rows defined per batch row: t_b, or L(t_b) for a windowed ring of ``capacity`` rows."""
    if window is None:
        return [int(t) for t in lengths]
    return [windowed_rows(int(t), capacity, window) for t in lengths]


# The diff ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Diff:
    """max |a − b| over the compared elements, the largest finite |expected| there, and the verdict."""

    max_abs: float
    scale: float
    passed: bool

    @property
    def max_rel(self) -> float:
        """max_abs over max |expected| (0 for equal zeros, inf for a difference from zeros)."""
        if self.scale > 0:
            return self.max_abs / self.scale
        return 0.0 if self.max_abs == 0 else math.inf


def compare(
    expected: np.ndarray,
    got: np.ndarray,
    parts: Sequence[tuple] = ((...,),),
    tolerance: tuple[float, float] = (0.0, 0.0),
) -> Diff:
    """Compare ``expected`` and ``got`` on the elements ``parts`` index (one index tuple each; default all).

    inf/NaN-aware: the same infinity on both sides is equal, NaN anywhere is an error of inf. Integer
    tensors are compared exactly whatever ``tolerance`` says.
    """
    atol, rtol = (0.0, 0.0) if expected.dtype.kind in "iub" else tolerance
    worst = scale = 0.0
    passed = True
    for index in parts:
        want = np.asarray(expected[index]).astype(np.float64)
        have = np.asarray(got[index]).astype(np.float64)
        if want.size == 0:
            continue
        both_inf = np.isinf(want) & (want == have)
        with np.errstate(invalid="ignore"):  # inf - inf where both are the same infinity
            difference = np.where(both_inf, 0.0, np.abs(want - have))
        difference = np.where(np.isnan(difference), np.inf, difference)
        finite = np.abs(np.where(np.isfinite(want), want, 0.0))
        worst = max(worst, float(difference.max()))
        scale = max(scale, float(finite.max()))
        passed &= bool(np.all(difference <= atol + rtol * finite))
    return Diff(worst, scale, passed)


# Sessions per runtime ----------------------------------------------------------------------------------------

# A runner: feeds by input name (extra ones ignored) -> every graph output by name.
Runner = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]


def ort_session(model: ir.Model | onnx.ModelProto):
    """An ONNX Runtime CPU session of ``model``. An ir.Model's external data is read from where it lies
    (every external tensor in one folder), never copied into memory."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # ORT fuses a rewritten MatMulNBits (DequantizeLinear + MatMul) back into its own kernel, at accuracy
    # level 4 (int8 activations) unless told; the original is compared at level 1 (fp32): so is the rewrite.
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    if isinstance(model, ir.Model):
        from gqa_decompose.model_io import external_tensors

        folders = {pathlib.Path(t.base_dir) for t in external_tensors(model)}
        if len(folders) > 1:
            raise GqaDecomposeError("verification needs every external-data file in one folder")
        if folders:
            options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folders.pop()))
        model = ir.serde.serialize_model(model)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


# Contrib ops whose ORT CPU kernel rounds activations to int8 at accuracy_level 4 (and may use fp16/bf16 at 2/3).
APPROXIMATING_OPS = ("MatMulNBits", "QMoE")
EXACT_ACCURACY_LEVEL = 1  # fp32 activations; 0 ("unset") means the same on CPU (measured equal on both int4 fixtures)


def exact_accuracy_levels(model: ir.Model) -> int:
    """Set ``accuracy_level`` to 1 (fp32 compute) on every MatMulNBits and QMoE node of ``model`` (every graph
    and function) that ORT would run approximately; returns how many changed.

    ORT's answer for such a node is int8 rounding of its activations, not what the node means: a runtime that
    computes the dequantized product exactly (onnx.reference, OpenVINO, ORT on the rewrite without its fusion)
    differs by ~1e-1 on logits. Only attributes change: the weights are shared, not copied. Block-wise 8-bit
    QMoE experts round to int8 at any level (no ORT setting avoids it)."""
    changed = 0
    graphs = (model.graph, *model.graph.subgraphs(), *model.functions.values())
    for graph in graphs:
        for node in graph:
            if node.op_type not in APPROXIMATING_OPS or node.domain != "com.microsoft":
                continue
            level = node.attributes.get("accuracy_level")
            if level is not None and level.value not in (0, EXACT_ACCURACY_LEVEL):
                node.attributes["accuracy_level"] = ir.AttrInt64("accuracy_level", EXACT_ACCURACY_LEVEL)
                changed += 1
    return changed


def run_session(session, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run an ORT session on the feeds it has inputs for; every output by name."""
    wanted = {i.name for i in session.get_inputs()}
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {k: v for k, v in feeds.items() if k in wanted})))


def ort_runner(model: ir.Model | onnx.ModelProto) -> Runner:
    """``model`` on ONNX Runtime CPU, loaded at once."""
    session = ort_session(model)
    return lambda feeds: run_session(session, feeds)


def reference_runner(model: onnx.ModelProto) -> Runner:
    """``model`` on onnx.reference (the spec's semantics in numpy: slow, and the only bf16 runtime here)."""
    from onnx.reference import ReferenceEvaluator

    evaluator = ReferenceEvaluator(model)
    wanted = set(evaluator.input_names)
    names = [o.name for o in model.graph.output]

    def run(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(names, evaluator.run(None, {k: v for k, v in feeds.items() if k in wanted})))

    return run


def runtime_runner(model: onnx.ModelProto, runtime: str) -> Runner:
    """``model`` on ``runtime`` (:mod:`gqa_decompose.runtimes`), loaded on first use: a load failure surfaces
    at the first run, like a run failure."""
    from gqa_decompose import runtimes

    chosen = runtimes.get_runtime(runtime)
    sessions: list = []
    wanted = {i.name for i in model.graph.input}

    def run(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not sessions:
            sessions.append(chosen.load(model))
        return sessions[0].run({k: v for k, v in feeds.items() if k in wanted})

    return run


# Small helpers -----------------------------------------------------------------------------------------------


def dims(value: ir.Value) -> list[int | str | None] | None:
    """A value's dims: ints for static ones, names (or None) for symbolic ones; None without a shape."""
    if value.shape is None:
        return None
    return [d if isinstance(d, int) else d.value for d in value.shape]


def first_line(error: BaseException) -> str:
    """The first line of an error's message (an ORT message can be pages long), or its type's name."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
