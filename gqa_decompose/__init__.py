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

from gqa_decompose.api import decompose, decompose_file, rewrite
from gqa_decompose.errors import GqaDecomposeError
from gqa_decompose.passes import DecomposeGqaPass, InferGqaTypesPass, build_pipeline
from gqa_decompose.spec import DecomposeOptions, GqaSpec
from gqa_decompose.report import CheckResult, check, report_json
from gqa_decompose.verify import verify
from gqa_decompose.verify_model import ModelVerification, verify_model

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
__version__ = "0.1.0"
