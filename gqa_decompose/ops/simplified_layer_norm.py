"""SimplifiedLayerNormalization (RMS norm; default domain, where ORT registers it, and com.microsoft).

Legend: X [d0, ..., d(r-1)], normalized over the axes ``axis .. r-1`` (N of them); scale has their shape.
ORT computes fp16/bf16 in fp32 and rounds Y once (``layer_norm_impl.cc``)::

    std     = sqrt(mean(x², over axis..) + epsilon)
    Y       = x / std * scale                          (type of scale: V)
    inv_std = 1 / std                                  [d0, .., d(axis-1), 1, .., 1] (fp32)

Before / after::

    X, scale ──SimplifiedLayerNormalization──> Y, inv_std_var

    X ─Cast─┬─ Mul(x, x) ─ ReduceMean ─ Add(eps) ─ Sqrt ─┬─ Reciprocal ──────────> inv_std_var
            └──────────────────────────── Div ◄──────────┘
                                           └─ Mul(scale) ─ Cast ─> Y
    (opset >= 23: X ─Cast─ RMSNormalization-23 ─Cast─> Y when inv_std_var is not read)

Contract: X and scale floating point; ``axis`` in [-r, r) (a positive axis needs X's rank);
``stash_type`` 1 (fp32 statistics, the only form ORT's CPU kernel runs).
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from gqa_decompose.errors import GqaDecomposeError
from gqa_decompose.ops import register
from gqa_decompose.ops._common import (
    DefaultOracle,
    attribute,
    compute_type,
    input_at,
    outputs_read,
    require_float,
    to_type,
)
from gqa_decompose.ops._norm import normalize
from gqa_decompose.ops.base import OpContext

__all__ = ["LayerNormSpec", "SimplifiedLayerNormalization", "parse_layer_norm"]


@dataclasses.dataclass(frozen=True)
class LayerNormSpec:
    """One (Simplified)LayerNormalization node's contract."""

    node_name: str
    simplified: bool
    axes: tuple[int, ...]  # negative, trailing
    epsilon: float
    x_dtype: ir.DataType
    y_dtype: ir.DataType
    has_bias: bool
    outputs_read: tuple[bool, ...]
    rms_op: bool = True  # RMSNormalization-23 may be emitted (False: the runtime profile has no kernel for it)


def _normalized_axes(node: ir.Node, x: ir.Value, axis: int) -> tuple[int, ...]:
    rank = None if x.shape is None else len(x.shape)
    if axis >= 0:
        if rank is None:
            raise GqaDecomposeError(f"axis {axis} >= 0 needs the rank of X, which is unknown", node.name)
        axis -= rank
    if axis >= 0 or (rank is not None and axis < -rank):
        raise GqaDecomposeError(f"axis out of range for X of rank {rank}", node.name)
    return tuple(range(axis, 0))


def parse_layer_norm(
    node: ir.Node, simplified: bool, epsilon_default: float = 1e-5, rms_op: bool = True
) -> LayerNormSpec:
    """The contract of SimplifiedLayerNormalization and the default-domain LayerNormalization-1 (ORT's);
    ``rms_op``: whether the expansion may use RMSNormalization-23."""
    x, scale = input_at(node, 0), input_at(node, 1)
    if x is None or scale is None:
        raise GqaDecomposeError("X and scale are required", node.name)
    x_dtype = require_float(node, x, "X")
    y_dtype = require_float(node, scale, "scale")
    if attribute(node, "stash_type", 1) != 1:
        raise GqaDecomposeError("stash_type other than 1 (fp32 statistics) is not supported", node.name)
    bias = None if simplified else input_at(node, 2)
    if bias is not None:
        require_float(node, bias, "B")
    axes = _normalized_axes(node, x, int(attribute(node, "axis", -1)))
    return LayerNormSpec(
        node_name=node.name or "",
        simplified=simplified,
        axes=axes,
        epsilon=float(attribute(node, "epsilon", epsilon_default)),
        x_dtype=x_dtype,
        y_dtype=y_dtype,
        has_bias=bias is not None,
        outputs_read=outputs_read(node),
        rms_op=rms_op,
    )


def expand_layer_norm(op, node: ir.Node, spec: LayerNormSpec) -> list[ir.Value | None]:
    """Y and the statistics the node's outputs ask for (layout: Y, [Mean,] inv_std_var)."""
    ctype = compute_type(spec.x_dtype if spec.x_dtype == spec.y_dtype else ir.DataType.FLOAT)
    stat_outputs = ["inv_std"] if spec.simplified else ["mean", "inv_std"]
    wanted = {
        name: index + 1 < len(spec.outputs_read) and spec.outputs_read[index + 1]
        for index, name in enumerate(stat_outputs)
    }
    values = normalize(
        op,
        to_type(op, node.inputs[0], ctype),
        node.inputs[1],
        node.inputs[2] if spec.has_bias else None,
        axes=list(spec.axes),
        epsilon=spec.epsilon,
        simplified=spec.simplified,
        want_mean=wanted.get("mean", False),
        want_inv_std=wanted["inv_std"],
        rms_op=spec.rms_op,
    )
    results: list[ir.Value | None] = [to_type(op, values.y, spec.y_dtype)]
    for index, name in enumerate(stat_outputs, start=1):
        if index >= len(node.outputs) or not wanted[name]:
            results.append(None)
            continue
        stat = getattr(values, name)
        results.append(to_type(op, stat, node.outputs[index].dtype or ir.DataType.FLOAT))
    return results[: len(node.outputs)]


class SimplifiedLayerNormalization(DefaultOracle):
    """SimplifiedLayerNormalization in one domain (ORT registers the default one)."""

    op_type = "SimplifiedLayerNormalization"
    oracle_domain = ""  # where ORT CPU runs it: the com.microsoft form is verified as the default one

    def __init__(self, domain: str) -> None:
        self.domain = domain

    def parse(self, node: ir.Node, context: OpContext) -> LayerNormSpec:
        return parse_layer_norm(node, simplified=True, rms_op=not context.norm_by_primitives)

    def expand(self, op, node: ir.Node, spec: LayerNormSpec) -> list[ir.Value | None]:
        return expand_layer_norm(op, node, spec)


register(SimplifiedLayerNormalization(""))
register(SimplifiedLayerNormalization("com.microsoft"))
