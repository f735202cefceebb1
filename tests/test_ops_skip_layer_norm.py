"""SkipSimplifiedLayerNormalization and SkipLayerNormalization, every output, against ORT CPU."""

from __future__ import annotations

import pytest

from gqa_decompose.errors import GqaDecomposeError
from gqa_decompose.ops import lookup
from gqa_decompose.ops.base import OpContext
from tests.ops_cases import FLOAT, FLOAT16, node_model, verify

SHAPES = [
    ([2, 3, 16], [2, 3, 16]),
    ([2, 3, 16], [3, 16]),
    ([2, 3, 16], [1, 3, 16]),
    ([5, 32], [5, 32]),
    (["batch", "seq", 24], ["batch", "seq", 24]),
]
OUTPUT_SETS = [(0,), (0, 3), (0, 1, 2, 3), (0, 2)]


def _model(op_type, dtype, shape, skip_shape, bias, beta, outputs, opset):
    hidden = shape[-1]
    inputs = [("input", dtype, shape), ("skip", dtype, skip_shape), ("gamma", dtype, [hidden])]
    if op_type == "SkipLayerNormalization":
        inputs.append(("beta", dtype, [hidden]) if beta else None)
    if bias:
        inputs.append(("bias", dtype, [hidden]))
    names = [("output", dtype), ("mean", FLOAT), ("inv_std_var", FLOAT), ("input_skip_bias_sum", dtype)]
    out = [names[i] if i in outputs else None for i in range(max(outputs) + 1)]
    return node_model("com.microsoft", op_type, inputs, out, {"epsilon": 1e-6}, opset)


@pytest.mark.parametrize("opset", [16, 22, 23])
@pytest.mark.parametrize("dtype", [FLOAT, FLOAT16])
@pytest.mark.parametrize("shape,skip_shape", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("outputs", OUTPUT_SETS)
def test_skip_simplified_layer_norm_matches_ort(opset, dtype, shape, skip_shape, bias, outputs):
    verify(_model("SkipSimplifiedLayerNormalization", dtype, shape, skip_shape, bias, False, outputs, opset))


@pytest.mark.parametrize("opset", [16, 17, 23])
@pytest.mark.parametrize("dtype", [FLOAT, FLOAT16])
@pytest.mark.parametrize("shape,skip_shape", SHAPES[:3])
@pytest.mark.parametrize("bias,beta", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("outputs", OUTPUT_SETS)
def test_skip_layer_norm_matches_ort(opset, dtype, shape, skip_shape, bias, beta, outputs):
    verify(_model("SkipLayerNormalization", dtype, shape, skip_shape, bias, beta, outputs, opset))


def test_skip_norm_refuses_a_gamma_of_the_wrong_size():
    model = node_model(
        "com.microsoft",
        "SkipSimplifiedLayerNormalization",
        [("input", FLOAT, [2, 3, 16]), ("skip", FLOAT, [2, 3, 16]), ("gamma", FLOAT, [8])],
        [("output", FLOAT)],
    )
    with pytest.raises(GqaDecomposeError, match="gamma"):
        lookup("com.microsoft", "SkipSimplifiedLayerNormalization").parse(next(iter(model.graph)), OpContext(22))


def test_skip_norm_refuses_a_4d_input():
    model = node_model(
        "com.microsoft",
        "SkipLayerNormalization",
        [("input", FLOAT, [1, 2, 3, 16]), ("skip", FLOAT, [1, 2, 3, 16]), ("gamma", FLOAT, [16])],
        [("output", FLOAT)],
    )
    with pytest.raises(GqaDecomposeError, match="rank"):
        lookup("com.microsoft", "SkipLayerNormalization").parse(next(iter(model.graph)), OpContext(22))
