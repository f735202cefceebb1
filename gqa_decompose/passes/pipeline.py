"""The whole rewrite as one onnx-ir PassManager."""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from gqa_decompose.passes.check import CheckEmittedPass
from gqa_decompose.passes.cleanup import (
    DropGqaImportPass,
    EmittedCsePass,
    FixEmittedNamesPass,
    KeepInterface,
    RemoveUnusedEmittedPass,
)
from gqa_decompose.passes.decompose import DecomposeGqaPass
from gqa_decompose.passes.decompose_ops import ConstantShapesPass, DecomposeOpsPass
from gqa_decompose.passes.infer_types import InferGqaTypesPass, quiet_shape_inference

__all__ = ["build_pipeline"]


class _QuietShapeInferencePass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        quiet_shape_inference(model)
        return ir.passes.PassResult(model, modified=True)


def build_pipeline(
    decompose_pass: DecomposeGqaPass,
    *,
    check: bool = True,
    infer_shapes: bool = True,
    ops_pass: DecomposeOpsPass | None = None,
) -> ir.passes.PassManager:
    """The full rewrite: decompose GQA, then the companion ops (``ops_pass``), clean up what
    they emitted, sort, infer shapes and check.

    The clean-up (common subexpressions, unused nodes, names) touches only the emitted nodes
    (passes/cleanup.py); the graph's input and output declarations come out as they went in.
    """

    def emitted() -> list[ir.Node]:
        return [*decompose_pass.emitted, *(ops_pass.emitted if ops_pass is not None else ())]

    interface = KeepInterface()
    passes: list[ir.passes.PassBase] = [
        interface.remember,
        InferGqaTypesPass(),
        decompose_pass,
        *([ops_pass, ConstantShapesPass()] if ops_pass is not None else []),
        EmittedCsePass(emitted),
        RemoveUnusedEmittedPass(emitted),
        DropGqaImportPass(),
        common_passes.TopologicalSortPass(),
        FixEmittedNamesPass(emitted),
    ]
    if infer_shapes:
        passes.append(_QuietShapeInferencePass())
    if check:
        # Before the declarations are put back: the checker judges what was emitted, not a
        # declaration of the model's own that it would refuse (an IR 8 output without a shape).
        passes.append(CheckEmittedPass(emitted))
    passes.append(interface.restore)
    return ir.passes.PassManager(passes)
