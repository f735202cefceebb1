"""The browser runtimes: onnxruntime-web in headless Chromium, on its wasm or WebNN backend.

Python talks to a node harness (``tests/browser/harness.mjs`` in a checkout of
this repository, or the folder named by ``GQA_DECOMPOSE_BROWSER_HARNESS``) that
drives Chromium through puppeteer-core. Its npm packages are installed with
``npm install --prefix tests/browser``: onnxruntime-web, puppeteer-core, and
``@sparticuz/chromium``, a Chromium build with WebNN's LiteRT/XNNPACK CPU
backend (Debian's Chromium has none: "WebNN is not supported on this platform").

One harness (one browser) serves every session of the Python process; it starts
on the first run and stops at exit. Tensors travel as raw files (a JSON list of
name, dtype, shape, offset, size, and one binary file).

WebNN runs are strict: ``session.disable_cpu_ep_fallback=1``, so a node the
WebNN execution provider does not take fails the session (with the provider's
reasons) instead of running on the CPU; the run then proves the whole model
runs on WebNN. WebNN needs static shapes: each run fixes the model's symbolic
input dims to the feeds' sizes with ``freeDimensionOverrides`` (one WebNN
session per shape set).
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import pathlib
import shutil
import subprocess
import tempfile
import threading
import weakref

import numpy as np
import onnx

from gqa_decompose.errors import GqaDecomposeError

__all__ = [
    "BACKENDS",
    "harness_folder",
    "load",
    "read_tensors",
    "require_harness",
    "timer",
    "versions",
    "write_tensors",
]

BACKENDS = ("wasm", "webnn")
_HARNESS_ENV = "GQA_DECOMPOSE_BROWSER_HARNESS"
_PACKAGES = ("onnxruntime-web", "puppeteer-core", "@sparticuz/chromium")


def harness_folder() -> pathlib.Path:
    """Where harness.mjs and its node_modules are."""
    if os.environ.get(_HARNESS_ENV):
        return pathlib.Path(os.environ[_HARNESS_ENV])
    return pathlib.Path(__file__).resolve().parent.parent / "tests" / "browser"


def require_harness(runtime: str) -> pathlib.Path:
    """The harness folder; GqaDecomposeError naming what to install when node or its packages are missing."""
    folder = harness_folder()
    if not (folder / "harness.mjs").is_file():
        raise GqaDecomposeError(
            f"runtime '{runtime}' is not available: no browser harness at {folder} "
            f"(use a checkout of gqa-decompose, or set {_HARNESS_ENV} to its tests/browser folder)"
        )
    if shutil.which("node") is None:
        raise GqaDecomposeError(
            f"runtime '{runtime}' is not available: node is not installed (it runs {folder}/harness.mjs)"
        )
    missing = [name for name in _PACKAGES if not (folder / "node_modules" / name / "package.json").is_file()]
    if missing:
        raise GqaDecomposeError(
            f"runtime '{runtime}' is not available: npm packages {', '.join(missing)} are missing "
            f"(npm install --prefix {folder})"
        )
    return folder


def versions(runtime: str) -> str:
    """``onnxruntime-web X, @sparticuz/chromium Y``, from the installed packages (no browser started)."""
    folder = require_harness(runtime)

    def version(name: str) -> str:
        return json.loads((folder / "node_modules" / name / "package.json").read_text())["version"]

    return f"onnxruntime-web {version('onnxruntime-web')}, @sparticuz/chromium {version('@sparticuz/chromium')}"


# Tensors as raw files ---------------------------------------------------------------------------

_DTYPES = {
    np.dtype(np.float32): "float32",
    np.dtype(np.float16): "float16",
    np.dtype(np.float64): "float64",
    np.dtype(np.int64): "int64",
    np.dtype(np.int32): "int32",
    np.dtype(np.int16): "int16",
    np.dtype(np.int8): "int8",
    np.dtype(np.uint64): "uint64",
    np.dtype(np.uint32): "uint32",
    np.dtype(np.uint16): "uint16",
    np.dtype(np.uint8): "uint8",
    np.dtype(np.bool_): "bool",
}
_NUMPY = {name: dtype for dtype, name in _DTYPES.items()}


def write_tensors(prefix: pathlib.Path, tensors: dict[str, np.ndarray]) -> None:
    """``prefix``.json (name, dtype, shape, offset, nbytes) and ``prefix``.bin (little-endian, C order)."""
    entries, offset = [], 0
    with open(f"{prefix}.bin", "wb") as data:
        for name, array in tensors.items():
            array = np.asarray(array)
            if array.dtype not in _DTYPES:
                raise GqaDecomposeError(f"onnxruntime-web takes no {array.dtype} tensor (input {name})")
            raw = np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes()
            entries.append(
                {
                    "name": name,
                    "dtype": _DTYPES[array.dtype],
                    "shape": list(array.shape),
                    "offset": offset,
                    "nbytes": len(raw),
                }
            )
            data.write(raw)
            offset += len(raw)
    pathlib.Path(f"{prefix}.json").write_text(json.dumps({"tensors": entries}))


def read_tensors(prefix: pathlib.Path) -> dict[str, np.ndarray]:
    """The tensors :func:`write_tensors` (or the harness) wrote at ``prefix``."""
    entries = json.loads(pathlib.Path(f"{prefix}.json").read_text())["tensors"]
    data = pathlib.Path(f"{prefix}.bin").read_bytes()
    tensors = {}
    for entry in entries:
        dtype = _NUMPY[entry["dtype"]].newbyteorder("<")
        flat = np.frombuffer(data, dtype, entry["nbytes"] // dtype.itemsize, entry["offset"])
        tensors[entry["name"]] = flat.reshape(entry["shape"]).astype(dtype.newbyteorder("="))
    return tensors


# The harness process ------------------------------------------------------------------------------


class _Harness:
    """``node harness.mjs --serve``: one browser, JSON jobs over stdin/stdout."""

    def __init__(self, folder: pathlib.Path):
        self._stderr = tempfile.TemporaryFile("w+")  # a file, not a pipe: nobody reads it until it fails
        self._process = subprocess.Popen(
            ["node", str(folder / "harness.mjs"), "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        self._lock = threading.Lock()
        if not self._process.stdout.readline():
            raise GqaDecomposeError(f"the browser harness did not start: {self._last_error() or 'no output'}")

    def _last_error(self) -> str:
        self._process.wait(timeout=10)
        self._stderr.seek(0)
        lines = self._stderr.read().strip().splitlines()
        return lines[-1] if lines else ""

    def ask(self, job: dict) -> dict:
        with self._lock:
            if self._process.poll() is not None:
                raise RuntimeError(f"the browser harness exited ({self._process.returncode})")
            self._process.stdin.write(json.dumps(job) + "\n")
            self._process.stdin.flush()
            answer = self._process.stdout.readline()
        if not answer:
            raise RuntimeError(f"the browser harness died: {self._last_error()}")
        return json.loads(answer)

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.stdin.close()  # the harness closes the browser at end of input
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()


_harness: _Harness | None = None
_harness_lock = threading.Lock()


def _shared_harness(runtime: str) -> _Harness:
    global _harness
    with _harness_lock:
        if _harness is None or _harness._process.poll() is not None:
            _harness = _Harness(require_harness(runtime))
            atexit.register(_harness.close)
        return _harness


# Sessions ---------------------------------------------------------------------------------------


def _free_dims(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, int]:
    """Each symbolic input dim's size in ``feeds``: WebNN compiles for static shapes."""
    sizes: dict[str, int] = {}
    for value in model.graph.input:
        if value.name not in feeds:
            continue
        shape = np.shape(feeds[value.name])
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.dim_param and axis < len(shape):
                if sizes.setdefault(dim.dim_param, shape[axis]) != shape[axis]:
                    raise GqaDecomposeError(
                        f"the feeds give dim '{dim.dim_param}' two sizes ({sizes[dim.dim_param]}, {shape[axis]})"
                    )
    return sizes


def _name_free_dims(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose unnamed dynamic input dims get names, so freeDimensionOverrides can fix them."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for value in copy.graph.input:
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if not dim.HasField("dim_value") and not dim.dim_param:
                dim.dim_param = f"{value.name}__dim{axis}"
    return copy


def load(model: onnx.ModelProto, backend: str):
    """A :class:`gqa_decompose.runtimes.Session` of ``model`` on onnxruntime-web's ``backend`` (wasm or webnn)."""
    from gqa_decompose.runtimes import Session, _input_names, _only, _output_names

    if backend not in BACKENDS:
        raise GqaDecomposeError(f"onnxruntime-web backend '{backend}' is not one of {', '.join(BACKENDS)}")
    runtime = backend  # the runtimes are named after the backends
    model, folder, path = _saved(model, backend)
    inputs, outputs = _input_names(model), _output_names(model)
    harness = _shared_harness(runtime)  # checks the harness is installed
    runs = itertools.count()

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        feeds = _only(feeds, inputs)
        step = pathlib.Path(folder.name) / f"run{next(runs)}"
        write_tensors(step.with_suffix(".in"), feeds)
        answer = harness.ask(_run_job(model, path, backend, feeds, step))
        if not answer["ok"]:
            raise RuntimeError(answer["error"])
        got = read_tensors(step.with_suffix(".out"))
        return [got[name] for name in outputs]

    session = Session(outputs, run, keep_alive=folder)
    weakref.finalize(session, _release, harness, str(path)).atexit = False  # at exit the harness stops anyway
    return session


def _saved(model: onnx.ModelProto, backend: str) -> tuple[onnx.ModelProto, tempfile.TemporaryDirectory, pathlib.Path]:
    """(the model as the page gets it, its folder, its file): WebNN's dynamic dims named, weights inline (the page
    fetches one file)."""
    if backend == "webnn":
        model = _name_free_dims(model)
    folder = tempfile.TemporaryDirectory(prefix="gqa-browser-")
    path = pathlib.Path(folder.name) / "model.onnx"
    onnx.save(model, path)
    return model, folder, path


def _run_job(model: onnx.ModelProto, path: pathlib.Path, backend: str, feeds: dict, step: pathlib.Path) -> dict:
    """The harness job running ``feeds`` (written at ``step``.in) on the model saved at ``path``."""
    return {
        "op": "run",
        "model": str(path),
        "feeds": str(step.with_suffix(".in")),
        "out": str(step.with_suffix(".out")),
        "backend": backend,
        "strict": backend == "webnn",
        "freeDims": _free_dims(model, feeds) if backend == "webnn" else {},
    }


def timer(model: onnx.ModelProto, feeds: dict[str, np.ndarray], backend: str):
    """``run(times) -> seconds``: the mean time of ``times`` runs of ``feeds`` on ``backend`` (scripts/bench.py).

    The feeds cross into the page once; only ``session.run`` is timed, in the page.
    WebNN runs strict, as :func:`load`'s, in a session of their own without verbose logs.
    """
    from gqa_decompose.runtimes import _input_names, _only

    model, folder, path = _saved(model, backend)
    feeds = _only(feeds, _input_names(model))
    step = pathlib.Path(folder.name) / "timed"
    write_tensors(step.with_suffix(".in"), feeds)
    harness = _shared_harness(backend)
    job = _run_job(model, path, backend, feeds, step)

    def run(times: int) -> float:
        answer = harness.ask({**job, "repeat": times})
        if not answer["ok"]:
            raise RuntimeError(answer["error"])
        return answer["ms"] / 1e3 / times

    run.keep_alive = folder  # the model and feeds live as long as the timer
    weakref.finalize(run, _release, harness, str(path)).atexit = False
    return run


def _release(harness: _Harness, model_path: str) -> None:
    try:
        harness.ask({"op": "release", "model": model_path})
    except (OSError, RuntimeError, ValueError):  # the harness is gone already (exit)
        pass
