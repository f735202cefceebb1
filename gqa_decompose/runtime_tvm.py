"""Apache TVM as a runtime: the Relax ONNX frontend, compiled for the CPU (llvm), on Relax's virtual machine.

TVM's frontend wants static shapes, so the adapter compiles one fixed-shape copy
per set of input shapes (:func:`gqa_decompose.fixed_shapes.fixed_shape_copy`: the
dims fixed, the shape arithmetic folded, an empty past made a constant, since
the frontend reads a dim of 0 as unknown). Package: ``apache-tvm``
(``pip install gqa-decompose[runtimes]``).
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx

from gqa_decompose.fixed_shapes import fixed_shape_copy
from gqa_decompose.runtimes import Session, _input_names, _only, _output_names

__all__ = ["load"]


def load(model: onnx.ModelProto) -> Session:
    """A session that compiles ``model`` for each new set of input shapes."""
    inputs = _input_names(model)
    compiled: dict[tuple, tuple[list[str], object]] = {}

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        import tvm

        arrays = _only(feeds, inputs)
        signature = tuple((a.shape, a.dtype) for a in arrays.values())
        if signature not in compiled:
            compiled[signature] = _compile(model, {name: a.shape for name, a in arrays.items()})
        names, function = compiled[signature]
        results = function(*(tvm.runtime.tensor(np.ascontiguousarray(arrays[name])) for name in names))
        results = [results] if hasattr(results, "numpy") else list(results)  # one output, or an Array of them
        return [result.numpy() for result in results]

    return Session(_output_names(model), run)


def _compile(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> tuple[list[str], object]:
    """(the inputs the compiled copy takes, its main function); a failure raises RuntimeError."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    fixed = fixed_shape_copy(model, shapes)
    try:
        with warnings.catch_warnings():  # the frontend warns for every input name it sanitizes
            warnings.simplefilter("ignore")
            module = from_onnx(fixed, keep_params_in_input=False)
        executable = tvm.compile(module, target="llvm")
    except Exception as error:  # TVM raises its own error types (InternalError, TypeError, ...)
        raise RuntimeError(_message(error)) from None
    machine = relax.VirtualMachine(executable, tvm.cpu())
    return [value.name for value in fixed.graph.input], machine["main"]


def _message(error: Exception) -> str:
    """TVM's last line (the check that failed), without its C++ source location."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"
