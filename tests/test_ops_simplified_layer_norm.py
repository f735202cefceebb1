"""SimplifiedLayerNormalization (default domain and com.microsoft) and ORT's LayerNormalization-1 against ORT CPU."""

from __future__ import annotations

import pytest

from gqa_decompose.errors import GqaDecomposeError
from gqa_decompose.ops import lookup
from gqa_decompose.ops.base import OpContext
from tests.ops_cases import FLOAT, FLOAT16, expand, node_model, op_types, verify

SHAPES = [([2, 3, 16], -1, [16]), ([4, 32], -1, [32]), ([2, 3, 8], 1, [3, 8]), (["batch", "seq", 24], -1, [24])]


@pytest.mark.parametrize("domain", ["", "com.microsoft"])
@pytest.mark.parametrize("opset", [17, 22, 23])
@pytest.mark.parametrize("dtype", [FLOAT, FLOAT16])
@pytest.mark.parametrize("shape,axis,scale_shape", SHAPES)
@pytest.mark.parametrize("with_inv_std", [False, True])
def test_simplified_layer_norm_matches_ort(domain, opset, dtype, shape, axis, scale_shape, with_inv_std):
    outputs = [("y", dtype)] + ([("inv_std_var", FLOAT)] if with_inv_std else [])
    model = node_model(
        domain,
        "SimplifiedLayerNormalization",
        [("x", dtype, shape), ("scale", dtype, scale_shape)],
        outputs,
        {"axis": axis, "epsilon": 1e-6},
        opset,
    )
    verify(model)


def test_simplified_layer_norm_lowers_to_rms_normalization_at_opset_23_only():
    def model(opset):
        return node_model(
            "",
            "SimplifiedLayerNormalization",
            [("x", FLOAT, [2, 8]), ("scale", FLOAT, [8])],
            [("y", FLOAT)],
            opset=opset,
        )

    assert "RMSNormalization" in op_types(expand(model(23)))
    assert "RMSNormalization" not in op_types(expand(model(22)))


def test_simplified_layer_norm_with_fp32_input_and_fp16_scale_gives_fp16():
    model = node_model(
        "",
        "SimplifiedLayerNormalization",
        [("x", FLOAT, [2, 3, 8]), ("scale", FLOAT16, [8])],
        [("y", FLOAT16), ("inv_std_var", FLOAT)],
    )
    verify(model)


def test_simplified_layer_norm_refuses_a_positive_axis_of_unknown_rank():
    model = node_model(
        "", "SimplifiedLayerNormalization", [("x", FLOAT, None), ("scale", FLOAT, [8])], [("y", FLOAT)], {"axis": 1}
    )
    node = next(iter(model.graph))
    with pytest.raises(GqaDecomposeError, match="rank"):
        lookup("", "SimplifiedLayerNormalization").parse(node, OpContext(22))


@pytest.mark.parametrize("opset", [13, 16])
@pytest.mark.parametrize("dtype", [FLOAT, FLOAT16])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("outputs", [1, 3])
def test_contrib_layer_norm_below_opset_17_matches_ort(opset, dtype, with_bias, outputs):
    inputs = [("x", dtype, [2, 3, 16]), ("scale", dtype, [16])] + ([("bias", dtype, [16])] if with_bias else [])
    out = [("y", dtype), ("mean", FLOAT), ("inv_std", FLOAT)][:outputs]
    verify(node_model("", "LayerNormalization", inputs, out, {"epsilon": 1e-5}, opset))


def test_standard_layer_norm_at_opset_17_is_left_alone():
    model = node_model(
        "", "LayerNormalization", [("x", FLOAT, [2, 8]), ("scale", FLOAT, [8])], [("y", FLOAT)], opset=17
    )
    assert op_types(expand(model)) == {"LayerNormalization"}
