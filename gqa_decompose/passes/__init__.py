"""The rewrite pipeline on onnx-ir: find -> spec -> expand -> replace -> clean up -> check.

``DecomposeGqaPass`` replaces every com.microsoft.GroupQueryAttention node in
the main graph, in subgraphs (If/Loop bodies) and in model-local functions.
``build_pipeline`` wraps it with a clean-up scoped to the nodes it emitted
(common-subexpression elimination, which merges the per-layer constants and
anything two layers compute alike; unused-node removal; unique names: see
cleanup.py), onnx-ir's unused-opset removal (drops the com.microsoft import
when nothing else uses it), topological sort and shape inference, and a checker
that checks the whole model when every op is standard, and otherwise only the
nodes we emitted (a builder's own ORT-only ops in the default domain would
fail the checker before any rewrite). The model's own nodes, initializers and
graph input/output declarations come out as they went in.
"""

from gqa_decompose.passes.check import CheckEmittedPass
from gqa_decompose.passes.decompose import MIN_OPSET, DecomposedNode, DecomposeGqaPass
from gqa_decompose.passes.graph_queries import find_gqa_nodes, non_standard_nodes
from gqa_decompose.passes.infer_types import InferGqaTypesPass
from gqa_decompose.passes.pipeline import build_pipeline

__all__ = [
    "MIN_OPSET",
    "CheckEmittedPass",
    "DecomposeGqaPass",
    "DecomposedNode",
    "InferGqaTypesPass",
    "build_pipeline",
    "find_gqa_nodes",
    "non_standard_nodes",
]
