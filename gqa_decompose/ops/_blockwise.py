"""Block-quantized weights shared by MatMulNBits, GatherBlockQuantized and QMoE.

ORT packs sub-byte values little-end first: element ``j`` of a byte sits in bits
``[bits*j, bits*(j+1))`` (4 bits: element 2i in the low nibble), which is also
ONNX's INT4/UINT4 packing. So a packed row can become an INT4/UINT4 tensor by
re-layout alone: the bytes stay as many as they were (no inflation).

Two ways to read them back in a graph:

- ``DequantizeLinear-21`` with ``block_size``, on an initializer re-laid out at
  rewrite time (lazily: nothing is read until the model is saved);
- an exact unpack with ``BitShift`` (opset 11) on the uint8 bytes, for lower
  opsets, 2-bit weights, and weights that are not constants:
  ``element_j = (byte << (8 - bits*(j+1))) >> (8 - bits)`` in uint8, where the
  left shift drops the higher elements' bits.
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
    """uint8 [..., B] -> uint8 [..., B, 8/bits] with standard ops (BitShift, opset 11)."""
    per_byte = 8 // bits
    if per_byte == 1:
        return op.unsqueeze(packed, [-1])
    left = np.array([8 - bits * (j + 1) for j in range(per_byte)], dtype=np.uint8)
    shifted = op.op(
        "BitShift",
        op.unsqueeze(packed, [-1]),
        op.op("Constant", value=ir.tensor(left)),
        direction="LEFT",
    )
    right = op.op("Constant", value=ir.tensor(np.array([8 - bits], dtype=np.uint8)))
    return op.op("BitShift", shifted, right, direction="RIGHT")


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
