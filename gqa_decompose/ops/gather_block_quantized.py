"""com.microsoft.GatherBlockQuantized -> Gather of the packed bytes, then an exact unpack and dequantize.

Dimension legend: V gathered axis (axis 0), I... the indices' shape, R... the axes between (usually none),
D the quantized (last) axis in elements, Dp = D * bits / 8 its bytes, Db = ceil(D / block_size) its blocks.

ORT's layout (``gather_block_quantized.cc``): data uint8 [V, R..., Dp] (2, 4 or 8 bits packed along the last
axis, element 0 in the lowest bits), or INT4/UINT4 [V, R..., D]; scales [V, R..., Db] of the output type;
zero_points packed like data [V, R..., ceil(Db*bits/8)] (uint8) or like scales (int4), absent meaning
2**(bits-1) for uint8 data and 0 for int4; ``out = float(q - zp) * float(scale)`` cast to the scales' type;
an index outside [-V, V) gives a row of zeros::

    indices -> (valid, safe) -> Gather(data bytes) -> unpack (fp32) -> (q - zp) * scale -> Where(valid)
                               Gather(scales), Gather(zero point bytes) -> unpack -----^

Gather comes first, so only the gathered rows are ever unpacked (an embedding table is never dequantized
whole), and the file keeps the original bytes. DequantizeLinear-21 is not used: it would need the
gathered rows as INT4, and no standard op reinterprets bytes at run time (Gather takes no INT4 before
opset 25... and a whole-table DequantizeLinear before the Gather costs V*D floats per run).
INT4/UINT4 data becomes uint8 bytes by re-layout (a constant; same bytes) and is then read the same way.

INT4/UINT4 data that is not a constant (opset >= 21) is read by Cast to int8 before the Gather instead.

Refused: gather_axis other than 0 or quantize_axis other than the last (ORT refuses both for uint8 data;
for INT4 data no producer writes them), non-constant INT4 data below opset 21, FP8/FP4 data.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from gqa_decompose.errors import GqaDecomposeError
from gqa_decompose.expansion.builder import OpBuilder
from gqa_decompose.ops import register
from gqa_decompose.ops._blockwise import add_initializer, lazy_tensor, unpack_op
from gqa_decompose.ops._common import int_attribute
from gqa_decompose.ops.base import OpContext, Tolerance

__all__ = ["GatherBlockQuantized", "GatherBlockQuantizedSpec"]

DATA, INDICES, SCALES, ZERO_POINTS = range(4)
_NIBBLES = (ir.DataType.INT4, ir.DataType.UINT4)
_LEVELS = {ir.DataType.UINT8: (0, 256), ir.DataType.INT4: (-8, 8), ir.DataType.UINT4: (0, 16)}


@dataclasses.dataclass(frozen=True)
class GatherBlockQuantizedSpec:
    """One GatherBlockQuantized node's contract."""

    bits: int
    block_size: int
    rank: int
    elements: int  # D, in elements
    data_dtype: ir.DataType  # UINT8, INT4 or UINT4
    out_dtype: ir.DataType
    has_zero_points: bool
    constant: bool  # data and zero points are constants (INT4 data: re-laid out; else Cast at run time)

    @property
    def blocks(self) -> int:
        return -(-self.elements // self.block_size)


class GatherBlockQuantized:
    """The decomposer of com.microsoft.GatherBlockQuantized."""

    domain = "com.microsoft"
    op_type = "GatherBlockQuantized"

    def parse(self, node: ir.Node, context: OpContext) -> GatherBlockQuantizedSpec:
        """Validate as ORT CPU does; refuse the axis layouts no standard-op form here handles."""
        data, scales = node.inputs[DATA], node.inputs[SCALES]
        if data is None or data.shape is None or not all(isinstance(d, int) for d in data.shape[1:]):
            raise GqaDecomposeError("GatherBlockQuantized needs data with a static shape past axis 0", node.name)
        rank = data.shape.rank()
        bits, block_size = int_attribute(node, "bits", 4), int_attribute(node, "block_size", 128)
        gather_axis = int_attribute(node, "gather_axis", 0) % rank
        quantize_axis = int_attribute(node, "quantize_axis", 1) % rank
        if block_size < 16 or block_size & (block_size - 1):
            raise GqaDecomposeError(
                f"GatherBlockQuantized block_size={block_size}: ORT needs a power of 2 >= 16", node.name
            )
        if data.dtype == ir.DataType.UINT8:
            if bits not in (2, 4, 8):
                raise GqaDecomposeError(f"GatherBlockQuantized bits={bits}: ORT takes 2, 4 or 8", node.name)
        elif data.dtype in _NIBBLES:
            zero_points = node.inputs[ZERO_POINTS] if len(node.inputs) > ZERO_POINTS else None
            constants = [v for v in (data, zero_points) if v is not None]
            constant = all(ir.convenience.get_const_tensor(v) is not None for v in constants)
            if bits != 4 or not (constant or context.opset >= 21):
                raise GqaDecomposeError(
                    "GatherBlockQuantized INT4/UINT4 data: 4 bits, and constant data and zero points below opset 21",
                    node.name,
                )
            if data.shape[-1] % 2:
                raise GqaDecomposeError("GatherBlockQuantized INT4/UINT4 data with an odd last axis", node.name)
        else:
            raise GqaDecomposeError(f"GatherBlockQuantized data of type {data.dtype}: not supported", node.name)
        if gather_axis != 0 or quantize_axis != rank - 1:
            raise GqaDecomposeError("GatherBlockQuantized: only gather_axis=0 with the last axis quantized", node.name)
        if scales is None or scales.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
            raise GqaDecomposeError("GatherBlockQuantized scales must be float or float16", node.name)
        per_byte = 8 // bits if data.dtype == ir.DataType.UINT8 else 1
        return GatherBlockQuantizedSpec(
            bits=bits,
            block_size=block_size,
            rank=rank,
            elements=int(data.shape[-1]) * per_byte,
            data_dtype=data.dtype,
            out_dtype=scales.dtype,
            has_zero_points=len(node.inputs) > ZERO_POINTS and node.inputs[ZERO_POINTS] is not None,
            constant=all(
                ir.convenience.get_const_tensor(v) is not None
                for v in node.inputs[DATA : DATA + 1] + node.inputs[ZERO_POINTS : ZERO_POINTS + 1]
                if v is not None
            ),
        )

    def expand(self, op: OpBuilder, node: ir.Node, spec: GatherBlockQuantizedSpec) -> list[ir.Value]:
        """Gather the bytes of the chosen rows, unpack, dequantize in fp32, zero the out-of-range rows."""
        data, indices, scales = node.inputs[DATA], node.inputs[INDICES], node.inputs[SCALES]
        valid, safe = _checked_indices(op, indices, op.dim(data, 0))
        if spec.data_dtype == ir.DataType.UINT8 or spec.constant:
            data_bytes = data if spec.data_dtype == ir.DataType.UINT8 else _as_bytes(op, node, data)
            q = _unpacked(op, op.op("Gather", data_bytes, safe, axis=0), spec.bits)
            if spec.data_dtype == ir.DataType.INT4:
                q = _signed_nibbles(op, q)
        else:  # INT4 data computed at run time: Cast-21 reads it (the whole table, one byte per value)
            q = op.cast(op.op("Gather", op.cast(data, ir.DataType.INT8), safe, axis=0), ir.DataType.FLOAT)
        scale = _per_element(op, op.cast(op.op("Gather", scales, safe, axis=0), ir.DataType.FLOAT), spec)
        zero_point = _zero_point(op, node, safe, spec)
        out = op.op("Mul", q if zero_point is None else op.op("Sub", q, zero_point), scale)
        if spec.out_dtype != ir.DataType.FLOAT:
            out = op.cast(out, spec.out_dtype)
        mask = op.op("Reshape", valid, op.op("Concat", op.op("Shape", valid), op.ints([1] * (spec.rank - 1)), axis=0))
        return [op.op("Where", mask, out, op.float_scalar(0.0, spec.out_dtype))]

    def sample_feeds(self, node: ir.Node, spec: GatherBlockQuantizedSpec, rng: np.random.Generator):
        """In-range and out-of-range (both signs) indices; the other inputs random when not constants."""
        indices, data = node.inputs[INDICES], node.inputs[DATA]
        rows = data.shape[0] if isinstance(data.shape[0], int) else 8
        shape = [d if isinstance(d, int) else 3 for d in indices.shape] if indices.shape is not None else [2, 3]
        chosen = rng.integers(-rows - 2, rows + 2, size=shape).astype(indices.dtype.numpy())
        feeds = {indices.name: chosen}
        for index in (DATA, SCALES, ZERO_POINTS):
            value = node.inputs[index] if index < len(node.inputs) else None
            if value is None or ir.convenience.get_const_tensor(value) is not None:
                continue
            full = [rows, *[int(d) for d in value.shape[1:]]]
            if value.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
                feeds[value.name] = (rng.random(full) * 0.02 + 0.005).astype(value.dtype.numpy())
            else:
                low, high = _LEVELS[value.dtype]
                feeds[value.name] = rng.integers(low, high, size=full).astype(value.dtype.numpy())
        return feeds

    def tolerance(self, spec: GatherBlockQuantizedSpec, dtype: ir.DataType) -> Tolerance:
        """The same fp32 product as ORT's, then the same rounding: exact."""
        return Tolerance(atol=0.0, rtol=0.0)


def _signed_nibbles(op: OpBuilder, u: ir.Value) -> ir.Value:
    """fp32 nibble values 0..15 read as two's complement int4: u - 16 * (u >= 8)."""
    negative = op.cast(op.op("GreaterOrEqual", u, op.float_scalar(8.0)), ir.DataType.FLOAT)
    return op.op("Sub", u, op.op("Mul", negative, op.float_scalar(16.0)))


def _checked_indices(op: OpBuilder, indices: ir.Value, rows: ir.Value) -> tuple[ir.Value, ir.Value]:
    """(indices in [-V, V), those indices with the others replaced by 0), as ORT zeroes out-of-range rows."""
    rows = op.cast(rows, indices.dtype)
    valid = op.op("And", op.op("GreaterOrEqual", indices, op.op("Neg", rows)), op.op("Less", indices, rows))
    return valid, op.op("Where", valid, indices, op.cast(op.int_scalar(0), indices.dtype))


def _as_bytes(op: OpBuilder, node: ir.Node, data: ir.Value) -> ir.Value:
    """A constant INT4/UINT4 [V, R..., D] as its packed bytes uint8 [V, R..., D/2] (same bytes; unpacked later)."""
    tensor = ir.convenience.get_const_tensor(data)
    shape = (*[int(d) for d in data.shape[:-1]], int(data.shape[-1]) // 2)
    name = f"{node.name or 'GatherBlockQuantized'}/data_bytes"
    bytes_tensor = lazy_tensor(
        lambda: np.frombuffer(tensor.tobytes(), np.uint8).reshape(shape), ir.DataType.UINT8, shape, name
    )
    return add_initializer(op, node, name, bytes_tensor)


def _unpacked(op: OpBuilder, packed: ir.Value, bits: int) -> ir.Value:
    """uint8 [I..., R..., Dp] -> fp32 [I..., R..., D]."""
    values = unpack_op(op, packed, bits)
    shape = op.op("Concat", op.slice(op.op("Shape", packed), 0, -1, axis=0), op.ints([-1]), axis=0)
    return op.op("Reshape", values, shape)


def _per_element(op: OpBuilder, per_block: ir.Value, spec: GatherBlockQuantizedSpec) -> ir.Value:
    """[..., Db] -> [..., D]: each element's block value (a Gather by a small constant block index)."""
    block_of = np.arange(spec.elements, dtype=np.int64) // spec.block_size
    return op.op("Gather", per_block, op.op("Constant", value=ir.tensor(block_of)), axis=-1)


def _zero_point(op: OpBuilder, node: ir.Node, safe: ir.Value, spec: GatherBlockQuantizedSpec) -> ir.Value | None:
    """fp32 [..., D] zero points of the gathered rows, a 0-D default, or None (int4 data without any: 0)."""
    if not spec.has_zero_points:
        if spec.data_dtype == ir.DataType.UINT8:
            return op.float_scalar(float(1 << (spec.bits - 1)))
        return None
    if spec.data_dtype == ir.DataType.UINT8:
        gathered = op.op("Gather", node.inputs[ZERO_POINTS], safe, axis=0)
        unpacked = op.slice(_unpacked(op, gathered, spec.bits), 0, spec.blocks, axis=-1)
        return _per_element(op, unpacked, spec)
    zero_points = node.inputs[ZERO_POINTS]
    as_int8 = _nibbles_as_int8(op, node, zero_points) if spec.constant else op.cast(zero_points, ir.DataType.INT8)
    gathered = op.op("Gather", as_int8, safe, axis=0)
    return _per_element(op, op.cast(gathered, ir.DataType.FLOAT), spec)


def _nibbles_as_int8(op: OpBuilder, node: ir.Node, zero_points: ir.Value) -> ir.Value:
    """Constant INT4/UINT4 zero points as one int8 per value: their rows need not be byte-aligned.

    They are 1/block_size of the data's elements, so a byte each adds 1/block_size of the data's bytes.
    """
    tensor = ir.convenience.get_const_tensor(zero_points)
    name = f"{node.name or 'GatherBlockQuantized'}/zero_points_int8"
    shape = tuple(int(d) for d in zero_points.shape)
    return add_initializer(
        op, node, name, lazy_tensor(lambda: tensor.numpy().astype(np.int8), ir.DataType.INT8, shape, name)
    )


GATHER_BLOCK_QUANTIZED = register(GatherBlockQuantized())
