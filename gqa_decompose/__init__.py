"""gqa-decompose: rewrite com.microsoft.GroupQueryAttention into standard ONNX ops.

Public API::

    decompose(model, **options)   ModelProto -> new ModelProto, or onnx_ir.Model rewritten in place
    decompose_file(path, output)  file -> file, weights streamed, output written atomically
    verify(original, decomposed)  node-level parity against ONNX Runtime CPU
    verify_model(original, decomposed, steps=4)
                                  whole-model parity: a prompt and decode steps, present fed back as past
    check(model, verify_mode="all")
                                  the CI gate: decomposable, verified, nothing non-standard left
    DecomposeGqaPass              the onnx-ir pass (works inside onnx_ir.passes.PassManager)
    GqaDecomposeError             the one error type, carrying the node name
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

# Imported on first use (PEP 562), so that ``import gqa_decompose`` and the CLI's ``--help`` do not
# pay for onnx, onnx_ir and ONNX Runtime.
_EXPORTS = {
    "CheckResult": "gqa_decompose.report",
    "ModelVerification": "gqa_decompose.verify_model",
    "DecomposeGqaPass": "gqa_decompose.passes",
    "DecomposeOptions": "gqa_decompose.spec",
    "GqaDecomposeError": "gqa_decompose.errors",
    "GqaSpec": "gqa_decompose.spec",
    "InferGqaTypesPass": "gqa_decompose.passes",
    "build_pipeline": "gqa_decompose.passes",
    "check": "gqa_decompose.report",
    "decompose": "gqa_decompose.api",
    "decompose_file": "gqa_decompose.api",
    "report_json": "gqa_decompose.report",
    "rewrite": "gqa_decompose.api",
    "verify": "gqa_decompose.verify",
    "verify_model": "gqa_decompose.verify_model",
}
__all__ = [
    "CheckResult",
    "ModelVerification",
    "DecomposeGqaPass",
    "DecomposeOptions",
    "GqaDecomposeError",
    "GqaSpec",
    "InferGqaTypesPass",
    "build_pipeline",
    "check",
    "decompose",
    "decompose_file",
    "report_json",
    "rewrite",
    "verify",
    "verify_model",
]

if TYPE_CHECKING:
    from gqa_decompose.api import decompose, decompose_file, rewrite
    from gqa_decompose.errors import GqaDecomposeError
    from gqa_decompose.passes import DecomposeGqaPass, InferGqaTypesPass, build_pipeline
    from gqa_decompose.report import CheckResult, check, report_json
    from gqa_decompose.spec import DecomposeOptions, GqaSpec
    from gqa_decompose.verify import verify
    from gqa_decompose.verify_model import ModelVerification, verify_model


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gqa_decompose' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


class _Package(types.ModuleType):
    """The package, where the API's ``verify`` and ``verify_model`` functions keep their names.

    Importing the submodules verify.py and verify_model.py binds them as attributes of the package;
    the functions of the same names stand there instead (as an eager ``from ... import`` did), and
    ``__getattr__`` is never asked for them.
    """

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == value.__name__ and hasattr(value, name):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


__version__ = "0.1.0"
