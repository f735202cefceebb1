"""Block-quantized weights shared by MatMulNBits, GatherBlockQuantized and QMoE.

ORT packs sub-byte values little-end first: element ``j`` of a byte sits in bits
``[bits*j, bits*(j+1))`` (4 bits: element 2i in the low nibble), which is also
ONNX's INT4/UINT4 packing. So a packed row can become an INT4/UINT4 tensor by
re-layout alone: the bytes stay as many as they were (no inflation).

Two ways to read them back in a graph:

- ``DequantizeLinear-21`` with ``block_size``, on an initializer re-laid out at
  rewrite time (lazily: nothing is read until the model is saved);
- an exact unpack of the uint8 bytes in fp32 arithmetic (:func:`unpack_op`), for
  lower opsets, 2-bit weights, and weights that are not constants.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from gqa_decompose.expansion.builder import OpBuilder

__all__ = ["add_initializer", "lazy_tensor", "pack_np", "unpack_np", "unpack_op"]


def unpack_np(packed: np.ndarray, bits: int) -> np.ndarray:
    """uint8 [..., B] -> uint8 [..., B * 8/bits], element 0 of each byte first."""
    per_byte = 8 // bits
    shifts = np.arange(per_byte, dtype=np.uint8) * bits
    values = (packed[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    return values.reshape(*packed.shape[:-1], packed.shape[-1] * per_byte)


def pack_np(values: np.ndarray, bits: int) -> np.ndarray:
    """uint8 [..., C] (values < 2**bits, C a multiple of 8/bits) -> packed uint8 [..., C * bits/8]."""
    per_byte = 8 // bits
    grouped = values.astype(np.uint8).reshape(*values.shape[:-1], values.shape[-1] // per_byte, per_byte)
    shifts = np.arange(per_byte, dtype=np.uint8) * bits
    return np.bitwise_or.reduce(grouped << shifts, axis=-1).astype(np.uint8)


def unpack_op(op: OpBuilder, packed: ir.Value, bits: int) -> ir.Value:
    """uint8 [..., B] -> fp32 [..., B, 8/bits], element 0 of each byte first, exactly, in any opset.

    ``element_j = floor(byte / 2**(bits*j)) - 2**bits * floor(byte / 2**(bits*(j+1)))`` in fp32 (bytes and
    powers of two are exact there). Not BitShift/BitwiseAnd: OpenVINO 2026.4 CPU computes a wrong product
    when 4-bit values unpacked by them feed a MatMul (its compressed-weight fusion; measured, both
    ``(b << k) >> k`` and ``(b >> k) & mask``), while this form runs right on ORT, onnx.reference and OpenVINO.
    """
    per_byte = 8 // bits
    values = op.cast(op.unsqueeze(packed, [-1]), ir.DataType.FLOAT)
    if per_byte == 1:
        return values
    shifts = [bits * j for j in range(per_byte)]
    scale = op.op("Constant", value=ir.tensor(np.array([2.0**-s for s in shifts], np.float32)))
    here = op.op("Floor", op.op("Mul", values, scale))
    above = op.op("Floor", op.op("Mul", values, op.op("Mul", scale, op.float_scalar(2.0**-bits))))
    return op.op("Sub", here, op.op("Mul", above, op.float_scalar(float(1 << bits))))


def lazy_tensor(
    compute: Callable[[], np.ndarray], dtype: ir.DataType, shape: tuple[int, ...], name: str
) -> ir.LazyTensor:
    """A tensor computed only when read (at save time); ``compute`` returns packed bytes for 4-bit types."""

    def make() -> ir.TensorProtocol:
        array = compute()
        if dtype in (ir.DataType.INT4, ir.DataType.UINT4):
            return ir.PackedTensor(array, dtype, shape=shape, name=name)
        return ir.Tensor(array, dtype=dtype, name=name)

    return ir.LazyTensor(make, dtype, ir.Shape(shape), name=name)


def add_initializer(op: OpBuilder, node: ir.Node, name: str, tensor: ir.TensorProtocol) -> ir.Value:
    """An initializer of the graph holding ``node`` (so large weights go to external data when saved).

    In a function (no initializers) it is a Constant node instead.
    """
    graph = node.graph
    if not isinstance(graph, ir.Graph):
        return op.op("Constant", value=tensor)
    value = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    base, index = name, 1
    while value.name in graph.initializers:
        index += 1
        value.name = f"{base}_{index}"
    graph.register_initializer(value)
    return value
