"""com.microsoft.MatMulNBits -> DequantizeLinear-21 + MatMul, or an exact unpack of the bytes + MatMul.

Dimension legend: K reduction (A's last axis), N output features, Kb = ceil(K / block_size)
blocks per column, Kp = Kb * block_size (K padded to whole blocks), bs block_size.

ORT's layout (``matmul_nbits_helper.h``): B uint8 [N, Kb, bs*bits/8], element k of column n at
bit ``bits*(k % (8/bits))`` of its byte; scales [N, Kb] (or flat); zero_points uint8 [N, ceil(Kb*bits/8)]
packed the same way, or of the scales' type [N, Kb], or absent (then 2**(bits-1)); g_idx int32 [K] or [Kp]
maps row k to its block; bias [N]. ``W[n, k] = (q[n, k] - zp[n, blk(k)]) * scale[n, blk(k)]``, ``Y = A @ W^T + bias``.

Two forms::

    dq (opset >= 21, 4/8 bits, constant B/scales/zero points, no g_idx, uint8 or no zero points):
        B re-laid out at rewrite time as weight_KpN INT4/UINT4/INT8/UINT8 (same byte count; without zero
        points the values are shifted to signed, q - 2**(bits-1), by flipping their top bit)
        A --------------------------------------------------> MatMul -> (+ bias) -> Y
        weight_KpN, scale_KbN, zp_KbN -> DequantizeLinear(axis=0, block_size) -> Slice(:K) -^

    unpack (otherwise): B [N, Kb, blob] uint8 -> exact unpack in fp32 (floors of byte / 2**k; see
        _blockwise.unpack_op for why not BitShift) -> (q - zp) * scale -> [N, K] -> MatMul(A, W^T)

The [Kp, N] layout with axis 0 is the one ORT's own DequantizeLinear+MatMul -> MatMulNBits fusion
recognizes, so ORT keeps its fused kernel on the output. fp16 is computed in fp32 (scales cast at run time,
the GEMM in fp32, one Cast of Y), as ORT's CPU kernel does on x86.

Precision: with ``accuracy_level=4`` ORT CPU quantizes A to int8 per block of ``block_size`` along K
(scale max|a|/127, round to nearest) before an int8 GEMM when MLAS has that kernel (x86 AVX2 and up,
ARM64 with dot products). The expansion computes the exact fp32 product instead, which is what the
node means; the two then differ by up to ``sum_blocks max|a_block| / 254 * sum_k |W[n, k]|`` per output.
Per-node verification therefore feeds an A that int8 represents exactly (integers times a power of two,
each block holding a +-127), where ORT's int8 path is exact and the tolerance can stay tight.
On ORT the dq form is fused back into MatMulNBits with the session's
``session.qdq_matmulnbits_accuracy_level`` (default 4, int8 activations), whatever the node's level was.
Other runtimes compute the exact product, so ``--check --runtime`` compares them with the original at
accuracy_level 1 (:func:`gqa_decompose.verify_core.exact_accuracy_levels`).

Refused: bits other than 2/4/8 and block sizes ORT rejects; g_idx or float zero points with other than
4 bits (ORT CPU refuses them); g_idx with uint8 zero points (ORT 1.31 CPU then ignores the zero points and
uses 8, measured: no expansion is both right and equal to ORT); A neither float nor float16.
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
from gqa_decompose.ops._common import input_at
from gqa_decompose.ops.base import OpContext, Tolerance

__all__ = ["MatMulNBits", "MatMulNBitsSpec"]

A, B, SCALES, ZERO_POINTS, G_IDX, BIAS = range(6)
_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16)


@dataclasses.dataclass(frozen=True)
class MatMulNBitsSpec:
    """One MatMulNBits node's contract."""

    K: int
    N: int
    bits: int
    block_size: int
    accuracy_level: int
    dtype: ir.DataType
    zero_points: str  # "none", "packed" (uint8) or "float" (the scales' type)
    has_g_idx: bool
    has_bias: bool
    form: str  # "dq" or "unpack"

    @property
    def k_blocks(self) -> int:
        return -(-self.K // self.block_size)

    @property
    def k_padded(self) -> int:
        return self.k_blocks * self.block_size


def _const(value: ir.Value | None) -> ir.TensorProtocol | None:
    return None if value is None else ir.convenience.get_const_tensor(value)


def _attribute(node: ir.Node, name: str, default: int | None = None) -> int:
    attribute = node.attributes.get(name)
    if attribute is None:
        if default is None:
            raise GqaDecomposeError(f"MatMulNBits needs the '{name}' attribute", node.name)
        return default
    return int(attribute.as_int())


class MatMulNBits:
    """The decomposer of com.microsoft.MatMulNBits."""

    domain = "com.microsoft"
    op_type = "MatMulNBits"

    def parse(self, node: ir.Node, context: OpContext) -> MatMulNBitsSpec:
        """Validate the node as ORT CPU does; choose the dq form where the opset and constants allow it."""
        K, N = _attribute(node, "K"), _attribute(node, "N")
        bits, block_size = _attribute(node, "bits", 4), _attribute(node, "block_size")
        if bits not in (2, 4, 8):
            raise GqaDecomposeError(f"MatMulNBits bits={bits}: ORT supports 2, 4 and 8", node.name)
        if block_size < 16 or block_size & (block_size - 1):
            raise GqaDecomposeError(f"MatMulNBits block_size={block_size}: ORT needs a power of 2 >= 16", node.name)
        a = node.inputs[A]
        if a is None or a.dtype not in _FLOATS:
            raise GqaDecomposeError("MatMulNBits on ORT CPU takes float or float16 A", node.name)
        zero_point = input_at(node, ZERO_POINTS)
        if zero_point is None:
            zero_points = "none"
        elif zero_point.dtype == ir.DataType.UINT8:
            zero_points = "packed"
        elif zero_point.dtype == a.dtype:
            zero_points = "float"
        else:
            raise GqaDecomposeError("MatMulNBits zero_points must be uint8 or the scales' type", node.name)
        has_g_idx = input_at(node, G_IDX) is not None
        if (has_g_idx or zero_points == "float") and bits != 4:
            raise GqaDecomposeError(
                "MatMulNBits: ORT CPU takes g_idx and float zero points with 4 bits only", node.name
            )
        if has_g_idx and zero_points == "packed":
            # Measured on ORT 1.31 CPU: with g_idx its reorder kernel reads uint8 zero points and then uses 8.
            raise GqaDecomposeError(
                "MatMulNBits with g_idx and uint8 zero points: ORT CPU ignores those zero points (uses 8), "
                "so no expansion is both right and equal to ORT",
                node.name,
            )
        constants = all(
            _const(input_at(node, i)) is not None for i in (B, SCALES, ZERO_POINTS) if input_at(node, i) is not None
        )
        dq = context.opset >= 21 and bits in (4, 8) and constants and not has_g_idx and zero_points != "float"
        return MatMulNBitsSpec(
            K=K,
            N=N,
            bits=bits,
            block_size=block_size,
            accuracy_level=_attribute(node, "accuracy_level", 0),
            dtype=a.dtype,
            zero_points=zero_points,
            has_g_idx=has_g_idx,
            has_bias=input_at(node, BIAS) is not None,
            form="dq" if dq else "unpack",
        )

    def expand(self, op: OpBuilder, node: ir.Node, spec: MatMulNBitsSpec) -> list[ir.Value]:
        """Y = A @ dequantized(B)^T (+ bias), in fp32."""
        a = node.inputs[A]
        a32 = a if spec.dtype == ir.DataType.FLOAT else op.cast(a, ir.DataType.FLOAT)
        if spec.form == "dq":
            weight_KN = _dequantized_KN(op, node, spec)
        else:
            weight_KN = op.op("Transpose", _unpacked_NK(op, node, spec), perm=[1, 0])
        y = op.op("MatMul", a32, weight_KN)
        if spec.has_bias:
            y = op.op("Add", y, _as_float(op, node.inputs[BIAS]))
        if spec.dtype != ir.DataType.FLOAT:
            y = op.cast(y, spec.dtype)
        return [y]

    def sample_feeds(self, node: ir.Node, spec: MatMulNBitsSpec, rng: np.random.Generator):
        """A exactly representable in ORT's per-block int8 (so accuracy_level 4 is exact); the rest random."""
        feeds = {}
        a = node.inputs[A]
        shape = [d if isinstance(d, int) else 3 for d in a.shape] if a.shape is not None else [2, 3, spec.K]
        feeds[a.name] = int8_exact(rng, shape, spec.block_size).astype(spec.dtype.numpy())
        for index, make in _RANDOM_INPUTS.items():
            value = input_at(node, index)
            if value is not None and _const(value) is None:
                feeds[value.name] = make(rng, spec, value)
        return feeds

    def tolerance(self, spec: MatMulNBitsSpec, dtype: ir.DataType) -> Tolerance:
        """fp32: GEMM summation order only; fp16: one rounding of Y."""
        if dtype == ir.DataType.FLOAT16:
            return Tolerance(atol=1e-2, rtol=2e-3)
        return Tolerance(atol=1e-4, rtol=1e-4)


def int8_exact(rng: np.random.Generator, shape, block_size: int) -> np.ndarray:
    """fp32 values that ORT's per-block int8 quantization of A (max|a|/127 scale) reproduces exactly."""
    shape = list(shape)
    k = shape[-1]
    blocks = -(-k // block_size)
    levels = rng.integers(-127, 128, size=[*shape[:-1], blocks * block_size]).astype(np.float32)
    grouped = levels.reshape(*shape[:-1], blocks, block_size)
    grouped[..., 0] = np.where(rng.random(grouped.shape[:-1]) < 0.5, -127.0, 127.0)
    levels = grouped.reshape(*shape[:-1], blocks * block_size)[..., :k]
    if k % block_size:  # the last, partial block also needs its +-127
        levels[..., (blocks - 1) * block_size] = 127.0
    return levels * np.float32(2.0**-6)


def _random_b(rng, spec: MatMulNBitsSpec, value: ir.Value) -> np.ndarray:
    return rng.integers(0, 256, size=(spec.N, spec.k_blocks, spec.block_size * spec.bits // 8), dtype=np.uint8)


def _random_scales(rng, spec: MatMulNBitsSpec, value: ir.Value) -> np.ndarray:
    shape = [int(d) for d in value.shape] if value.shape is not None else [spec.N, spec.k_blocks]
    return (rng.random(shape) * 0.02 + 0.005).astype(value.dtype.numpy())


def _random_zero_points(rng, spec: MatMulNBitsSpec, value: ir.Value) -> np.ndarray:
    shape = [int(d) for d in value.shape]
    if value.dtype == ir.DataType.UINT8:
        return rng.integers(0, 256, size=shape, dtype=np.uint8)
    return rng.uniform(0, 2**spec.bits - 1, size=shape).astype(value.dtype.numpy())


def _random_g_idx(rng, spec: MatMulNBitsSpec, value: ir.Value) -> np.ndarray:
    length = int(value.shape[0]) if value.shape is not None else spec.K
    return rng.permutation(np.arange(length) // spec.block_size).astype(np.int32)


def _random_bias(rng, spec: MatMulNBitsSpec, value: ir.Value) -> np.ndarray:
    return rng.standard_normal(spec.N).astype(value.dtype.numpy())


_RANDOM_INPUTS = {
    B: _random_b,
    SCALES: _random_scales,
    ZERO_POINTS: _random_zero_points,
    G_IDX: _random_g_idx,
    BIAS: _random_bias,
}


def _as_float(op: OpBuilder, source: ir.Value, value: ir.Value | None = None) -> ir.Value:
    """``value`` (default ``source``) in fp32; ``source`` gives the type (tape-made values carry none)."""
    value = source if value is None else value
    return value if source.dtype == ir.DataType.FLOAT else op.cast(value, ir.DataType.FLOAT)


# The dq form ---------------------------------------------------------------------------------------------


def _dequantized_KN(op: OpBuilder, node: ir.Node, spec: MatMulNBitsSpec) -> ir.Value:
    """fp32 [K, N]: DequantizeLinear-21 (axis 0, block_size) of the re-laid-out initializers, sliced to K."""
    prefix = node.name or "MatMulNBits"
    weight = add_initializer(op, node, f"{prefix}/weight_KpN", _weight_KpN(spec, _const(node.inputs[B])))
    scale_tensor = _const(node.inputs[SCALES])
    scale = add_initializer(
        op,
        node,
        f"{prefix}/scale_KbN",
        lazy_tensor(
            lambda: scale_tensor.numpy().reshape(spec.N, spec.k_blocks).T.copy(),
            scale_tensor.dtype,
            (spec.k_blocks, spec.N),
            f"{prefix}/scale_KbN",
        ),
    )
    inputs = [weight, _as_float(op, scale)]
    if spec.zero_points == "packed":
        zp = _zero_points_KbN(spec, _const(node.inputs[ZERO_POINTS]), f"{prefix}/zero_point_KbN")
        inputs.append(add_initializer(op, node, f"{prefix}/zero_point_KbN", zp))
    dequantized = op.op("DequantizeLinear", *inputs, axis=0, block_size=spec.block_size)
    if spec.k_padded != spec.K:
        dequantized = op.slice(dequantized, 0, spec.K, axis=0)
    return dequantized


def _weight_KpN(spec: MatMulNBitsSpec, b: ir.TensorProtocol) -> ir.LazyTensor:
    """B [N, Kb, blob] uint8 -> [Kp, N] (U)INT4/(U)INT8, transposed, same bytes; signed when there is no zero point."""
    signed = spec.zero_points == "none"
    if spec.bits == 4:
        dtype = ir.DataType.INT4 if signed else ir.DataType.UINT4
    else:
        dtype = ir.DataType.INT8 if signed else ir.DataType.UINT8

    def compute() -> np.ndarray:
        values_NKp = unpack_np(b.numpy().reshape(spec.N, -1), spec.bits)
        if signed:  # q - 2**(bits-1) in two's complement is q with its top bit flipped
            values_NKp = values_NKp ^ np.uint8(1 << (spec.bits - 1))
        values_KpN = values_NKp.T
        if spec.bits == 8:
            return values_KpN.view(np.int8).copy() if signed else values_KpN.copy()
        flat = values_KpN.reshape(-1)
        if flat.size % 2:
            flat = np.concatenate([flat, np.zeros(1, np.uint8)])
        return pack_np(flat, 4)

    return lazy_tensor(compute, dtype, (spec.k_padded, spec.N), "weight_KpN")


def _zero_points_KbN(spec: MatMulNBitsSpec, zp: ir.TensorProtocol, name: str) -> ir.LazyTensor:
    """Packed uint8 [N, ceil(Kb*bits/8)] -> [Kb, N] UINT4/UINT8."""

    def compute() -> np.ndarray:
        values_NKb = unpack_np(zp.numpy().reshape(spec.N, -1), spec.bits)[:, : spec.k_blocks]
        values_KbN = values_NKb.T.copy()
        if spec.bits == 8:
            return values_KbN
        flat = values_KbN.reshape(-1)
        if flat.size % 2:
            flat = np.concatenate([flat, np.zeros(1, np.uint8)])
        return pack_np(flat, 4)

    dtype = ir.DataType.UINT4 if spec.bits == 4 else ir.DataType.UINT8
    return lazy_tensor(compute, dtype, (spec.k_blocks, spec.N), name)


# The unpack form -----------------------------------------------------------------------------------------


def _unpacked_NK(op: OpBuilder, node: ir.Node, spec: MatMulNBitsSpec) -> ir.Value:
    """fp32 [N, K] = (q - zp) * scale, with q unpacked from B's bytes (:func:`unpack_op`)."""
    N, Kb, bs = spec.N, spec.k_blocks, spec.block_size
    packed = op.op("Reshape", node.inputs[B], op.ints([N, Kb, bs * spec.bits // 8]))
    q_NKbBs = op.op("Reshape", unpack_op(op, packed, spec.bits), op.ints([N, Kb, bs]))
    scale_NKb = _as_float(op, node.inputs[SCALES], op.op("Reshape", node.inputs[SCALES], op.ints([N, Kb])))
    zp_NKb = _zero_points_NKb(op, node, spec)
    if not spec.has_g_idx:
        centered = op.op("Sub", q_NKbBs, zp_NKb if spec.zero_points == "none" else op.unsqueeze(zp_NKb, [2]))
        weight = op.op("Reshape", op.op("Mul", centered, op.unsqueeze(scale_NKb, [2])), op.ints([N, spec.k_padded]))
        return weight if spec.k_padded == spec.K else op.slice(weight, 0, spec.K, axis=1)
    # g_idx: row k belongs to block g_idx[k]; gather each row's scale and zero point (at run time: no inflation).
    q_NK = op.op("Reshape", q_NKbBs, op.ints([N, spec.k_padded]))
    if spec.k_padded != spec.K:
        q_NK = op.slice(q_NK, 0, spec.K, axis=1)
    block_K = op.slice(node.inputs[G_IDX], 0, spec.K, axis=0)
    scale_NK = op.op("Gather", scale_NKb, block_K, axis=1)
    zp_NK = zp_NKb if spec.zero_points == "none" else op.op("Gather", zp_NKb, block_K, axis=1)
    return op.op("Mul", op.op("Sub", q_NK, zp_NK), scale_NK)


def _zero_points_NKb(op: OpBuilder, node: ir.Node, spec: MatMulNBitsSpec) -> ir.Value:
    """fp32 [N, Kb] zero points, or a 0-D 2**(bits-1) when the node has none."""
    N, Kb = spec.N, spec.k_blocks
    if spec.zero_points == "none":
        return op.float_scalar(float(1 << (spec.bits - 1)))
    zp = node.inputs[ZERO_POINTS]
    if spec.zero_points == "float":
        return _as_float(op, zp, op.op("Reshape", zp, op.ints([N, Kb])))
    packed = op.op("Reshape", zp, op.ints([N, -(-Kb * spec.bits // 8)]))
    unpacked = op.op("Reshape", unpack_op(op, packed, spec.bits), op.ints([N, -1]))
    return op.slice(unpacked, 0, Kb, axis=1)


MATMUL_NBITS = register(MatMulNBits())
