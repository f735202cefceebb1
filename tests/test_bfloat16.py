"""bfloat16: ORT has no CPU kernel, so the oracle is its fp32 kernel on bf16 inputs and
the expansion runs on onnx.reference (ORT's CPU ops lack bf16 Pad/ScatterND)."""

from __future__ import annotations

import onnx
import pytest
from gqa_models import GqaConfig, make_gqa_model
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
    producers = {o: n for n in decomposed.graph.node for o in n.output}
    softmax = next(n for n in decomposed.graph.node if n.op_type == "Softmax")
    # scores + mask bias in fp32 feed the softmax; the scores come from a float MatMul.
    matmuls = [n for n in decomposed.graph.node if n.op_type == "MatMul"]
    casts_to_float = [n for n in decomposed.graph.node if n.op_type == "Cast" and n.attribute[0].i == onnx.TensorProto.FLOAT]
    assert producers[softmax.input[0]].op_type == "Add"
    assert len(matmuls) == 2 and len(casts_to_float) >= 3


def test_bfloat16_verification_catches_a_plain_concat_kv_update(monkeypatch):
    use_plain_concat_kv_update(monkeypatch)
    report = verify(make_gqa_model(GqaConfig(dtype="bfloat16")))
    assert not report.passed
