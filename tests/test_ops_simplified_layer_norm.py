"""SimplifiedLayerNormalization (default domain and com.microsoft) and ORT's LayerNormalization-1 against ORT CPU."""

from __future__ import annotations

import onnx_ir as ir
import pytest

import gqa_decompose
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


@pytest.mark.parametrize("profile", ["litert", "webnn"])
@pytest.mark.parametrize(
    "op_type,inputs",
    [
        ("SimplifiedLayerNormalization", [("x", FLOAT16, [2, 3, 8]), ("scale", FLOAT16, [8])]),
        (
            "SkipSimplifiedLayerNormalization",
            [("x", FLOAT, [2, 3, 8]), ("skip", FLOAT, [2, 3, 8]), ("gamma", FLOAT, [8])],
        ),
    ],
)
def test_profiles_without_rms_normalization_lower_rms_norms_to_primitives_at_opset_23(op_type, inputs, profile):
    """Neither LiteRT nor the WebNN EP has an RMSNormalization kernel: their profiles (OpContext.norm_by_primitives)
    normalize by primitives, exact against ORT CPU; the portable default uses the op."""
    from gqa_decompose.verify_ops import verify_op_node

    domain = "" if op_type == "SimplifiedLayerNormalization" else "com.microsoft"
    model = node_model(domain, op_type, inputs, [("y", inputs[0][1])], {"epsilon": 1e-6}, opset=23)
    node = next(iter(model.graph))
    result = verify_op_node(node, lookup(domain, op_type), 23, runtime_profile=profile)
    assert result.ok, result
    assert "RMSNormalization" in op_types(expand(model))
    decomposed = gqa_decompose.decompose(ir.serde.serialize_model(model), runtime_profile=profile, check=False)
    ops = {n.op_type for n in decomposed.graph.node}
    assert "RMSNormalization" not in ops and ops >= {"ReduceMean", "Sqrt"}
