"""MultiHeadAttention (BSD Q/K/V, past/present, masks, bias) -> standard ops: numeric against ORT CPU, refusals."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto

from gqa_decompose.errors import GqaDecomposeError
from gqa_decompose.ops.base import OpContext
from gqa_decompose.ops.multi_head_attention import MULTI_HEAD_ATTENTION
from tests.op_harness import compare, one_node_model

B, N, H = 2, 4, 8


def mha_model(
    S=3, L=3, P=0, Hv=H, bias=False, padding=False, attention_bias=False, dtype=np.float32, presents=True, **attributes
) -> onnx.ModelProto:
    """One MultiHeadAttention node: query [B, S, N*H], key/value [B, L, ...], past [B, N, P, H]."""
    T = P + L
    zeros = lambda *shape: np.zeros(shape, dtype)
    inputs = [
        ("query", zeros(B, S, N * H)),
        ("key", zeros(B, L, N * H)),
        ("value", zeros(B, L, N * Hv)),
        ("bias", zeros(2 * N * H + N * Hv)) if bias else None,
        ("key_padding_mask", np.zeros((B, T), np.int32)) if padding else None,
        ("attention_bias", zeros(1, 1, S, T)) if attention_bias else None,
        ("past_key", zeros(B, N, P, H)) if P else None,
        ("past_value", zeros(B, N, P, Hv)) if P else None,
    ]
    elem = TensorProto.FLOAT if dtype == np.float32 else TensorProto.FLOAT16
    outputs = [("out", elem, [B, S, N * Hv])]
    if presents:
        outputs += [("present_key", elem, [B, N, T, H]), ("present_value", elem, [B, N, T, Hv])]
    return one_node_model("MultiHeadAttention", inputs, outputs, num_heads=N, **attributes)


CASES = {
    "plain": {},
    "no presents": {"presents": False},
    "bias": {"bias": True},
    "past": {"P": 5},
    "past, decode, causal": {"P": 5, "S": 1, "L": 1, "unidirectional": 1},
    "causal prompt": {"unidirectional": 1, "S": 4, "L": 4},
    "key padding mask": {"padding": True, "P": 2},
    "attention bias (the builder's causal add_qk)": {"attention_bias": True, "P": 2},
    "scale": {"scale": 0.3},
    "value head size differs": {"Hv": 16},
    "mask_filter_value": {"padding": True, "mask_filter_value": -1e9},
    "fp16 with past and attention bias": {"dtype": np.float16, "P": 4, "attention_bias": True},
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_expansion_matches_ort(case):
    kwargs = CASES[case]
    comparison = compare(MULTI_HEAD_ATTENTION, mha_model(**kwargs))
    bound = 2e-3 if kwargs.get("dtype") == np.float16 else 1e-5
    assert max(comparison.max_errors) <= bound
    assert len(comparison.got) == (3 if kwargs.get("presents", True) else 1)


def _parse(model: onnx.ModelProto):
    ir_model = ir.serde.deserialize_model(model)
    return MULTI_HEAD_ATTENTION.parse(next(iter(ir_model.graph)), OpContext(opset=21, container=ir_model.graph))


def test_refusals():
    packed = mha_model()
    packed.graph.node[0].input[1] = ""
    packed.graph.node[0].input[2] = ""
    with pytest.raises(GqaDecomposeError, match="packed"):
        _parse(packed)
    lengths = mha_model(padding=True)
    lengths.graph.input[3].type.tensor_type.shape.ClearField("dim")
    lengths.graph.input[3].type.tensor_type.shape.dim.add().dim_value = B
    with pytest.raises(GqaDecomposeError, match="2-D"):
        _parse(lengths)
    with pytest.raises(GqaDecomposeError, match="num_heads=3"):
        _parse(_with_heads(mha_model(), 3))


def _with_heads(model: onnx.ModelProto, heads: int) -> onnx.ModelProto:
    next(a for a in model.graph.node[0].attribute if a.name == "num_heads").i = heads
    return model
