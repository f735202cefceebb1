"""The whole rewrite as one onnx-ir PassManager."""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from gqa_decompose.passes.check import CheckEmittedPass
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
    """The full rewrite: decompose GQA, then the companion ops (``ops_pass``), clean up, sort, infer shapes and check."""

    def emitted_prefixes() -> list[str]:
        names = [entry.name for entry in decompose_pass.decomposed]
        if ops_pass is not None:
            names += [entry.prefix for entry in ops_pass.decomposed]
        return [*names, "gqa_shared"]

    passes: list[ir.passes.PassBase] = [
        InferGqaTypesPass(),
        decompose_pass,
        *([ops_pass, ConstantShapesPass()] if ops_pass is not None else []),
        common_passes.CommonSubexpressionEliminationPass(),
        common_passes.RemoveUnusedNodesPass(),
        common_passes.RemoveUnusedOpsetsPass(),
        common_passes.TopologicalSortPass(),
        # Expansion names derive from GQA node names, which models do not always keep
        # unique, and every graph's shared subgraph is "gqa_shared/...": values must stay SSA.
        common_passes.NameFixPass(),
    ]
    if infer_shapes:
        passes.append(_QuietShapeInferencePass())
    if check:
        passes.append(CheckEmittedPass(emitted_prefixes))
    return ir.passes.PassManager(passes)
