"""com.microsoft.RotaryEmbedding against ORT CPU: layouts, partial rotation, position forms, opsets around 23."""

from __future__ import annotations

import pytest

from gqa_decompose.errors import GqaDecomposeError
from gqa_decompose.ops import lookup
from gqa_decompose.ops.base import OpContext
from tests.ops_cases import FLOAT, FLOAT16, INT64, expand, node_model, op_types, verify

B, S, N, H, M = 2, 5, 3, 8, 32


def _model(dtype, four_d, rotary_dims, interleaved, positions, opset, scale=1.0, symbolic=False):
    seq = "seq" if symbolic else S
    x_shape = [B, N, seq, H] if four_d else [B, seq, N * H]
    half = (rotary_dims or H) // 2
    attributes = {"interleaved": interleaved, "scale": scale}
    if rotary_dims:
        attributes.update(rotary_embedding_dim=rotary_dims, num_heads=N)
    elif not four_d:
        attributes["num_heads"] = N
    position_shape = {"one": [1], "scalar": [], "per_token": [B, seq]}[positions]
    inputs = [
        ("x", dtype, x_shape),
        ("position_ids", INT64, position_shape),
        ("cos", dtype, [M, half]),
        ("sin", dtype, [M, half]),
    ]
    return node_model("com.microsoft", "RotaryEmbedding", inputs, [("y", dtype, x_shape)], attributes, opset)


@pytest.mark.parametrize("opset", [20, 22, 23])
@pytest.mark.parametrize("dtype", [FLOAT, FLOAT16])
@pytest.mark.parametrize("four_d", [False, True])
@pytest.mark.parametrize("rotary_dims", [0, 4])
@pytest.mark.parametrize("interleaved", [0, 1])
@pytest.mark.parametrize("positions", ["one", "scalar", "per_token"])
def test_rotary_embedding_matches_ort(opset, dtype, four_d, rotary_dims, interleaved, positions):
    for seed in range(2):
        verify(_model(dtype, four_d, rotary_dims, interleaved, positions, opset), seed)


def test_rotary_embedding_with_scale_and_a_symbolic_length_matches_ort():
    verify(_model(FLOAT, False, 0, 0, "per_token", 22, scale=2.0, symbolic=True))
    verify(_model(FLOAT, False, 4, 1, "one", 23, symbolic=True))


def test_rotary_embedding_lowers_to_the_standard_op_at_opset_23_only():
    assert "RotaryEmbedding" in op_types(expand(_model(FLOAT, False, 0, 0, "one", 23)))
    assert "RotaryEmbedding" not in op_types(expand(_model(FLOAT, False, 0, 0, "one", 22)))


def test_rotary_embedding_refuses_rotary_dims_without_num_heads():
    model = node_model(
        "com.microsoft",
        "RotaryEmbedding",
        [("x", FLOAT, [B, S, N * H]), ("p", INT64, [1]), ("cos", FLOAT, [M, 2]), ("sin", FLOAT, [M, 2])],
        [("y", FLOAT)],
        {"rotary_embedding_dim": 4},
    )
    with pytest.raises(GqaDecomposeError, match="num_heads"):
        lookup("com.microsoft", "RotaryEmbedding").parse(next(iter(model.graph)), OpContext(22))


@pytest.mark.parametrize("opset", [20, 23])
def test_caches_computed_in_the_graph_with_symbolic_rows_verify(opset):
    """torch dynamo's export computes cos/sin as Cos/Sin of a Range up to max(position_ids) + 1, so their row
    count is symbolic: per-node verification feeds tables of its own length (it refused: "rows must be static")."""
    inputs = [
        ("x", FLOAT, ["batch", "seq", N * H]),
        ("position_ids", INT64, ["batch", "seq"]),
        ("cos", FLOAT, ["rows", H // 2]),
        ("sin", FLOAT, ["rows", H // 2]),
    ]
    model = node_model("com.microsoft", "RotaryEmbedding", inputs, [("y", FLOAT, ["batch", "seq", N * H])], {}, opset)
    verify(model)
