"""LayerNormalization in the default domain below opset 17: ONNX Runtime's own (contrib) schema, version 1.

At opset >= 17 the node is the standard LayerNormalization-17 and is left alone (the pass skips
standard ops). Below it, ORT runs the same kernel as LayerNormalization-17 (``layer_norm_impl.cc``),
fp16/bf16 in fp32::

    mean    = mean(x)                      std = sqrt(mean(x²) - mean² + epsilon)
    Y       = (x - mean) / std * scale + B
    Mean, InvStdDev = mean, 1 / std        [d0, .., d(axis-1), 1, .., 1]

Before / after (opset < 17, so always primitives)::

    X, Scale, B ──LayerNormalization(1)──> Y, Mean, InvStdDev

    X ─Cast─┬─ ReduceMean ─────────────────┬─────────────────────────> Mean
            ├─ Mul(x, x) ─ ReduceMean ─ Sub(mean²) ─ Add(eps) ─ Sqrt ─┬─ Reciprocal ─> InvStdDev
            └─ Sub(mean) ─────────────────────────── Div ◄────────────┘
                                                      └─ Mul(Scale) ─ Add(B) ─ Cast ─> Y

Contract: as SimplifiedLayerNormalization's (see :mod:`gqa_decompose.ops.simplified_layer_norm`).
"""

from __future__ import annotations

import onnx_ir as ir

from gqa_decompose.ops import register
from gqa_decompose.ops._common import DefaultOracle
from gqa_decompose.ops.base import OpContext
from gqa_decompose.ops.simplified_layer_norm import LayerNormSpec, expand_layer_norm, parse_layer_norm

__all__ = ["ContribLayerNormalization"]


class ContribLayerNormalization(DefaultOracle):
    """Default-domain LayerNormalization where the opset (< 17) has no standard one."""

    domain = ""
    op_type = "LayerNormalization"

    def parse(self, node: ir.Node, context: OpContext) -> LayerNormSpec:
        return parse_layer_norm(node, simplified=False)

    def expand(self, op, node: ir.Node, spec: LayerNormSpec) -> list[ir.Value | None]:
        return expand_layer_norm(op, node, spec)


register(ContribLayerNormalization())
