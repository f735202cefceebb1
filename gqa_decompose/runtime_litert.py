"""LiteRT (TensorFlow Lite) as a runtime: onnx2tf converts a fixed-shape copy, LiteRT's interpreter runs it.

onnx2tf needs Python >= 3.12 and pins its own onnx and onnxruntime, so it lives
in a Python of its own: ``GQA_DECOMPOSE_LITERT_PYTHON`` names it (default:
``.litert-venv/bin/python`` in a checkout of this repository), with ``pip
install onnx2tf ai-edge-litert`` there. onnx2tf 2.x writes the .tflite itself
(no TensorFlow). Each set of input shapes gets its own fixed-shape copy
(:func:`gqa_decompose.fixed_shapes.fixed_shape_copy`) and conversion; the
interpreter (XNNPack, one thread) runs in that Python too, through
``gqa_decompose/litert_worker.py``. Tensors cross as .npz files.
"""

from __future__ import annotations

import functools
import os
import pathlib
import signal
import subprocess
import tempfile

import numpy as np
import onnx

from gqa_decompose.errors import GqaDecomposeError
from gqa_decompose.fixed_shapes import fixed_shape_copy
from gqa_decompose.runtimes import Session, _input_names, _only, _output_names

__all__ = ["load", "python", "require", "version"]

_PYTHON_ENV = "GQA_DECOMPOSE_LITERT_PYTHON"
_WORKER = pathlib.Path(__file__).resolve().parent / "litert_worker.py"


def python() -> pathlib.Path:
    """The Python that has onnx2tf and ai-edge-litert."""
    if os.environ.get(_PYTHON_ENV):
        return pathlib.Path(os.environ[_PYTHON_ENV])
    return pathlib.Path(__file__).resolve().parent.parent / ".litert-venv" / "bin" / "python"


def _worker(*args: str) -> str:
    """Runs the worker; its stdout, or RuntimeError with the last line of its stderr.

    It runs in a working folder of its own: onnx2tf saves ``sym_shape_infer_temp.onnx`` and external-data
    files into the working folder when it meets an op it cannot type (GroupQueryAttention, in the original).
    """
    with tempfile.TemporaryDirectory(prefix="gqa-decompose-litert-") as working_folder:
        command = [str(python().absolute()), str(_WORKER), *args]
        done = subprocess.run(command, capture_output=True, text=True, cwd=working_folder)
    if done.returncode != 0:
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
        last = lines[-1] if lines else f"exit code {done.returncode}"
        if done.returncode < 0:  # a kernel's abort() says nothing on stderr: name the signal
            last = f"killed by {signal.Signals(-done.returncode).name} (last stderr line: {last})"
        raise RuntimeError(f"litert {args[0]} failed: {last}")
    return done.stdout.strip()


@functools.cache
def version() -> str:
    """``onnx2tf X, ai-edge-litert Y``; GqaDecomposeError when the LiteRT Python is missing or lacks them."""
    where = python()
    if not where.exists():
        raise GqaDecomposeError(
            f"runtime 'litert' is not available: no Python at {where} (set {_PYTHON_ENV} to a Python >= 3.12 "
            "with pip install onnx2tf ai-edge-litert)"
        )
    try:
        return _worker("versions")
    except RuntimeError as error:
        raise GqaDecomposeError(
            f"runtime 'litert' is not available: {error} (pip install onnx2tf ai-edge-litert into {where})"
        ) from None


def require() -> None:
    version()


def load(model: onnx.ModelProto) -> Session:
    """A session that converts ``model`` for each new set of input shapes."""
    inputs = _input_names(model)
    folder = tempfile.TemporaryDirectory()
    converted: dict[tuple, tuple[list[str], pathlib.Path]] = {}

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        arrays = _only(feeds, inputs)
        signature = tuple((a.shape, a.dtype) for a in arrays.values())
        if signature not in converted:
            work = pathlib.Path(folder.name) / str(len(converted))
            converted[signature] = _convert(model, {name: a.shape for name, a in arrays.items()}, work)
        names, tflite = converted[signature]
        feeds_path, outputs_path = tflite.with_name("feeds.npz"), tflite.with_name("outputs.npz")
        np.savez(feeds_path, **{name: np.ascontiguousarray(arrays[name]) for name in names})
        _worker("run", str(tflite), str(feeds_path), str(outputs_path))
        with np.load(outputs_path) as outputs:
            return [outputs[name] for name in _output_names(model)]

    return Session(_output_names(model), run, keep_alive=folder)


def _convert(model: onnx.ModelProto, shapes: dict, work: pathlib.Path) -> tuple[list[str], pathlib.Path]:
    """(the inputs the converted copy takes, its .tflite in the model's float type)."""
    fixed = fixed_shape_copy(model, shapes)
    work.mkdir(parents=True)
    onnx.save(fixed, work / "model.onnx")
    _worker("convert", str(work / "model.onnx"), str(work / "tflite"))
    # onnx2tf writes a float32 and a float16 conversion of any model: the float32 one takes float32 inputs
    # ("Cannot set tensor: Got value of type FLOAT16 but expected type FLOAT32"), the float16 one the float16
    # model's own and computes in float16, which LiteRT 2.1.2's CPU kernels mostly lack ("Updates of type
    # 'FLOAT16' are not supported by scatter_nd", "Type FLOAT16 is currently not supported by Transpose", SUB):
    # a float16 model fails there, as it is. Casting to float32 would test onnx2tf's float32 upcast instead.
    float16 = any(value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for value in fixed.graph.input)
    return [value.name for value in fixed.graph.input], next(
        (work / "tflite").glob("*_float16.tflite" if float16 else "*_float32.tflite")
    )
