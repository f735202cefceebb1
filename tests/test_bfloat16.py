"""bfloat16: ORT has no CPU kernel, so the oracle is its fp32 kernel on bf16 inputs and
the expansion runs on onnx.reference (ORT's CPU ops lack bf16 Pad/ScatterND)."""

from __future__ import annotations

import onnx
import pytest
from gqa_models import GqaConfig, all_nodes, make_gqa_model
from test_refusals import use_plain_concat_kv_update

import gqa_decompose
from gqa_decompose.verify import verify

CONFIGS = {
    "plain": GqaConfig(dtype="bfloat16"),
    "packed_rotary": GqaConfig(dtype="bfloat16", packed=True, rotary="half"),
    "features": GqaConfig(
        dtype="bfloat16", rotary="interleaved", head_sink=True, attention_bias="full", local_window_size=2
    ),
    "kv_empty_softcap": GqaConfig(dtype="bfloat16", kv_empty=True, softcap=1.0),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bfloat16_matches_the_fp32_kernel_at_bf16_precision(name):
    model = make_gqa_model(CONFIGS[name])
    decomposed = gqa_decompose.decompose(model)
    onnx.checker.check_model(decomposed, full_check=True)
    report = verify(model, decomposed)
    assert report.passed, [r.failure for r in report.nodes[0].results]
    assert len(report.nodes[0].results) >= 3


def test_bfloat16_is_computed_in_fp32():
    decomposed = gqa_decompose.decompose(make_gqa_model(GqaConfig(dtype="bfloat16")))
    nodes = list(all_nodes(decomposed.graph))
    producers = {o: n for n in nodes for o in n.output}
    softmaxes = [n for n in nodes if n.op_type == "Softmax"]
    # scores + mask bias in fp32 feed each softmax (one per attention path); no bf16 MatMul input.
    casts_to_float = [n for n in nodes if n.op_type == "Cast" and n.attribute[0].i == onnx.TensorProto.FLOAT]
    casts_to_bf16 = [n for n in nodes if n.op_type == "Cast" and n.attribute[0].i == onnx.TensorProto.BFLOAT16]
    assert softmaxes and all(producers[softmax.input[0]].op_type == "Add" for softmax in softmaxes)
    assert len(casts_to_float) >= 3 and len(casts_to_bf16) >= 1
    for matmul in (n for n in nodes if n.op_type == "MatMul"):
        assert all(
            producers[name].op_type != "Cast" or producers[name].attribute[0].i == onnx.TensorProto.FLOAT
            for name in matmul.input
            if name in producers
        )


def test_bfloat16_verification_catches_a_plain_concat_kv_update(monkeypatch):
    use_plain_concat_kv_update(monkeypatch)
    report = verify(make_gqa_model(GqaConfig(dtype="bfloat16")))
    assert not report.passed
