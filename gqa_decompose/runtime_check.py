"""``--check --runtime NAME``: does the rewritten model run on NAME, and give ORT's results?

Two questions per runtime:

* each GQA node: its expansion, run on the runtime, against the fused node on
  ONNX Runtime CPU over every phase its shapes admit (``verify(runtime=...)``,
  the same inputs and tolerances as the node-level verification; on runtimes
  that type a model from its input shapes, total_sequence_length is read from a
  shape, as real producers feed it);
* the whole model: the rewritten model is loaded on the runtime and runs a
  prompt (batch 1, a few tokens, empty past) with synthesized inputs; its
  outputs are compared with the original model's on ONNX Runtime CPU.

The whole-model run needs the weights: external data is read into memory.

The oracle is ONNX Runtime CPU on the original, except where ORT approximates: MatMulNBits (and QMoE) at
accuracy_level 4 round activations to int8. ORT on the rewrite fuses DequantizeLinear + MatMul back into
that kernel and matches; a runtime that computes the product exactly does not (0.07-0.10 on the int4
fixtures' logits). For every runtime but ``onnxruntime`` the original is run with those nodes at
accuracy_level 1 (fp32 activations, :func:`verify_core.exact_accuracy_levels`): the node's meaning, not
ORT's rounding. Only attributes of the in-memory copy change; its weights are not copied again.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir

from gqa_decompose import runtimes
from gqa_decompose import spec as gqa
from gqa_decompose import verify_core as core
from gqa_decompose.api import rewrite
from gqa_decompose.errors import GqaDecomposeError
from gqa_decompose.passes import find_gqa_nodes
from gqa_decompose.spec import DecomposeOptions, parse_gqa_node
from gqa_decompose.verify import VerificationReport, verify

__all__ = ["ModelRun", "RuntimeCheck", "check_runtime", "synthesize_prompt_feeds"]

PROMPT_LENGTH = 4


@dataclasses.dataclass(frozen=True)
class ModelRun:
    """The whole rewritten model on a runtime."""

    max_errors: dict[str, float]  # output name -> max abs error against the original on ORT
    failure: str | None = None
    oracle: str = "ONNX Runtime CPU"  # what the outputs were compared with

    @property
    def passed(self) -> bool:
        return self.failure is None

    @property
    def max_error(self) -> float | None:
        return max(self.max_errors.values()) if self.max_errors else None


@dataclasses.dataclass(frozen=True)
class RuntimeCheck:
    runtime: str
    version: str | None
    nodes: VerificationReport | None
    model: ModelRun
    unavailable: str | None = None  # the runtime cannot be imported

    @property
    def passed(self) -> bool:
        return self.unavailable is None and self.model.passed and (self.nodes is None or self.nodes.passed)


def _dim_value(
    dim: onnx.TensorShapeProto.Dimension, input_name: str, axis: int, rank: int, known: dict[str, int], past_rows: int
) -> int:
    """A size for a first prompt: past rows ``past_rows``, batch 1, everything else S."""
    if dim.HasField("dim_value"):
        return dim.dim_value
    if dim.dim_param in known:
        return known[dim.dim_param]
    label = dim.dim_param.lower()
    if "past" in label or ("past" in input_name.lower() and rank == 4 and axis == 2):
        return past_rows
    if "batch" in label or (axis == 0 and rank >= 2):
        return 1
    return PROMPT_LENGTH


def _cache_dims(model: ir.Model, options: DecomposeOptions) -> dict[str, int]:
    """Symbolic dims of past caches that GQA nodes read straight from the graph inputs:
    KV heads (axis 1) and head size (axis 3), which a name alone cannot tell."""
    known: dict[str, int] = {}
    for _, node in find_gqa_nodes(model):
        try:
            spec = parse_gqa_node(node, options)
        except GqaDecomposeError:
            continue
        width = spec.head_size // 2 if spec.kv_bits == 4 and spec.head_size else spec.head_size
        for index in (gqa.PAST_KEY, gqa.PAST_VALUE):
            value = node.inputs[index] if len(node.inputs) > index else None
            if value is None or value.shape is None or len(value.shape) != 4:
                continue
            for axis, size in ((1, spec.kv_num_heads), (3, width)):
                dim = value.shape[axis]
                if size is None:  # a head size known only at run time
                    continue
                if isinstance(dim, ir.SymbolicDim) and dim.value is not None:
                    known[dim.value] = size
            rows = value.shape[2]
            if spec.sliding_window_cache and isinstance(rows, ir.SymbolicDim) and rows.value is not None:
                # A ring holds at least the window from the first prompt on (ORT: "KV cache capacity (0) must
                # be at least local_window_size"); a full layer sharing the dim name reads it as a static buffer.
                known[rows.value] = max(known.get(rows.value, 0), spec.local_window_size)
    if not known:
        known.update(_concat_cache_dims(model))
    return known


def _concat_cache_dims(model: ir.Model) -> dict[str, int]:
    """KV heads and head size of pasts a graph Concat grows (no GQA node reads them: the builder's cpu fp16
    MultiHeadAttention graph), from the new rows' inferred type on a typed copy."""
    from gqa_decompose.passes import InferGqaTypesPass
    from gqa_decompose.verify_model import concat_past_sources

    typed = model.clone()  # tensors are shared: no weight is read
    InferGqaTypesPass()(typed)
    known: dict[str, int] = {}
    by_name = {value.name: value for value in typed.graph.inputs}
    for name, source in concat_past_sources(typed).items():
        shape = by_name[name].shape
        for axis, size in ((1, source.kv_heads), (3, source.width)):
            if shape is not None and isinstance(shape[axis], ir.SymbolicDim) and shape[axis].value is not None:
                known[shape[axis].value] = size
    return known


def synthesize_prompt_feeds(
    model: onnx.ModelProto, seed: int = 0, known_dims: dict[str, int] | None = None, past_rows: int = 0
) -> dict[str, np.ndarray]:
    """Inputs for a first prompt: batch 1, ``PROMPT_LENGTH`` tokens, past caches of ``past_rows``.

    Sizes come from the declared shapes (symbolic dims in ``known_dims`` as given,
    named like past -> ``past_rows``, batch -> 1, others -> the prompt length;
    a static KV buffer needs ``past_rows`` >= the prompt). Integer inputs: an attention mask of
    ones, positions 0..S-1, token ids 0/1 (valid for any vocabulary), GQA's
    seqlens_k and total_sequence_length for the prompt, zeros otherwise; float
    inputs: standard normal.
    """
    rng = np.random.default_rng(seed)
    initializers = {t.name for t in model.graph.initializer}
    feeds = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        dims = list(tensor_type.shape.dim)
        shape = tuple(
            _dim_value(d, value.name, axis, len(dims), known_dims or {}, past_rows) for axis, d in enumerate(dims)
        )
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        name = value.name.lower()
        if np.issubdtype(dtype, np.floating):
            array = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            array = np.ones(shape, dtype)
        elif "mask" in name:
            array = np.ones(shape, dtype)
        elif "seqlens" in name:  # GQA's seqlens_k as a model input: t_b - 1
            array = np.full(shape, PROMPT_LENGTH - 1, dtype)
        elif "total_sequence_length" in name:
            array = np.full(shape, PROMPT_LENGTH, dtype)
        elif "position" in name:
            array = np.broadcast_to(np.arange(shape[-1] if shape else 1), shape).astype(dtype)
        elif "ids" in name:
            array = rng.integers(0, 2, shape).astype(dtype)
        else:
            array = np.zeros(shape, dtype)
        feeds[value.name] = np.ascontiguousarray(array)
    return feeds


def _present_outputs(model: ir.Model) -> set[str]:
    """The graph outputs that are a GQA node's present_key or present_value (by output position, whatever
    their names)."""
    names = set()
    for _, node in find_gqa_nodes(model):
        for index in (gqa.PRESENT_KEY, gqa.PRESENT_VALUE):
            value = node.outputs[index] if len(node.outputs) > index else None
            if value is not None and value.is_graph_output():
                names.add(value.name)
    return names


# What ORT CPU has no kernel for, though other EPs run it (semantics doc §16): fused q/k norm.
_NO_CPU_KERNEL = ("q_norm_weight / k_norm_weight inputs are not supported",)


def _run_model(
    original: onnx.ModelProto,
    decomposed: onnx.ModelProto,
    runtime: str,
    feeds: dict[str, np.ndarray],
    presents: set[str],
) -> ModelRun:
    oracle = ModelRun.oracle
    try:
        expected = runtimes.get_runtime("onnxruntime").load(original).run(feeds)
    except Exception as error:  # not the runtime's fault
        message = core.first_line(error)
        if runtime == "onnxruntime" or not any(reason in message for reason in _NO_CPU_KERNEL):
            return ModelRun({}, f"the original model does not run on ONNX Runtime with synthesized inputs: {message}")
        # ORT CPU lacks a kernel the original needs (its nodes were verified with their own oracle, per node):
        # the runtime is compared with ORT running the rewrite, which shows it runs the rewrite as ORT does.
        try:
            expected = runtimes.get_runtime("onnxruntime").load(decomposed).run(feeds)
        except Exception as second:
            return ModelRun({}, f"neither the original nor the rewrite runs on ONNX Runtime: {core.first_line(second)}")
        oracle = "the rewrite on ONNX Runtime CPU (ORT CPU has no kernel for the original's fused q/k norm)"
    try:
        session = runtimes.get_runtime(runtime).load(decomposed)
    except Exception as error:
        return ModelRun({}, f"does not load: {core.first_line(error)}")
    try:
        got = session.run(feeds)
    except Exception as error:
        return ModelRun({}, f"fails to run a prompt: {core.first_line(error)}")
    errors: dict[str, float] = {}
    failure = None
    for name, want in expected.items():
        have = got.get(name)
        if have is None or have.shape != want.shape:
            failure = failure or f"output {name}: shape {None if have is None else have.shape} != {want.shape}"
            continue
        parts = [(...,)]
        if want.ndim == 4 and name in presents:
            # Rows past the prompt are undefined (ORT zeroes them; a static buffer keeps them).
            rows = core.defined_present_rows([PROMPT_LENGTH] * want.shape[0], want.shape[2])
            parts = [(b, slice(None), slice(0, kept)) for b, kept in enumerate(rows)]
        diff = core.compare(want, have, parts, core.model_tolerance_of(want))
        errors[name] = diff.max_abs
        if not diff.passed:
            failure = failure or f"output {name} differs from ONNX Runtime by {diff.max_abs:.3g}"
    return ModelRun(errors, failure, oracle)


def check_runtime(
    model: ir.Model,
    runtime: str,
    options: DecomposeOptions | None = None,
    *,
    verify_nodes: bool = True,
) -> RuntimeCheck:
    """Rewrite a copy of ``model`` in memory and run it (and each GQA node) on ``runtime``.

    ``model`` is not modified. Raises GqaDecomposeError for an unknown runtime name.
    """
    options = options or DecomposeOptions()
    chosen = runtimes.get_runtime(runtime)
    try:
        version = chosen.version()
    except GqaDecomposeError as error:
        return RuntimeCheck(runtime, None, None, ModelRun({}, error.reason), unavailable=error.reason)
    nodes = None
    if verify_nodes:
        nodes = verify(
            model,
            runtime=runtime,
            total_length_from_shape=chosen.shapes_from_input_shapes,
            options=options,
        )
    original = model.clone()
    ir.external_data.load_to_model(original)  # the runtimes need the weights
    decomposed = original.clone()
    rewrite(decomposed, options)
    oracle = _exact_oracle(original) if runtime != "onnxruntime" else ModelRun.oracle
    original_proto = ir.to_proto(original)
    past_rows = 2 * PROMPT_LENGTH if options.static_kv_cache else 0
    feeds = synthesize_prompt_feeds(original_proto, known_dims=_cache_dims(model, options), past_rows=past_rows)
    model_run = _run_model(original_proto, ir.to_proto(decomposed), runtime, feeds, _present_outputs(model))
    if model_run.oracle == ModelRun.oracle:  # the original ran on ORT: made exact where it would round
        model_run = dataclasses.replace(model_run, oracle=oracle)
    return RuntimeCheck(runtime, version, nodes, model_run)


def _exact_oracle(original: ir.Model) -> str:
    """Make ``original`` (a copy) exact on ORT where its nodes would round activations; the oracle's name.
    ORT on the rewrite fuses it back at its own level, so ``onnxruntime`` keeps the original as it is."""
    changed = core.exact_accuracy_levels(original)
    if not changed:
        return ModelRun.oracle
    return f"ONNX Runtime CPU with {changed} MatMulNBits/QMoE node(s) at accuracy_level 1 (fp32 activations)"
