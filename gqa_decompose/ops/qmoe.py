"""com.microsoft.QMoE (quant_type 'int') -> dequantized experts + MoE's routing and dense masked sum.

Dimension legend as in :mod:`gqa_decompose.ops.moe`; per weight, N its output rows, K its input (reduction)
axis, Kb = K / block_size blocks (1 without block_size: one scale per row).

ORT's layout (QMoE schema, checked against ORT 1.31 CPU): fc1 weights uint8 [E, F, H*bits/8] and fc2
[E, H, I*bits/8], packed along K like MatMulNBits (element 0 in the low bits); scales [E, N] (per row)
or [E, N, Kb]; zero points uint8 packed along the last axis, [E, ceil(N*bits/8)] or [E, N, ceil(Kb*bits/8)],
absent meaning 2**(bits-1); ``W[e, n, k] = (q - zp) * scale``::

    fc*_weights -> re-laid out [E, K, N] (U)INT4/(U)INT8, scales/zero points [E, Kb, N]
                -> DequantizeLinear(axis=1, block_size) -> fp32 [E, K, N] -> moe.expert_sum (fp32)
    (below opset 21, or 2 bits: the exact unpack of the uint8 bytes, (q - zp) * scale, Transpose)

Cost: every run dequantizes every expert's weights (E*F*H + E*H*I fp32), on top of the dense sum's
E/k times the FLOPs; the file keeps its bytes. The whole op runs in fp32 (fp16 inputs cast once).

Precision: ORT computes 4-bit experts with fp32 activations at accuracy_level 0/1 and row-wise 8-bit
experts in fp32: the expansion matches those to fp32 rounding. Block-wise 8-bit experts, and 4-bit
ones at accuracy_level 4, run on int8-quantized activations in ORT (the schema says so, and it measures
~1% of the output's range); the expansion keeps the exact product, and its tolerance for those forms is
ORT's rounding, not the expansion's.

Refused: quant_type other than 'int' (fp4/fp8 need float8 types), weights_prepacked=1 (an EP-specific
layout), router_weights, fc3 (as MoE), and what :func:`moe.parse_routing` refuses.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from gqa_decompose.errors import GqaDecomposeError
from gqa_decompose.expansion.builder import OpBuilder
from gqa_decompose.ops import register
from gqa_decompose.ops._blockwise import (
    add_initializer,
    lazy_tensor,
    pack_np,
    unpack_np,
    unpack_op,
)
from gqa_decompose.ops._common import input_at, int_attribute
from gqa_decompose.ops.base import OpContext, Tolerance
from gqa_decompose.ops.moe import RoutingSpec, expert_sum, parse_routing

__all__ = ["QMoE", "QMoESpec", "QuantizedWeight"]

INPUT, ROUTER, FC1, FC1_SCALES, FC1_BIAS, FC2, FC2_SCALES, FC2_BIAS = range(8)
FC3, FC3_SCALES, FC3_BIAS, FC1_ZP, FC2_ZP, FC3_ZP, ROUTER_WEIGHTS = range(8, 15)


@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """One expert weight: [E, N, K] quantized along K."""

    weight: int  # input positions
    scales: int
    zero_points: int
    rows: int  # N
    cols: int  # K
    bits: int
    block_size: int  # 0: one block per row
    has_zero_points: bool
    form: str  # "dq" or "unpack"

    @property
    def blocks(self) -> int:
        return 1 if self.block_size == 0 else self.cols // self.block_size


@dataclasses.dataclass(frozen=True)
class QMoESpec:
    routing: RoutingSpec
    fc1: QuantizedWeight
    fc2: QuantizedWeight
    has_fc1_bias: bool
    has_fc2_bias: bool
    int8_activations: bool  # ORT rounds activations to int8 for this node


def _weight(node: ir.Node, context: OpContext, positions, rows: int, cols: int, bits: int, block_size: int):
    weight, scales, zero_points = positions
    constants = all(
        ir.convenience.get_const_tensor(v) is not None
        for v in (node.inputs[weight], node.inputs[scales], input_at(node, zero_points))
        if v is not None
    )
    dq = context.opset >= 21 and bits in (4, 8) and constants
    if block_size and cols % block_size:
        raise GqaDecomposeError(f"QMoE: K={cols} is not a multiple of block_size={block_size}", node.name)
    return QuantizedWeight(
        weight,
        scales,
        zero_points,
        rows,
        cols,
        bits,
        block_size,
        input_at(node, zero_points) is not None,
        "dq" if dq else "unpack",
    )


class QMoE:
    """The decomposer of com.microsoft.QMoE with integer experts."""

    domain = "com.microsoft"
    op_type = "QMoE"

    def parse(self, node: ir.Node, context: OpContext) -> QMoESpec:
        """Validate; sizes come from the static weight shapes and the bits attributes."""
        quant_type = node.attributes.get("quant_type")
        if quant_type is not None and quant_type.as_string() != "int":
            raise GqaDecomposeError(f"QMoE quant_type={quant_type.as_string()!r}: only 'int' is decomposed", node.name)
        if int_attribute(node, "weights_prepacked", -1) == 1:
            raise GqaDecomposeError("QMoE weights_prepacked=1: an execution provider's private layout", node.name)
        if input_at(node, ROUTER_WEIGHTS) is not None or any(v is not None for v in node.inputs[15:]):
            raise GqaDecomposeError("QMoE router_weights and fp4/fp8 scales are not decomposed", node.name)
        fc1, fc2 = node.inputs[FC1], node.inputs[FC2]
        if fc1.shape is None or fc2.shape is None or not fc1.shape.is_static() or not fc2.shape.is_static():
            raise GqaDecomposeError("QMoE needs fc1 and fc2 weights with static shapes", node.name)
        bits = int_attribute(node, "expert_weight_bits", 4)
        bits1 = int_attribute(node, "fc1_expert_weight_bits", bits)
        bits2 = int_attribute(node, "fc2_expert_weight_bits", bits)
        if bits1 not in (2, 4, 8) or bits2 not in (2, 4, 8):
            raise GqaDecomposeError(f"QMoE weight bits {bits1}/{bits2}: ORT takes 2, 4 and 8", node.name)
        experts, hidden, fc2_bytes = (int(d) for d in fc2.shape)
        inter = fc2_bytes * 8 // bits2
        routing = parse_routing(node, experts, inter, (FC3, FC3_SCALES, FC3_BIAS, FC3_ZP))
        fc1_rows = 2 * inter if routing.activation == "swiglu" else inter
        if hidden != routing.hidden or tuple(fc1.shape) != (experts, fc1_rows, hidden * bits1 // 8):
            raise GqaDecomposeError("QMoE weights must be fc1 [E, F, H*bits/8] and fc2 [E, H, I*bits/8]", node.name)
        block_size = int_attribute(node, "block_size", 0)
        spec1 = _weight(node, context, (FC1, FC1_SCALES, FC1_ZP), fc1_rows, hidden, bits1, block_size)
        spec2 = _weight(node, context, (FC2, FC2_SCALES, FC2_ZP), hidden, inter, bits2, block_size)
        level4 = int_attribute(node, "accuracy_level", 0) == 4
        int8 = any(w.block_size and (w.bits == 8 or (w.bits == 4 and level4)) for w in (spec1, spec2))
        return QMoESpec(
            dataclasses.replace(routing, dtype=ir.DataType.FLOAT) if routing.dtype != ir.DataType.FLOAT else routing,
            spec1,
            spec2,
            input_at(node, FC1_BIAS) is not None,
            input_at(node, FC2_BIAS) is not None,
            int8,
        )

    def expand(self, op: OpBuilder, node: ir.Node, spec: QMoESpec) -> list[ir.Value]:
        """Dequantize both expert weights to fp32 [E, K, N], then MoE's dense masked sum in fp32."""
        x = node.inputs[INPUT]
        dtype = x.dtype

        def f32(value: ir.Value | None) -> ir.Value | None:
            return value if value is None or value.dtype == ir.DataType.FLOAT else op.cast(value, ir.DataType.FLOAT)

        fc1_EHF = _dequantized_EKN(op, node, spec.fc1)
        fc2_EIH = _dequantized_EKN(op, node, spec.fc2)
        biases = [
            f32(node.inputs[FC1_BIAS]) if spec.has_fc1_bias else None,
            f32(node.inputs[FC2_BIAS]) if spec.has_fc2_bias else None,
        ]
        out = expert_sum(op, f32(x), f32(node.inputs[ROUTER]), spec.routing, fc1_EHF, fc2_EIH, *biases)
        return [out if dtype == ir.DataType.FLOAT else op.cast(out, dtype)]

    def sample_feeds(self, node: ir.Node, spec: QMoESpec, rng: np.random.Generator):
        """Input of the declared shape (symbolic dims: 3) and random router logits."""
        x, router = node.inputs[INPUT], node.inputs[ROUTER]
        shape = [d if isinstance(d, int) else 3 for d in x.shape]
        tokens = int(np.prod(shape[:-1]))
        return {
            x.name: rng.standard_normal(shape).astype(x.dtype.numpy()),
            router.name: rng.standard_normal((tokens, spec.routing.experts)).astype(router.dtype.numpy()),
        }

    def tolerance(self, spec: QMoESpec, dtype: ir.DataType) -> Tolerance:
        """fp32 rounding; ORT's int8 activations where it uses them (measured ~1% of the output range)."""
        if spec.int8_activations:
            return Tolerance(atol=0.1, rtol=0.05)
        if dtype == ir.DataType.FLOAT16:
            return Tolerance(atol=5e-3, rtol=5e-3)
        return Tolerance(atol=1e-4, rtol=1e-4)


def _dequantized_EKN(op: OpBuilder, node: ir.Node, w: QuantizedWeight) -> ir.Value:
    if w.form == "dq":
        return _dq_EKN(op, node, w)
    return op.op("Transpose", _unpacked_ENK(op, node, w), perm=[0, 2, 1])


def _dq_EKN(op: OpBuilder, node: ir.Node, w: QuantizedWeight) -> ir.Value:
    """DequantizeLinear-21 (axis 1, block_size) of initializers re-laid out [E, K, N] (same bytes)."""
    prefix = f"{node.name or 'QMoE'}/fc{1 if w.weight == FC1 else 2}"
    E = int(node.inputs[w.weight].shape[0])
    q = ir.convenience.get_const_tensor(node.inputs[w.weight])
    signed = not w.has_zero_points
    if w.bits == 4:
        dtype = ir.DataType.INT4 if signed else ir.DataType.UINT4
    else:
        dtype = ir.DataType.INT8 if signed else ir.DataType.UINT8

    def weight_EKN() -> np.ndarray:
        values = unpack_np(q.numpy(), w.bits)  # [E, N, K]
        if signed:  # q - 2**(bits-1) in two's complement: the top bit flipped
            values = values ^ np.uint8(1 << (w.bits - 1))
        values = np.ascontiguousarray(values.transpose(0, 2, 1))
        if w.bits == 8:
            return values.view(np.int8) if signed else values
        return pack_np(_even(values.reshape(-1)), 4)

    inputs = [
        add_initializer(
            op,
            node,
            f"{prefix}/weight_EKN",
            lazy_tensor(weight_EKN, dtype, (E, w.cols, w.rows), f"{prefix}/weight_EKN"),
        )
    ]
    scales = ir.convenience.get_const_tensor(node.inputs[w.scales])
    scale = lazy_tensor(
        lambda: np.ascontiguousarray(scales.numpy().reshape(E, w.rows, w.blocks).transpose(0, 2, 1)),
        scales.dtype,
        (E, w.blocks, w.rows),
        f"{prefix}/scale_EKbN",
    )
    scale_value = add_initializer(op, node, f"{prefix}/scale_EKbN", scale)
    inputs.append(scale_value if scales.dtype == ir.DataType.FLOAT else op.cast(scale_value, ir.DataType.FLOAT))
    if w.has_zero_points:
        inputs.append(_zero_points_EKbN(op, node, w, prefix, E))
    return op.op("DequantizeLinear", *inputs, axis=1, block_size=w.block_size or w.cols)


def _zero_points_EKbN(op: OpBuilder, node: ir.Node, w: QuantizedWeight, prefix: str, E: int) -> ir.Value:
    """The zero points re-laid out [E, Kb, N] (unsigned 4 or 8 bits), as an initializer read only when saved."""
    zp = ir.convenience.get_const_tensor(node.inputs[w.zero_points])

    def zero_points_EKbN() -> np.ndarray:
        packed = zp.numpy().reshape(E, w.rows, -1) if w.block_size else zp.numpy().reshape(E, 1, -1)
        values = unpack_np(packed, w.bits)
        values = values[..., : w.blocks] if w.block_size else values[:, 0, : w.rows].reshape(E, w.rows, 1)
        values = np.ascontiguousarray(values.transpose(0, 2, 1))
        return values if w.bits == 8 else pack_np(_even(values.reshape(-1)), 4)

    zp_dtype = ir.DataType.UINT4 if w.bits == 4 else ir.DataType.UINT8
    zp_tensor = lazy_tensor(zero_points_EKbN, zp_dtype, (E, w.blocks, w.rows), f"{prefix}/zero_point_EKbN")
    return add_initializer(op, node, f"{prefix}/zero_point_EKbN", zp_tensor)


def _even(flat: np.ndarray) -> np.ndarray:
    return flat if flat.size % 2 == 0 else np.concatenate([flat, np.zeros(1, np.uint8)])


def _unpacked_ENK(op: OpBuilder, node: ir.Node, w: QuantizedWeight) -> ir.Value:
    """fp32 [E, N, K] = (q - zp) * scale from the uint8 bytes (:func:`unpack_op`)."""
    N, Kb = w.rows, w.blocks
    block = w.block_size or w.cols
    q = op.op("Reshape", unpack_op(op, node.inputs[w.weight], w.bits), op.ints([0, N, Kb, block]))
    scale = op.op("Reshape", node.inputs[w.scales], op.ints([0, N, Kb, 1]))
    scale = scale if node.inputs[w.scales].dtype == ir.DataType.FLOAT else op.cast(scale, ir.DataType.FLOAT)
    if w.has_zero_points:
        zp_bytes = node.inputs[w.zero_points]
        unpacked = op.op("Reshape", unpack_op(op, zp_bytes, w.bits), op.ints([0, N if w.block_size else 1, -1]))
        count = Kb if w.block_size else N
        zp = op.slice(unpacked, 0, count, axis=2)
        zp = op.op("Reshape", zp, op.ints([0, N, Kb, 1]))
    else:
        zp = op.float_scalar(float(1 << (w.bits - 1)))
    weight = op.op("Mul", op.op("Sub", q, zp), scale)
    return op.op("Reshape", weight, op.ints([0, N, w.cols]))


QMOE = register(QMoE())
