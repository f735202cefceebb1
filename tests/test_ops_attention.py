"""contrib Attention (packed QKV weights, past/present) -> MatMul + attention core: numeric against ORT CPU, refusals."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto

from gqa_decompose.errors import GqaDecomposeError
from gqa_decompose.ops.attention import ATTENTION
from gqa_decompose.ops.base import OpContext
from tests.op_harness import compare, one_node_model

B, N, H, DIN = 2, 4, 8, 24


def attention_model(
    S=3, P=0, Hv=H, bias=True, mask=None, attention_bias=False, dtype=np.float32, present=True, seed=0, **attributes
) -> onnx.ModelProto:
    """One Attention node: input [B, S, DIN], weights [DIN, 2*N*H + N*Hv], past [2, B, N, P, H]."""
    rng = np.random.default_rng(seed)
    T = P + S
    total = 2 * N * H + N * Hv
    mask_array = {
        None: None,
        1: np.zeros((B,), np.int32),
        "2B": np.zeros((2 * B,), np.int32),
        2: np.zeros((B, T), np.int32),
        3: np.zeros((B, S, T), np.int32),
    }[mask]
    inputs = [
        ("input", np.zeros((B, S, DIN), dtype)),
        ("weights", (rng.standard_normal((DIN, total)) * 0.3).astype(dtype)),
        ("bias", (rng.standard_normal(total) * 0.1).astype(dtype)) if bias else None,
        ("mask_index", mask_array) if mask else None,
        ("past", np.zeros((2, B, N, P, H), dtype)) if P else None,
        ("attention_bias", np.zeros((1, N, S, T), dtype)) if attention_bias else None,
    ]
    if Hv != H:
        attributes["qkv_hidden_sizes"] = [N * H, N * H, N * Hv]
    elem = TensorProto.FLOAT if dtype == np.float32 else TensorProto.FLOAT16
    outputs = [("out", elem, [B, S, N * Hv])]
    if present:
        outputs.append(("present", elem, [2, B, N, T, H]))
    return one_node_model("Attention", inputs, outputs, constants=["weights", "bias"], num_heads=N, **attributes)


CASES = {
    "plain": {},
    "no present": {"present": False},
    "past": {"P": 5},
    "past, decode, causal": {"P": 5, "S": 1, "unidirectional": 1},
    "causal prompt": {"S": 4, "unidirectional": 1},
    "2-D mask": {"mask": 2, "P": 2},
    "3-D mask": {"mask": 3, "P": 2},
    # The transformers optimizer's BERT form: EmbedLayerNormalization's row sums as end positions (0..3 here,
    # so a row with every column masked and one with none are drawn too).
    "1-D mask (end positions)": {"mask": 1},
    "1-D mask with past": {"mask": 1, "P": 2},
    "1-D mask, float-min filter value": {"mask": 1, "mask_filter_value": -3.4028234663852886e38},
    # [2B]: end positions, then start positions (columns before a row's start are masked too).
    "1-D mask of end and start positions": {"mask": "2B"},
    "1-D mask of end and start positions, past, causal": {"mask": "2B", "P": 2, "unidirectional": 1},
    "attention bias": {"attention_bias": True, "mask": 2},
    "scale": {"scale": 0.3},
    "value head size differs": {"Hv": 16, "present": False},
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_expansion_matches_ort(case):
    comparison = compare(ATTENTION, attention_model(**CASES[case]))
    assert max(comparison.max_errors) <= 2e-5


def _parse(model: onnx.ModelProto):
    ir_model = ir.serde.deserialize_model(model)
    return ATTENTION.parse(next(iter(ir_model.graph)), OpContext(opset=21, container=ir_model.graph))


@pytest.mark.parametrize(
    "attributes, reason",
    [
        ({"do_rotary": 1}, "do_rotary"),
        ({"past_present_share_buffer": 1}, "shared past"),
        ({"qkv_hidden_sizes": [32, 16, 16]}, "qkv_hidden_sizes"),
    ],
)
def test_refusals(attributes, reason):
    """(Parse only: ORT is never run on a refused node; without bias it would crash the process.)"""
    model = attention_model()
    node = model.graph.node[0]
    node.attribute.extend([onnx.helper.make_attribute(k, v) for k, v in attributes.items()])
    with pytest.raises(GqaDecomposeError, match=reason):
        _parse(model)


def test_attention_without_bias_is_refused():
    with pytest.raises(GqaDecomposeError, match="without bias"):
        _parse(attention_model(bias=False))


def test_a_1d_mask_whose_length_cannot_be_told_b_or_2b_is_refused():
    """ORT tells [B] end positions from [2B] end and start positions by the length alone: with a symbolic batch
    and a mask length that is neither the batch nor twice a static one, the rewrite cannot."""
    model = attention_model(mask=1)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    model.graph.input[1].type.tensor_type.shape.dim[0].dim_param = "mask_length"
    with pytest.raises(GqaDecomposeError, match=r"its length must be the input's batch"):
        _parse(model)
