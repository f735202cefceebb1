"""IREE as a runtime: ``iree-import-onnx``, ``iree-compile`` for the CPU (llvm-cpu), the IREE runtime.

The model is compiled once, with its dynamic dims as written: IREE compiles
dynamic shapes, so one module serves every phase (prompt, decode, any cache
length). The runtime's ``local-sync`` driver runs on one thread, which keeps a
test run's CPU use to one core per worker.

Packages: ``iree-base-compiler`` and ``iree-base-runtime`` (``pip install
gqa-decompose[runtimes]``).
"""

from __future__ import annotations

import pathlib
import tempfile

import numpy as np
import onnx

from gqa_decompose.runtimes import Session, _input_names, _only, _output_names

__all__ = ["load"]

COMPILE_FLAGS = ("--iree-hal-target-device=local", "--iree-hal-local-target-device-backends=llvm-cpu")


def load(model: onnx.ModelProto) -> Session:
    """``model`` imported, compiled for the host CPU and loaded on the runtime."""
    import iree.runtime as iree_runtime

    vmfb = _compile(_without_value_info(model))
    module = iree_runtime.load_vm_flatbuffer(vmfb, driver="local-sync")
    # The importer names the function after the graph; IREE adds an "$async" twin and "__init".
    names = [name for name in module.vm_module.function_names if "$" not in name and not name.startswith("__")]
    function = module[names[0]]

    inputs = _input_names(model)

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        results = function(*(np.ascontiguousarray(array) for array in _only(feeds, inputs).values()))
        results = results if isinstance(results, tuple | list) else (results,)
        return [np.asarray(result.to_host()) for result in results]

    return Session(_output_names(model), run)


def _without_value_info(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` without its value_info: iree-import-onnx types each value from it, and IREE 3.13 fails to
    lower a Transpose whose declared result is more static than its input ("'linalg.transpose' op dim(result,
    2) = 16 doesn't match dim(input, permutation[2])"), which a model's symbolic head-size dim on its caches
    ('kv_cache_dim') beside the rewrite's own 16 gives. ONNX's inference then types every value afresh."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.graph.value_info[:]
    return copy


def _compile(model: onnx.ModelProto) -> bytes:
    """The model as an IREE module (vmfb bytes); a compiler failure raises RuntimeError with its first error."""
    import iree.compiler as compiler
    from iree.compiler.tools.import_onnx import __main__ as import_onnx

    with tempfile.TemporaryDirectory() as folder:
        onnx_path, mlir_path = pathlib.Path(folder) / "model.onnx", pathlib.Path(folder) / "model.mlir"
        onnx.save(model, onnx_path)
        try:
            import_onnx.main(import_onnx.parse_arguments([str(onnx_path), "-o", str(mlir_path)]))
        except Exception as error:  # the importer's own exception types vary by op
            raise RuntimeError(f"iree-import-onnx failed: {_first_error(str(error))}") from None
        try:
            return compiler.compile_file(str(mlir_path), extra_args=[*COMPILE_FLAGS, "--iree-llvmcpu-target-cpu=host"])
        except compiler.CompilerToolError as error:
            raise RuntimeError(f"iree-compile failed: {_first_error(str(error))}") from None


def _first_error(text: str) -> str:
    """The compiler's first 'error:' line (its diagnostics repeat the IR around it), else the first line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line.split("error: ", 1)[1] for line in lines if "error: " in line]
    crash = [line for line in lines if "Stack dump" in line or "Segmentation" in line or "signal" in line.lower()]
    return (errors or crash or lines or ["no message"])[0]
