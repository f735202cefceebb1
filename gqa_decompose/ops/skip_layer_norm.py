"""SkipLayerNormalization and SkipSimplifiedLayerNormalization (com.microsoft): residual add, then a norm.

Legend: input [B, S, D] or [N, D]; skip the same, or [S, D] / [1, S, D] (broadcast over B);
gamma, beta, bias [D]. ORT's CPU kernel (``skip_layer_norm.cc``), fp16/bf16 in fp32 with one
rounding per output::

    sum     = input + skip (+ bias)                               -> input_skip_bias_sum
    simplified:  std = sqrt(mean(sum²) + eps)           output = sum / std * gamma
    layer norm:  std = sqrt(mean(sum²) - mean(sum)² + eps)  output = (sum - mean) / std * gamma (+ beta)
    mean    = mean(sum) [B, S, 1] fp32; SkipSimplified writes zeros there (ORT 1.31, measured)
    inv_std_var = 1 / std [B, S, 1] fp32

Before / after (the norm as in :mod:`gqa_decompose.ops._norm`)::

    input, skip, gamma[, beta][, bias] ──Skip(Simplified)LayerNormalization──> output, mean, inv_std_var, sum

    input ─Cast─┐
    skip  ─Cast─┴─ Add ─ Add(bias) ─┬─ Cast ────────────────────> input_skip_bias_sum
                                    └─ norm(gamma, beta) ─┬─ Cast ─> output
                                                          ├────────> mean (zeros when simplified)
                                                          └────────> inv_std_var

Contract (ORT's ``skip_layer_norm_helper.h``, where shapes are static): input of rank 2 or 3,
skip of rank 2 or 3 with input's last two dims, gamma/beta/bias 1-D of size D.
"""

from __future__ import annotations

import dataclasses

import numpy as np
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

__all__ = ["SkipLayerNormalization", "SkipNormSpec", "SkipSimplifiedLayerNormalization"]

OUTPUT, MEAN, INV_STD_VAR, SUM = range(4)


@dataclasses.dataclass(frozen=True)
class SkipNormSpec:
    node_name: str
    simplified: bool
    epsilon: float
    dtype: ir.DataType
    beta_index: int | None
    bias_index: int | None
    outputs_read: tuple[bool, ...]
    rms_op: bool = True  # RMSNormalization-23 may be emitted (False: the runtime profile has no kernel for it)


def _check_rank(node: ir.Node, value: ir.Value, what: str, ranks: tuple[int, ...]) -> None:
    if value.shape is not None and len(value.shape) not in ranks:
        raise GqaDecomposeError(
            f"{what} has rank {len(value.shape)}; ORT expects {' or '.join(map(str, ranks))}", node.name
        )


def _check_hidden(node: ir.Node, x: ir.Value, vector: ir.Value, what: str) -> None:
    _check_rank(node, vector, what, (1,))
    if x.shape is None or vector.shape is None:
        return
    hidden, size = x.shape[-1], vector.shape[0]
    if isinstance(hidden, int) and isinstance(size, int) and hidden != size:
        raise GqaDecomposeError(f"{what} has {size} elements; input's last dimension is {hidden}", node.name)


def parse_skip_norm(node: ir.Node, simplified: bool, rms_op: bool = True) -> SkipNormSpec:
    x, skip, gamma = input_at(node, 0), input_at(node, 1), input_at(node, 2)
    if x is None or skip is None or gamma is None:
        raise GqaDecomposeError("input, skip and gamma are required", node.name)
    dtype = require_float(node, x, "input")
    _check_rank(node, x, "input", (2, 3))
    _check_rank(node, skip, "skip", (2, 3))
    beta_index = None if simplified else (3 if input_at(node, 3) is not None else None)
    bias_position = 3 if simplified else 4
    bias_index = bias_position if input_at(node, bias_position) is not None else None
    for index, what in ((1, "skip"), (2, "gamma"), (beta_index, "beta"), (bias_index, "bias")):
        if index is not None and node.inputs[index].dtype != dtype:
            raise GqaDecomposeError(f"{what} has type {node.inputs[index].dtype}; input has {dtype}", node.name)
    for index, what in ((2, "gamma"), (beta_index, "beta"), (bias_index, "bias")):
        if index is not None:
            _check_hidden(node, x, node.inputs[index], what)
    epsilon = float(attribute(node, "epsilon", 1e-12))
    if epsilon < 0:
        raise GqaDecomposeError(f"epsilon {epsilon} < 0 (ORT refuses it)", node.name)
    read = outputs_read(node)
    return SkipNormSpec(node.name or "", simplified, epsilon, dtype, beta_index, bias_index, read, rms_op)


def expand_skip_norm(op, node: ir.Node, spec: SkipNormSpec) -> list[ir.Value | None]:
    ctype = compute_type(spec.dtype)
    total = op.op("Add", to_type(op, node.inputs[0], ctype), to_type(op, node.inputs[1], ctype))
    total.dtype = ctype
    if spec.bias_index is not None:
        total = op.op("Add", total, to_type(op, node.inputs[spec.bias_index], ctype))
    total.dtype = ctype
    read = spec.outputs_read + (False,) * (4 - len(spec.outputs_read))
    values = normalize(
        op,
        total,
        node.inputs[2],
        None if spec.beta_index is None else node.inputs[spec.beta_index],
        axes=[-1],
        epsilon=spec.epsilon,
        simplified=spec.simplified,
        want_mean=read[MEAN] and not spec.simplified,
        # SkipSimplified's zero mean takes inv_std's shape.
        want_inv_std=read[INV_STD_VAR] or (read[MEAN] and spec.simplified),
        rms_op=spec.rms_op,
    )
    results: list[ir.Value | None] = [to_type(op, values.y, spec.dtype), None, None, None]
    if read[MEAN]:
        if spec.simplified:
            zero = ir.tensor(np.zeros(1, dtype=np.float32))
            results[MEAN] = op.op("ConstantOfShape", op.op("Shape", values.inv_std), value=zero)
        else:
            results[MEAN] = to_type(op, values.mean, ir.DataType.FLOAT)
    if read[INV_STD_VAR]:
        results[INV_STD_VAR] = to_type(op, values.inv_std, ir.DataType.FLOAT)
    if read[SUM]:
        results[SUM] = to_type(op, total, spec.dtype)
    return results[: len(node.outputs)]


class _SkipNorm(DefaultOracle):
    domain = "com.microsoft"
    simplified: bool

    def parse(self, node: ir.Node, context: OpContext) -> SkipNormSpec:
        return parse_skip_norm(node, self.simplified, rms_op=not context.norm_by_primitives)

    def expand(self, op, node: ir.Node, spec: SkipNormSpec) -> list[ir.Value | None]:
        return expand_skip_norm(op, node, spec)


class SkipSimplifiedLayerNormalization(_SkipNorm):
    op_type = "SkipSimplifiedLayerNormalization"
    simplified = True


class SkipLayerNormalization(_SkipNorm):
    op_type = "SkipLayerNormalization"
    simplified = False


register(SkipSimplifiedLayerNormalization())
register(SkipLayerNormalization())
