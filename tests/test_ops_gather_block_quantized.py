"""GatherBlockQuantized -> Gather of packed bytes + exact unpack + dequantize: numeric against ORT CPU, refusals."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto

from gqa_decompose.errors import GqaDecomposeError
from gqa_decompose.ops.base import OpContext
from gqa_decompose.ops.gather_block_quantized import GATHER_BLOCK_QUANTIZED
from tests.op_harness import compare, expand_model, one_node_model

_NIBBLE_TYPES = {"int4": ml_dtypes.int4, "uint4": ml_dtypes.uint4}


def gbq_model(
    rows=10,
    D=64,
    bits=4,
    block_size=32,
    data="uint8",
    zero_points=True,
    dtype=np.float32,
    middle=(),
    indices_dtype=np.int64,
    opset=21,
    constant=True,
    seed=0,
    **attributes,
) -> onnx.ModelProto:
    """One GatherBlockQuantized node over a [rows, *middle, D] table; indices [2, 3]."""
    rng = np.random.default_rng(seed)
    blocks = -(-D // block_size)
    lead = (rows, *middle)
    if data == "uint8":
        table = rng.integers(0, 256, (*lead, D * bits // 8), dtype=np.uint8)
        zp = rng.integers(0, 256, (*lead, -(-blocks * bits // 8)), dtype=np.uint8)
    else:
        low, high = (-8, 8) if data == "int4" else (0, 16)
        table = rng.integers(low, high, (*lead, D)).astype(_NIBBLE_TYPES[data])
        zp = rng.integers(low, high, (*lead, blocks)).astype(_NIBBLE_TYPES[data])
    scales = (rng.random((*lead, blocks)) * 0.02 + 0.005).astype(dtype)
    inputs = [("data", table), ("indices", np.zeros((2, 3), indices_dtype)), ("scales", scales)]
    inputs.append(("zp", zp) if zero_points else None)
    elem = TensorProto.FLOAT if dtype == np.float32 else TensorProto.FLOAT16
    quantize_axis = attributes.pop("quantize_axis", len(lead))
    return one_node_model(
        "GatherBlockQuantized",
        inputs,
        [("out", elem, [2, 3, *middle, D])],
        constants=["data", "scales", "zp"] if constant else [],
        opset=opset,
        bits=bits,
        block_size=block_size,
        quantize_axis=quantize_axis,
        **attributes,
    )


CASES = {
    "uint8 4 bits, zero points": {},
    "uint8 4 bits, no zero points": {"zero_points": False},
    "uint8 8 bits": {"bits": 8},
    "uint8 2 bits": {"bits": 2},
    "uint8 2 bits no zero points": {"bits": 2, "zero_points": False},
    "partial last block, odd block count": {"D": 80},
    "fp16 scales": {"dtype": np.float16},
    "int32 indices": {"indices_dtype": np.int32},
    "a middle axis": {"middle": (3,)},
    "opset 13": {"opset": 13},
    "int4 data": {"data": "int4"},
    "int4 data no zero points": {"data": "int4", "zero_points": False},
    "uint4 data, fp16": {"data": "uint4", "dtype": np.float16},
    "uint8 table as a graph input": {"constant": False},
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_expansion_matches_ort_exactly(case):
    comparison = compare(GATHER_BLOCK_QUANTIZED, gbq_model(**CASES[case]))
    assert comparison.max_errors == [0.0]
    assert np.any(comparison.expected[0] == 0) and np.any(comparison.expected[0] != 0)  # out-of-range rows seen


def _computed(model: onnx.ModelProto, names=("data", "zp")) -> onnx.ModelProto:
    """The model with ``names`` read through Identity nodes: not constants to the decomposer.

    (ORT's Python API takes no int4 numpy feeds, so a computed INT4 table is the way to reach that form.)
    """
    node = model.graph.node[0]
    for name in names:
        if name in node.input:
            node.input[list(node.input).index(name)] = f"{name}_computed"
            model.graph.node.insert(0, onnx.helper.make_node("Identity", [name], [f"{name}_computed"]))
            tensor = next(t for t in model.graph.initializer if t.name == name)
            info = onnx.helper.make_tensor_value_info(f"{name}_computed", tensor.data_type, list(tensor.dims))
            model.graph.value_info.append(info)
    return model


@pytest.mark.parametrize("kwargs", [{"data": "int4"}, {"data": "uint4", "zero_points": False}], ids=["int4", "uint4"])
def test_computed_int4_table_is_cast_at_run_time(kwargs):
    from tests.op_harness import assert_standard, run

    model = _computed(gbq_model(**kwargs))
    expanded = expand_model(model, GATHER_BLOCK_QUANTIZED, np.random.default_rng(0))
    assert expanded.spec.constant is False
    assert_standard(expanded.model)
    feeds = expanded.sampled_feeds
    np.testing.assert_array_equal(run(expanded.model, feeds)[0], run(model, feeds)[0])


def test_table_bytes_stay_as_they_were():
    for kwargs in ({}, {"data": "int4", "zero_points": False}):
        model = gbq_model(**kwargs, rows=64, D=256)
        expanded = expand_model(model, GATHER_BLOCK_QUANTIZED, np.random.default_rng(0)).model
        size = {t.name.rsplit("/", 1)[-1]: len(t.raw_data) for t in expanded.graph.initializer}
        original = {t.name: len(t.raw_data) for t in model.graph.initializer}
        assert size.get("data", size.get("data_bytes")) == original["data"]
        assert sum(size.values()) <= 1.1 * sum(original.values())


def _parse(model: onnx.ModelProto):
    ir_model = ir.serde.deserialize_model(model)
    opset = ir_model.opset_imports[""]
    return GATHER_BLOCK_QUANTIZED.parse(next(iter(ir_model.graph)), OpContext(opset=opset, container=ir_model.graph))


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        ({"quantize_axis": 0}, "only gather_axis=0"),
        ({"gather_axis": 1, "middle": (3,)}, "only gather_axis=0"),
        ({"bits": 3}, "bits=3"),
        ({"block_size": 8}, "block_size=8"),
        ({"data": "int4", "constant": False, "opset": 20}, "below opset 21"),
    ],
)
def test_refusals(kwargs, reason):
    with pytest.raises(GqaDecomposeError, match=reason):
        _parse(gbq_model(**kwargs) if kwargs.get("bits") != 3 else _with_bits(gbq_model(), 3))


def _with_bits(model: onnx.ModelProto, bits: int) -> onnx.ModelProto:
    next(a for a in model.graph.node[0].attribute if a.name == "bits").i = bits
    return model
