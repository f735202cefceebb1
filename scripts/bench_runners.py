"""The pieces of scripts/bench.py: cache forms, their inputs, one runner per runtime, the machine's read bandwidth."""

from __future__ import annotations

import dataclasses
import pathlib
import tempfile
import time

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort

# How past is handed to a step (the cache forms of docs/cache-forms-and-speed.md):
#   separate  past has the rows before this step (T - S), present is a new buffer
#   bound     past is a max-length buffer and present is bound to it (ORT IOBinding; in place)
#   steps     the same, the buffer grown in BUFFER_STEP-row steps (T < rows <= T + step)
#   long      past is a max-length buffer, present a new buffer of its shape (no binding: OpenVINO)
#   ragged    separate buffers, batch 2, the second row half as long (a ragged growing batch)
CACHES = ("separate", "bound", "steps", "long", "ragged")
BUFFER_STEP = 256


@dataclasses.dataclass(frozen=True)
class Form:
    """One rewritten variant: a --kv-cache form of the tool in one cache form."""

    name: str
    options: dict
    cache: str


# Rewrites per runtime; ORT binds, OpenVINO cannot (a max-length buffer is copied to present).
ORT_FORMS = (
    Form("any", {}, "separate"),
    Form("any-shared", {}, "bound"),
    Form("ragged", {}, "ragged"),
    Form("growing", {"growing_kv_cache": True}, "separate"),
    Form("static", {"static_kv_cache": True}, "bound"),
    Form("static-steps", {"static_kv_cache": True}, "steps"),
)
OV_FORMS = (
    Form("any", {}, "separate"),
    Form("any-long", {}, "long"),
    Form("ragged", {}, "ragged"),
    Form("growing", {"growing_kv_cache": True}, "separate"),
    Form("static", {"static_kv_cache": True}, "long"),
)
# onnxruntime-web (wasm, WebNN) takes no IOBinding here either: the forms OpenVINO runs.
BROWSER_FORMS = OV_FORMS
FORMS = {"onnxruntime": ORT_FORMS, "openvino": OV_FORMS, "wasm": BROWSER_FORMS, "webnn": BROWSER_FORMS}
# A rewrite's name starts with its runtime's prefix ("ov any", "wasm any-long").
PREFIX = {"onnxruntime": "", "openvino": "ov ", "wasm": "wasm ", "webnn": "webnn "}
# Each runtime's fused node per cache form (the baseline of a rewrite in that form).
ORT_FUSED = {"separate": "fused", "bound": "fused-shared", "steps": "fused-shared", "ragged": "fused-ragged"}
# Not the ragged batch: OpenVINO's frontend returns from it in 0.06 ms (T = 1024), so it does not compute it.
OV_FUSED = {"separate": "ov-fused", "long": "ov-fused-long"}
FUSED = {
    "onnxruntime": ORT_FUSED,
    "openvino": OV_FUSED,
    "wasm": {"separate": "wasm-fused", "long": "wasm-fused-long", "ragged": "wasm-fused-ragged"},
    "webnn": {"separate": "webnn-fused", "long": "webnn-fused-long", "ragged": "webnn-fused-ragged"},
}
# ORT's fused node in the cache form a variant of another runtime stands for (no bound buffer there).
ORT_FOR_OV = {"separate": "fused", "long": "fused-shared", "ragged": "fused-ragged"}


def runtime_of(name: str) -> str:
    """The runtime a variant (fused or rewrite) runs on, from its name."""
    for runtime, fused in FUSED.items():
        if name in fused.values():
            return runtime
    return next((runtime for runtime, prefix in PREFIX.items() if prefix and name.startswith(prefix)), "onnxruntime")


def past_rows(cache: str, phase: str, length: int, max_length: int) -> int:
    """Rows of past for a step of T = ``length`` (decode: S = 1; prefill: a first prompt, S = T)."""
    if cache in ("bound", "long"):
        return max(max_length, length)
    if cache == "steps":
        return (length // BUFFER_STEP + 1) * BUFFER_STEP
    return length - 1 if phase == "decode" else 0


def lengths(cache: str, length: int) -> list[int]:
    """t_b per batch row: one row of T, or a ragged batch of T and T / 2."""
    return [length, length // 2] if cache == "ragged" else [length]


def feeds(config, phase: str, length: int, cache: str, max_length: int) -> dict[str, np.ndarray]:
    """Inputs of one step: decode (S = 1, T = length) or a first prompt (S = T = length)."""
    rng = np.random.default_rng(0)
    dtype = np.float16 if config.dtype == "float16" else np.float32
    totals = lengths(cache, length)
    query_length = 1 if phase == "decode" else length
    hidden = (config.num_heads + 2 * config.kv_num_heads) * config.head_size
    past_shape = (len(totals), config.kv_num_heads, past_rows(cache, phase, length, max_length), config.head_size)
    return {
        "query": rng.standard_normal((len(totals), query_length, hidden)).astype(dtype),
        "past_key": rng.standard_normal(past_shape).astype(dtype),
        "past_value": rng.standard_normal(past_shape).astype(dtype),
        "seqlens_k": np.array([total - 1 for total in totals], np.int32),
        "total_sequence_length": np.array(length, np.int32),
    }


def cache_bytes(config, length: int, cache: str) -> int:
    """Bytes of keys and values a decode step must read at least once (rows [0, t_b) of each batch row)."""
    itemsize = 2 if config.dtype == "float16" else 4
    return 2 * sum(lengths(cache, length)) * config.kv_num_heads * config.head_size * itemsize


class OrtRunner:
    """One variant on ONNX Runtime CPU: a session and its bound inputs and outputs."""

    def __init__(self, model: onnx.ModelProto, inputs: dict[str, np.ndarray], bound: bool, threads: int):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        self.binding = self.session.io_binding()
        self.values = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in inputs.items()}
        for name, value in self.values.items():
            self.binding.bind_ortvalue_input(name, value)
        for output in self.session.get_outputs():
            if bound and output.name.startswith("present_"):
                # present_key -> past_key: the runtime keeps one buffer and the step writes into it.
                self.binding.bind_ortvalue_output(output.name, self.values[output.name.replace("present_", "past_")])
            else:
                self.binding.bind_output(output.name)

    def run(self, times: int) -> float:
        """Mean seconds of ``times`` runs."""
        start = time.perf_counter()
        for _ in range(times):
            self.session.run_with_iobinding(self.binding)
        return (time.perf_counter() - start) / times


class OvRunner:
    """One variant on OpenVINO's CPU plugin (fp32 precision hint), inputs set once."""

    def __init__(self, model: onnx.ModelProto, inputs: dict[str, np.ndarray], threads: int):
        import openvino as ov

        core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads}
        with tempfile.TemporaryDirectory() as folder:  # read_model reads ONNX from a file
            path = pathlib.Path(folder) / "model.onnx"
            onnx.save(model, path)
            self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        self.request = self.compiled.create_infer_request()
        # A port has several names (OpenVINO may report a Cast's as "any" name): match any of them.
        for port in self.compiled.inputs:
            name = next(name for name in inputs if name in port.get_names())
            self.request.set_tensor(port, ov.Tensor(inputs[name]))
        self.request.infer()  # fails here, not in the timed rounds, if the runtime cannot run it

    def run(self, times: int) -> float:
        start = time.perf_counter()
        for _ in range(times):
            self.request.infer()
        return (time.perf_counter() - start) / times


class BrowserRunner:
    """One variant on onnxruntime-web in headless Chromium (wasm, or WebNN strict), timed in the page."""

    def __init__(self, model: onnx.ModelProto, inputs: dict[str, np.ndarray], backend: str):
        from gqa_decompose import browser

        self._timer = browser.timer(model, inputs, backend)
        try:
            self._timer(1)  # fails here, not in the timed rounds, if the backend cannot run it
        except RuntimeError:
            browser.load(model, backend).run(inputs)  # an untimed run says which nodes WebNN refused, and why
            raise

    def run(self, times: int) -> float:
        return self._timer(times)


def runner(runtime: str, model: onnx.ModelProto, inputs: dict[str, np.ndarray], cache: str, threads: int):
    """The runner of one variant in one cache form on ``runtime``."""
    if runtime == "openvino":
        return OvRunner(model, inputs, threads)
    if runtime == "webnn":
        # WebNN compiles static shapes: T, a data input of these one-node models, becomes a constant,
        # as in real models, where it comes from the attention mask's shape.
        model, inputs = bake_inputs(model, inputs, ("total_sequence_length",))
    if runtime in ("wasm", "webnn"):
        return BrowserRunner(model, inputs, runtime)
    return OrtRunner(model, inputs, cache in ("bound", "steps"), threads)


def bake_inputs(model: onnx.ModelProto, inputs: dict[str, np.ndarray], names: tuple[str, ...]):
    """(a copy of ``model`` whose inputs ``names`` are initializers holding their feeds, the other feeds)."""
    baked = onnx.ModelProto()
    baked.CopyFrom(model)
    kept = [value for value in baked.graph.input if value.name not in names]
    del baked.graph.input[:]
    baked.graph.input.extend(kept)
    baked.graph.initializer.extend(onnx.numpy_helper.from_array(inputs[name], name) for name in names)
    return baked, {name: array for name, array in inputs.items() if name not in names}


def read_bandwidth(megabytes: int = 256) -> float:
    """Bytes per second one core reads from memory: the best of a few reductions over a large array."""
    array = np.ones(megabytes * 2**20 // 4, np.float32)
    best = float("inf")
    for _ in range(8):
        start = time.perf_counter()
        array.max()
        best = min(best, time.perf_counter() - start)
    return array.nbytes / best
