"""--native-precision: fp16/bf16 attention computed in fp16/bf16, within a few ulps of ORT's fp32 kernel."""

from __future__ import annotations

import dataclasses

import onnx
import pytest
from gqa_models import GqaConfig, make_gqa_model

import gqa_decompose
from gqa_decompose.verify import verify

CONFIGS = {
    "rotary": GqaConfig(rotary="half"),
    "packed_sink_bias_softcap": GqaConfig(packed=True, head_sink=True, attention_bias="full", softcap=2.0),
    "window_qk_output": GqaConfig(local_window_size=2, qk_output=1, rotary="interleaved"),
    "int8_cache": GqaConfig(kv_quant="PER_TENSOR", kv_bits=8),
    "windowed_cache": GqaConfig(local_window_size=3, extra_attributes=(("sliding_window_cache", 1),)),
}


# bf16 runs on onnx.reference (slow): two cells are enough there.
CELLS = [(name, "float16") for name in CONFIGS] + [("rotary", "bfloat16"), ("packed_sink_bias_softcap", "bfloat16")]


@pytest.mark.parametrize("name,dtype", CELLS)
def test_native_precision_stays_close_to_ort(name, dtype):
    model = make_gqa_model(dataclasses.replace(CONFIGS[name], dtype=dtype))
    report = verify(model, native_precision=True)
    assert report.passed, [r.failure for r in report.nodes[0].results]


def test_native_precision_keeps_attention_in_fp16():
    model = make_gqa_model(GqaConfig(dtype="float16", rotary="half", head_sink=True))
    decomposed = gqa_decompose.decompose(model, native_precision=True)
    float_casts = [
        node
        for node in decomposed.graph.node
        if node.op_type == "Cast" and node.attribute[0].i == onnx.TensorProto.FLOAT
    ]
    assert not float_casts
    default = gqa_decompose.decompose(model)
    assert any(n.op_type == "Cast" and n.attribute[0].i == onnx.TensorProto.FLOAT for n in default.graph.node)
