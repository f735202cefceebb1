"""Run a model on another runtime: "load this model, run these feeds, give me the outputs".

One small adapter per runtime, so tests, ``--check --runtime`` and
``scripts/portability_table.py`` ask every runtime the same question::

    session = get_runtime("openvino").load(model)      # ModelProto or path
    outputs = session.run({"query": q, ...})            # {output name: ndarray}

Runtimes are imported when first used: a runtime that is not installed gives a
:class:`GqaDecomposeError` naming the package to install, never an ImportError.

* ``onnxruntime``: ONNX Runtime, CPU execution provider (the oracle's runtime).
* ``reference``: ``onnx.reference.ReferenceEvaluator``, the ONNX spec's own
  semantics in numpy (slow: keep the inputs small).
* ``openvino``: OpenVINO, CPU plugin, with ``INFERENCE_PRECISION_HINT=f32``.
  On CPUs with AMX or AVX512-BF16 its default is bf16 for every float32 model,
  which is a precision choice of the deployment, not a property of the model;
  the adapter asks for f32 so results are comparable with ONNX Runtime.
* ``tract``: Sonos' tract (the ``tract`` Python bindings). tract types a model
  once from its input shapes; the adapter strips value_info and specializes the
  model to each run's input shapes (one compiled model per shape set).
* ``wasm`` and ``webnn``: onnxruntime-web in headless Chromium, on its wasm
  backend or on WebNN (CPU, strict: no node may fall back to the CPU), through
  the node harness in ``tests/browser`` (``npm install --prefix tests/browser``);
  see :mod:`gqa_decompose.browser`.
* ``iree``: IREE, ``iree-import-onnx`` then ``iree-compile`` for the CPU, the
  dynamic dims as written (:mod:`gqa_decompose.runtime_iree`).
* ``tvm``: Apache TVM's Relax ONNX frontend on the CPU, one fixed-shape copy per
  set of input shapes (:mod:`gqa_decompose.runtime_tvm`).
* ``litert``: LiteRT's interpreter on a .tflite that onnx2tf converts from a
  fixed-shape copy, in a Python of its own (:mod:`gqa_decompose.runtime_litert`).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import pathlib
import re
import tempfile
from collections.abc import Callable, Mapping

import numpy as np
import onnx

from gqa_decompose.errors import GqaDecomposeError

__all__ = [
    "RUNTIMES",
    "Runtime",
    "Session",
    "available_runtimes",
    "get_runtime",
    "length_as_shape",
    "total_length_from_shape",
]

ModelSource = onnx.ModelProto | str | os.PathLike


class Session:
    """A loaded model: ``run(feeds)`` returns every graph output by name."""

    def __init__(
        self,
        output_names: list[str],
        run: Callable[[dict[str, np.ndarray]], list[np.ndarray]],
        keep_alive: object = None,
    ):
        self.output_names = output_names
        self._run = run
        self._keep_alive = keep_alive  # e.g. the temporary folder of a runtime that reads files

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self._run(dict(feeds))))


@dataclasses.dataclass(frozen=True)
class Runtime:
    """One runtime: its name, the package it needs, and how to load a model on it."""

    name: str
    package: str  # what to pip install (the first one's version is the runtime's)
    description: str
    _module: str  # the module(s) to import, comma-separated
    _load: Callable[[onnx.ModelProto], Session]
    # Types the model once from its input shapes: every shape must follow from the
    # inputs' shapes, so GQA's total_sequence_length has to come from a shape (as
    # real producers feed it: the attention mask's width), not be a free input.
    shapes_from_input_shapes: bool = False

    def version(self) -> str:
        """The installed version (raises GqaDecomposeError when not installed)."""
        _import(self)
        from importlib import metadata

        return metadata.version(self.package.split()[0])

    def load(self, model: ModelSource) -> Session:
        """Load ``model`` (a ModelProto or a path; external data next to the path is used)."""
        _import(self)
        if not isinstance(model, onnx.ModelProto):
            model = onnx.load(os.fspath(model))
        return self._load(model)


def _import(runtime: Runtime):
    if isinstance(runtime, _BrowserRuntime | _LiteRtRuntime):  # not a module of this Python
        return runtime.require()
    try:
        return [importlib.import_module(module) for module in runtime._module.split(",")][0]
    except ImportError as error:
        raise GqaDecomposeError(
            f"runtime '{runtime.name}' is not available: {error} (pip install {runtime.package})"
        ) from None


def _output_names(model: onnx.ModelProto) -> list[str]:
    return [output.name for output in model.graph.output]


def _input_names(model: onnx.ModelProto) -> list[str]:
    initializers = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in initializers]


def _only(feeds: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    """The feeds the model takes: an input missing from ``feeds`` is an error of the caller."""
    missing = [name for name in names if name not in feeds]
    if missing:
        raise GqaDecomposeError(f"no feed for the model's input(s) {', '.join(missing)}")
    return {name: feeds[name] for name in names}


# ONNX Runtime --------------------------------------------------------------------------------


def _load_onnxruntime(model: onnx.ModelProto) -> Session:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    return Session(outputs, lambda feeds: session.run(outputs, _only(feeds, inputs)))


# onnx.reference --------------------------------------------------------------------------------


def _load_reference(model: onnx.ModelProto) -> Session:
    from onnx.reference import ReferenceEvaluator

    evaluator = ReferenceEvaluator(model)
    inputs = list(evaluator.input_names)
    outputs = list(evaluator.output_names)
    return Session(outputs, lambda feeds: evaluator.run(None, _only(feeds, inputs)))


# OpenVINO -------------------------------------------------------------------------------------


# fp32 everywhere: no bf16/fp16 inference, and no int8 rounding of the activations of a MatMul with int4/int8
# weights (OpenVINO's CPU plugin does that by default per group of 32, as ORT's accuracy_level 4 does: 0.10 on
# builder-llama-int4's logits).
_OPENVINO_EXACT = {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}


def _load_openvino(model: onnx.ModelProto) -> Session:
    import openvino as ov

    core = ov.Core()
    with tempfile.TemporaryDirectory() as folder:  # read_model reads ONNX from a file
        path = pathlib.Path(folder) / "model.onnx"
        onnx.save(model, path)
        try:
            compiled = core.compile_model(core.read_model(str(path)), "CPU", _OPENVINO_EXACT)
        except RuntimeError as error:
            raise RuntimeError(_openvino_message(error)) from None
    inputs = _input_names(model)
    outputs = _output_names(model)
    request = compiled.create_infer_request()

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            result = request.infer(_only(feeds, inputs))
        except RuntimeError as error:
            raise RuntimeError(_openvino_message(error)) from None
        # Copy: the request reuses its output buffers on the next run.
        return [np.array(result[compiled.output(name)]) for name in outputs]

    return Session(outputs, run)


def _openvino_message(error: Exception) -> str:
    """OpenVINO's nested 'Exception from <source file>' chain as one line of what went wrong."""
    lines = [line.strip() for line in str(error).splitlines()]
    lines = [line for line in lines if line and not line.startswith("Exception from ")]
    text = " ".join(lines) or type(error).__name__
    if "Failed operations detailed log" in text and "OpConversionFailure: " in text:
        # The op's own reason comes last, after the frontend's summary of what failed.
        reason = text.rsplit("OpConversionFailure: ", 1)[1].split(" Summary:")[0]
        return f"conversion failed: {reason}"
    return re.sub(r"Check '.*?' failed at \S+:\d+:\s*", "", text)


# tract ----------------------------------------------------------------------------------------

_TRACT_TYPES = {
    np.dtype(np.float32): "f32",
    np.dtype(np.float16): "f16",
    np.dtype(np.float64): "f64",
    np.dtype(np.int64): "i64",
    np.dtype(np.int32): "i32",
    np.dtype(np.int8): "i8",
    np.dtype(np.uint8): "u8",
    np.dtype(np.bool_): "bool",
}


def _load_tract(model: onnx.ModelProto) -> Session:
    import tract

    # tract unifies value_info with the facts it infers; symbolic value_info dims
    # then clash with the concrete input shapes each run is specialized to.
    stripped = onnx.ModelProto()
    stripped.CopyFrom(model)
    del stripped.graph.value_info[:]
    for output in stripped.graph.output:
        output.type.tensor_type.ClearField("shape")
    inputs = _input_names(model)
    outputs = _output_names(model)
    folder = tempfile.TemporaryDirectory()
    path = pathlib.Path(folder.name) / "model.onnx"
    onnx.save(stripped, path)
    compiled: dict[tuple, object] = {}

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return specialized_run(feeds)
        except tract.TractError as error:
            raise RuntimeError(_tract_message(error)) from None

    def specialized_run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        arrays = [np.ascontiguousarray(a) for a in _only(feeds, inputs).values()]
        signature = tuple((a.shape, a.dtype) for a in arrays)
        if signature not in compiled:
            context = tract.onnx()
            inference_model = context.load(str(path))
            for index, array in enumerate(arrays):
                fact = ",".join([*(str(d) for d in array.shape), _TRACT_TYPES[array.dtype]])
                inference_model.set_input_fact(index, fact)
            typed = inference_model.into_model()
            # Keep every object alive: tract's symbols live in the model's scope.
            compiled[signature] = (context, inference_model, typed, typed.into_runnable())
        runnable = compiled[signature][3]
        return [tensor.to_numpy() for tensor in runnable.run(arrays)]

    return Session(outputs, run, keep_alive=folder)  # the file lives as long as the session


def _tract_message(error: Exception) -> str:
    """tract's error chain on one line, without its Rust backtrace."""
    text = str(error).split("Stack backtrace")[0]
    lines = [line.strip() for line in text.splitlines() if line.strip() and line.strip() != "Caused by:"]
    return ": ".join(line.split(": ", 1)[1] if line[:1].isdigit() and ": " in line else line for line in lines)


# Compilers: one module each ------------------------------------------------------------------


def _load_iree(model: onnx.ModelProto) -> Session:
    from gqa_decompose import runtime_iree

    return runtime_iree.load(model)


def _load_tvm(model: onnx.ModelProto) -> Session:
    from gqa_decompose import runtime_tvm

    return runtime_tvm.load(model)


# onnxruntime-web in Chromium ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _BrowserRuntime(Runtime):
    """A runtime outside Python: a node harness drives Chromium (gqa_decompose.browser)."""

    def require(self):
        from gqa_decompose import browser

        return browser.require_harness(self.name)

    def version(self) -> str:
        from gqa_decompose import browser

        return browser.versions(self.name)


def _browser_loader(backend: str) -> Callable[[onnx.ModelProto], Session]:
    def load(model: onnx.ModelProto) -> Session:
        from gqa_decompose import browser

        return browser.load(model, backend)

    return load


# LiteRT, in a Python of its own (onnx2tf needs Python >= 3.12) ------------------------------------


@dataclasses.dataclass(frozen=True)
class _LiteRtRuntime(Runtime):
    def require(self):
        from gqa_decompose import runtime_litert

        return runtime_litert.require()

    def version(self) -> str:
        from gqa_decompose import runtime_litert

        return runtime_litert.version()


def _load_litert(model: onnx.ModelProto) -> Session:
    from gqa_decompose import runtime_litert

    return runtime_litert.load(model)


RUNTIMES: dict[str, Runtime] = {
    runtime.name: runtime
    for runtime in (
        Runtime("onnxruntime", "onnxruntime", "ONNX Runtime, CPU execution provider", "onnxruntime", _load_onnxruntime),
        Runtime(
            "reference",
            "onnx",
            "onnx.reference.ReferenceEvaluator (the ONNX spec in numpy)",
            "onnx.reference",
            _load_reference,
        ),
        Runtime("openvino", "openvino", "OpenVINO, CPU plugin, f32 inference precision", "openvino", _load_openvino),
        Runtime(
            "tract",
            "tract",
            "tract (Sonos), Python bindings, specialized to the input shapes",
            "tract",
            _load_tract,
            shapes_from_input_shapes=True,
        ),
        Runtime(
            "iree",
            "iree-base-compiler iree-base-runtime",
            "IREE, iree-import-onnx and iree-compile (llvm-cpu), dynamic shapes as written",
            "iree.compiler,iree.runtime",
            _load_iree,
        ),
        # TVM compiles each run's shapes: sizes must follow from the input shapes, as for tract.
        Runtime(
            "tvm",
            "apache-tvm",
            "Apache TVM, Relax ONNX frontend (llvm), a fixed-shape copy per input shapes",
            "tvm",
            _load_tvm,
            shapes_from_input_shapes=True,
        ),
    )
}
RUNTIMES.update(
    {
        runtime.name: runtime
        for runtime in (
            _BrowserRuntime(
                "wasm",
                "onnxruntime-web (npm)",
                "onnxruntime-web in headless Chromium, wasm backend",
                "gqa_decompose.browser",
                _browser_loader("wasm"),
            ),
            # WebNN compiles for static shapes, fixed from the input shapes (freeDimensionOverrides).
            _BrowserRuntime(
                "webnn",
                "onnxruntime-web (npm)",
                "onnxruntime-web in headless Chromium, WebNN (CPU), no CPU fallback",
                "gqa_decompose.browser",
                _browser_loader("webnn"),
                shapes_from_input_shapes=True,
            ),
            _LiteRtRuntime(
                "litert",
                "onnx2tf ai-edge-litert (in GQA_DECOMPOSE_LITERT_PYTHON)",
                "LiteRT interpreter (XNNPack) on onnx2tf's conversion of a fixed-shape copy per input shapes",
                "gqa_decompose.runtime_litert",
                _load_litert,
                shapes_from_input_shapes=True,
            ),
        )
    }
)


TOTAL_LENGTH_SHAPE_SUFFIX = "__length_as_shape"


def total_length_from_shape(model: onnx.ModelProto, input_name: str) -> onnx.ModelProto:
    """A copy of ``model`` whose int32 input ``input_name`` (T, 0-D or [1]) is read from a shape.

    The input is replaced by ``<input_name>__length_as_shape`` of shape [T] (uint8,
    contents ignored) and ``Cast(Shape(...))``, which is how real producers feed
    GroupQueryAttention's ``total_sequence_length`` (the builder: the attention
    mask's width). Runtimes that type a model from its input shapes (tract) can
    then derive every shape from the inputs'. Feed it with :func:`length_as_shape`.
    """
    from onnx import helper

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    index = next(i for i, value in enumerate(graph.input) if value.name == input_name)
    rank = len(graph.input[index].type.tensor_type.shape.dim)
    shaped_name = input_name + TOTAL_LENGTH_SHAPE_SUFFIX
    graph.input[index].CopyFrom(helper.make_tensor_value_info(shaped_name, onnx.TensorProto.UINT8, ["T"]))
    shape_name, cast_name = f"{input_name}__shape", f"{input_name}__shape_int32"
    nodes = [
        helper.make_node("Shape", [shaped_name], [shape_name]),
        helper.make_node("Cast", [shape_name], [cast_name if rank == 0 else input_name], to=onnx.TensorProto.INT32),
    ]
    if rank == 0:
        axes = helper.make_tensor(f"{input_name}__axes", onnx.TensorProto.INT64, [1], [0])
        graph.initializer.append(axes)
        nodes.append(helper.make_node("Squeeze", [cast_name, axes.name], [input_name]))
    for node in reversed(nodes):
        graph.node.insert(0, node)
    return copy


def length_as_shape(feeds: Mapping[str, np.ndarray], input_name: str) -> dict[str, np.ndarray]:
    """``feeds`` for a model made by :func:`total_length_from_shape`."""
    converted = dict(feeds)
    length = int(np.asarray(converted.pop(input_name)).reshape(-1)[0])
    converted[input_name + TOTAL_LENGTH_SHAPE_SUFFIX] = np.zeros(length, np.uint8)
    return converted


def get_runtime(name: str) -> Runtime:
    """The runtime called ``name`` (one of :data:`RUNTIMES`); not imported yet."""
    try:
        return RUNTIMES[name]
    except KeyError:
        raise GqaDecomposeError(f"unknown runtime '{name}' (choose from {', '.join(RUNTIMES)})") from None


def available_runtimes() -> list[str]:
    """Names of the runtimes that can be imported here."""
    found = []
    for name, runtime in RUNTIMES.items():
        try:
            _import(runtime)
        except GqaDecomposeError:
            continue
        found.append(name)
    return found
