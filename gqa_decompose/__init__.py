"""gqa-decompose: rewrite com.microsoft.GroupQueryAttention into standard ONNX ops.

Public API::

    decompose(model, **options)   ModelProto -> new ModelProto, or onnx_ir.Model rewritten in place
    decompose_file(path, output)  file -> file, weights streamed, output written atomically
    verify(original, decomposed)  node-level parity against ONNX Runtime CPU
    DecomposeGqaPass              the onnx-ir pass (works inside onnx_ir.passes.PassManager)
    GqaDecomposeError             the one error type, carrying the node name
"""

from gqa_decompose.api import check_nodes, decompose, decompose_file, rewrite
from gqa_decompose.errors import GqaDecomposeError
from gqa_decompose.passes import DecomposeGqaPass, InferGqaTypesPass, build_pipeline
from gqa_decompose.spec import DecomposeOptions, GqaSpec
from gqa_decompose.verify import verify

__all__ = [
    "DecomposeGqaPass",
    "DecomposeOptions",
    "GqaDecomposeError",
    "GqaSpec",
    "InferGqaTypesPass",
    "build_pipeline",
    "check_nodes",
    "decompose",
    "decompose_file",
    "rewrite",
    "verify",
]
__version__ = "0.1.0"
