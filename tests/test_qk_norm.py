"""q_norm_weight / k_norm_weight (semantics §16): per-head RMS norm of Q and K before rotary.

ORT's CPU kernel rejects the norm inputs, so the oracle (``verify.normalized_oracle_model``) is ORT
CPU running the same node without them, its Q/K heads first normalized by ORT's own RMS
normalization op (SimplifiedLayerNormalization). The expansion emits RMSNormalization from opset 23
and the same arithmetic from primitives below.
"""

from __future__ import annotations

import dataclasses
import itertools

import onnx
import pytest
from gqa_models import GqaConfig, make_gqa_model
from test_grid import assert_matches_ort

import gqa_decompose
from gqa_decompose import GqaDecomposeError
from gqa_decompose.verify import verify

GRID = list(
    itertools.product(
        ["q", "k", "qk"],
        ["off", "half", "interleaved"],
        [False, True],  # packed QKV
        ["float32", "float16"],
        [21, 24],  # primitives / RMSNormalization
    )
)


@pytest.mark.parametrize("norm,rotary,packed,dtype,opset", GRID, ids=["-".join(str(p) for p in cell) for cell in GRID])
def test_qk_norm_matches_ort_normalization_then_gqa(norm, rotary, packed, dtype, opset):
    assert_matches_ort(GqaConfig(qk_norm=norm, rotary=rotary, packed=packed, dtype=dtype, opset=opset))


COMBINATIONS = {
    "weights as graph inputs, epsilon 1e-3": GqaConfig(qk_norm="qk", qk_norm_constant=False, qk_norm_epsilon=1e-3),
    "static dims, partial rotary": GqaConfig(
        qk_norm="qk", static_dims=True, rotary="half", head_size=32, rotary_dim=16
    ),
    "head size 128, mqa": GqaConfig(qk_norm="qk", num_heads=4, kv_num_heads=1, head_size=128, rotary="half"),
    "opset 13": GqaConfig(qk_norm="qk", rotary="half", opset=13),
    "opset 17 packed": GqaConfig(qk_norm="qk", rotary="interleaved", packed=True, opset=17),
    "opset 23": GqaConfig(qk_norm="qk", rotary="half", opset=23),
    "window, softcap, sink": GqaConfig(qk_norm="qk", rotary="half", local_window_size=3, softcap=2.0, head_sink=True),
    "bias, position_ids": GqaConfig(qk_norm="qk", rotary="half", attention_bias="full", position_ids=True),
    "shared KV layer (k weight unused)": GqaConfig(qk_norm="qk", kv_empty=True),
    "no past": GqaConfig(qk_norm="qk", rotary="half", past=False),
    "int8 cache": GqaConfig(qk_norm="qk", rotary="half", kv_quant="PER_CHANNEL", kv_bits=8),
    "windowed cache": GqaConfig(
        qk_norm="qk", rotary="half", local_window_size=3, extra_attributes=(("sliding_window_cache", 1),)
    ),
}


@pytest.mark.parametrize("name", list(COMBINATIONS))
def test_qk_norm_with_other_features(name):
    assert_matches_ort(COMBINATIONS[name])


@pytest.mark.parametrize("opset,emits_rms_op", [(17, False), (21, False), (23, True), (24, True)])
def test_rms_normalization_op_only_where_the_opset_has_it(opset, emits_rms_op):
    model = make_gqa_model(GqaConfig(qk_norm="qk", rotary="half", opset=opset))
    decomposed = gqa_decompose.decompose(model)
    onnx.checker.check_model(decomposed, full_check=True)
    op_types = [node.op_type for node in decomposed.graph.node]
    assert op_types.count("RMSNormalization") == (2 if emits_rms_op else 0)
    assert ("ReduceMean" in op_types) != emits_rms_op


def test_norm_reads_the_raw_heads_before_rotary():
    decomposed = gqa_decompose.decompose(make_gqa_model(GqaConfig(qk_norm="qk", rotary="half", opset=24)))
    producers = {output: node for node in decomposed.graph.node for output in node.output}
    norms = [node for node in decomposed.graph.node if node.op_type == "RMSNormalization"]
    sources = {producers[norm.input[0]].op_type + ":" + producers[norm.input[0]].input[0] for norm in norms}
    assert sources == {"Reshape:query", "Reshape:key"}


def test_bfloat16_qk_norm_matches_the_fp32_oracle():
    model = make_gqa_model(GqaConfig(qk_norm="qk", rotary="half", dtype="bfloat16", opset=23))
    report = verify(model, gqa_decompose.decompose(model))
    assert report.passed, [r.failure for r in report.nodes[0].results]


@pytest.mark.parametrize(
    "dims,elem,message",
    [
        ([32], onnx.TensorProto.FLOAT, r"must have shape \(16,\)"),
        ([2, 8], onnx.TensorProto.FLOAT, "must have shape"),
        ([16], onnx.TensorProto.FLOAT16, "differs from query type"),
    ],
)
def test_malformed_norm_weight_is_refused(dims, elem, message):
    model = make_gqa_model(GqaConfig(qk_norm="q", qk_norm_constant=False))
    weight = next(i for i in model.graph.input if i.name == "q_norm_weight")
    weight.CopyFrom(onnx.helper.make_tensor_value_info("q_norm_weight", elem, dims))
    with pytest.raises(GqaDecomposeError, match=message):
        gqa_decompose.decompose(model)


def test_non_positive_epsilon_is_refused():
    with pytest.raises(GqaDecomposeError, match="qk_norm_epsilon must be > 0"):
        gqa_decompose.decompose(make_gqa_model(GqaConfig(qk_norm="q", qk_norm_epsilon=0.0)))


@pytest.mark.parametrize("sabotage", ["no norm", "wrong epsilon"])
def test_verification_catches_a_wrong_norm(monkeypatch, sabotage):
    import gqa_decompose.expansion.gqa as expansion

    real = expansion.rms_normalize_heads
    if sabotage == "no norm":
        monkeypatch.setattr(expansion, "rms_normalize_heads", lambda op, x, w, eps, dtype, norm_op=True: x)
    else:
        monkeypatch.setattr(
            expansion,
            "rms_normalize_heads",
            lambda op, x, w, eps, dtype, norm_op=True: real(op, x, w, eps * 1e5, dtype, norm_op),
        )
    config = dataclasses.replace(COMBINATIONS["weights as graph inputs, epsilon 1e-3"], rotary="half")
    assert not verify(make_gqa_model(config)).passed


@pytest.mark.parametrize("runtime", ["reference", "openvino"])
def test_fused_qk_norm_model_is_checked_on_another_runtime_against_ort_running_the_rewrite(runtime):
    """ORT CPU has no kernel for a fused q/k norm, so it cannot run builder-qwen3-webgpu's original: the runtime is
    compared with ORT running the rewrite (the oracle says so). On onnxruntime itself that would be vacuous."""
    import pathlib

    import onnx_ir as ir

    from gqa_decompose import runtimes
    from gqa_decompose.runtime_check import check_runtime

    if runtime not in runtimes.available_runtimes():
        pytest.skip(f"{runtime} is not installed")
    fixture = pathlib.Path(__file__).resolve().parent.parent / "models" / "builder-qwen3-webgpu" / "model.onnx"
    checked = check_runtime(ir.load(fixture), runtime, verify_nodes=False)
    assert checked.model.passed, checked.model.failure
    assert checked.model.oracle.startswith("the rewrite on ONNX Runtime CPU")
    on_ort = check_runtime(ir.load(fixture), "onnxruntime", verify_nodes=False)
    assert not on_ort.model.passed and "does not run on ONNX Runtime" in on_ort.model.failure
