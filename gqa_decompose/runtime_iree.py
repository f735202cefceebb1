"""IREE as a runtime: ``iree-import-onnx``, ``iree-compile`` for the CPU (llvm-cpu), the IREE runtime.

The model is compiled once, with its dynamic dims as written: IREE compiles
dynamic shapes, so one module serves every phase (prompt, decode, any cache
length). The runtime's ``local-sync`` driver runs on one thread, which keeps a
test run's CPU use to one core per worker.

Packages: ``iree-base-compiler`` and ``iree-base-runtime`` (``pip install
gqa-decompose[runtimes]``).
"""

from __future__ import annotations

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
    ranks = {value.name: len(value.type.tensor_type.shape.dim) for value in model.graph.input}
    dtypes = [onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type) for value in model.graph.output]

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        arrays = [_as_declared(array, ranks[name]) for name, array in _only(feeds, inputs).items()]
        results = function(*arrays)
        results = results if isinstance(results, tuple | list) else (results,)
        # to_host() maps the result's buffer, which goes back to IREE's allocator with ``results``: copy it out
        # (a mapped present read later came back overwritten by the next run's values, off by up to 255).
        return [_as_dtype(np.array(result.to_host()), dtype) for result, dtype in zip(results, dtypes, strict=True)]

    return Session(_output_names(model), run)


def _as_declared(array: np.ndarray, rank: int) -> np.ndarray:
    """A one-element [1] feed of an input declared 0-D as 0-D: ONNX Runtime takes either, IREE checks the rank
    ("tensor shape rank mismatch; expected 0 (scalar) but have 1")."""
    array = np.ascontiguousarray(array)
    return array.reshape(()) if rank == 0 and array.shape == (1,) else array


def _as_dtype(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``array`` read as the output's declared type: IREE's integers are signless, so a uint8 output (int4
    cache codes, two to a byte) comes back as int8 with the same bits (240 as -16)."""
    same_width = array.dtype.itemsize == np.dtype(dtype).itemsize
    return array.view(dtype) if array.dtype.kind in "iu" and np.dtype(dtype).kind in "iu" and same_width else array


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
    """The model as an IREE module (vmfb bytes); a failure raises RuntimeError with the first error.

    The import is iree-import-onnx's own (``iree.compiler.extras.onnx_importer``) on a model typed by ONNX's
    inference with data propagation, as the tool does, but without its ``onnx.checker`` run first: the checker
    refuses a graph output declared without a shape ("Field 'shape' of 'type' is required but missing"), which
    ONNX and ORT accept and which the node-level models have."""
    import iree.compiler as compiler
    from iree.compiler.extras import onnx_importer
    from iree.compiler.ir import Context

    try:
        info = onnx_importer.ModelInfo(onnx.shape_inference.infer_shapes(model, data_prop=True))
        module = info.create_module(context=Context()).operation
        onnx_importer.NodeImporter.define_function(info.main_graph, module).import_all()
        module.verify()
        mlir = module.get_asm(assume_verified=True)
    except Exception as error:  # the importer's own exception types vary by op
        raise RuntimeError(f"iree-import-onnx failed: {_first_error(str(error))}") from None
    try:
        return compiler.compile_str(mlir, extra_args=[*COMPILE_FLAGS, "--iree-llvmcpu-target-cpu=host"])
    except compiler.CompilerToolError as error:
        raise RuntimeError(f"iree-compile failed: {_first_error(str(error))}") from None


def _first_error(text: str) -> str:
    """The compiler's first 'error:' line (its diagnostics repeat the IR around it), else the first line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line.split("error: ", 1)[1] for line in lines if "error: " in line]
    crash = [line for line in lines if "Stack dump" in line or "Segmentation" in line or "signal" in line.lower()]
    return (errors or crash or lines or ["no message"])[0]
