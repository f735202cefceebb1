"""QuickGelu, FastGelu, BiasGelu, contrib Gelu and BiasAdd against ORT CPU (BiasAdd, without a CPU kernel, against numpy)."""

from __future__ import annotations

import pytest

from tests.ops_cases import FLOAT, FLOAT16, expand, node_model, op_types, verify

SHAPE = [2, 3, 16]


def _model(op_type, dtype, inputs, attributes=None, opset=22):
    shapes = {"x": SHAPE, "bias": [16], "skip": SHAPE}
    specs = [(name, dtype, shapes[name]) for name in inputs]
    return node_model("com.microsoft", op_type, specs, [("y", dtype, SHAPE)], attributes, opset)


CASES = [
    ("QuickGelu", ["x"], None),
    ("QuickGelu", ["x"], {"alpha": 1.0}),
    ("Gelu", ["x"], None),
    ("BiasGelu", ["x", "bias"], None),
    ("FastGelu", ["x"], None),
    ("FastGelu", ["x", "bias"], None),
    ("BiasAdd", ["x", "bias", "skip"], None),
]


@pytest.mark.parametrize("opset", [18, 20, 22])
@pytest.mark.parametrize("dtype", [FLOAT, FLOAT16])
@pytest.mark.parametrize("op_type,inputs,attributes", CASES)
def test_activation_matches_ort(op_type, inputs, attributes, dtype, opset):
    verify(_model(op_type, dtype, inputs, attributes, opset))


def test_gelus_lower_to_gelu_20_from_opset_20():
    assert "Gelu" in op_types(expand(_model("FastGelu", FLOAT, ["x"], opset=20)))
    assert "Gelu" not in op_types(expand(_model("FastGelu", FLOAT, ["x"], opset=18)))
