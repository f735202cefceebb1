"""MoE -> TopK routing + dense masked sum over experts: numeric against ORT CPU, the gpt-oss fixtures, refusals."""

from __future__ import annotations

import pathlib

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto

from gqa_decompose.errors import GqaDecomposeError
from gqa_decompose.ops.base import OpContext
from gqa_decompose.ops.moe import MOE
from tests.op_harness import builder_feeds, compare, decompose_all, one_node_model, run
from tests.test_real_producers import _cache_shapes

MODELS = pathlib.Path(__file__).resolve().parent.parent / "models"


def moe_model(H=48, I=32, E=4, k=2, act="swiglu", bias=True, dtype=np.float32, tokens=(2, 3), seed=0, **attributes):
    """One MoE node with random experts (H != I, so a transposed layout would not fit)."""
    rng = np.random.default_rng(seed)
    F = 2 * I if act == "swiglu" else I
    inputs = [
        ("x", np.zeros((*tokens, H), dtype)),
        ("router", np.zeros((int(np.prod(tokens)), E), dtype)),
        ("fc1", (rng.standard_normal((E, F, H)) * 0.2).astype(dtype)),
        ("fc1_bias", (rng.standard_normal((E, F)) * 0.1).astype(dtype)) if bias else None,
        ("fc2", (rng.standard_normal((E, H, I)) * 0.2).astype(dtype)),
        ("fc2_bias", (rng.standard_normal((E, H)) * 0.1).astype(dtype)) if bias else None,
    ]
    if act == "swiglu":  # gpt-oss's attributes
        attributes = {
            "activation_alpha": 1.702,
            "activation_beta": 1.0,
            "swiglu_fusion": 1,
            "swiglu_limit": 7.0,
            "normalize_routing_weights": 1,
            **attributes,
        }
    elem = TensorProto.FLOAT if dtype == np.float32 else TensorProto.FLOAT16
    return one_node_model(
        "MoE",
        inputs,
        [("y", elem, [*tokens, H])],
        constants=["fc1", "fc1_bias", "fc2", "fc2_bias"],
        k=k,
        activation_type=act,
        **attributes,
    )


CASES = {
    "gpt-oss swiglu": {},
    "no biases": {"bias": False},
    "k=1": {"k": 1},
    "k=E": {"k": 4},
    "routing weights not normalized": {"normalize_routing_weights": 0},
    "swiglu without limit": {"swiglu_limit": None},
    "tight limit": {"swiglu_limit": 0.5},
    "relu": {"act": "relu"},
    "gelu": {"act": "gelu"},
    "silu": {"act": "silu"},
    "identity, k=3": {"act": "identity", "k": 3},
    "fp16": {"dtype": np.float16},
    "2-D input": {"tokens": (5,)},
    "8 experts": {"E": 8, "k": 3},
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_expansion_matches_ort(case):
    kwargs = dict(CASES[case])
    model = moe_model(**kwargs)
    if kwargs.get("swiglu_limit", 0) is None:  # make_node drops a None attribute: ORT's default (no limit)
        assert "swiglu_limit" not in [a.name for a in model.graph.node[0].attribute]
    comparison = compare(MOE, model)
    assert comparison.max_errors[0] <= (4e-3 if kwargs.get("dtype") == np.float16 else 5e-6)


def test_tied_router_logits_choose_the_higher_experts_as_ort_does():
    """Zero weights: each expert outputs its fc2 bias, so the output names the chosen expert."""
    model = moe_model(k=1, E=4)
    for tensor in model.graph.initializer:
        if tensor.name in ("fc1", "fc2"):
            tensor.CopyFrom(onnx.numpy_helper.from_array(np.zeros(tensor.dims, np.float32), tensor.name))
    fc2_bias = next(onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name == "fc2_bias")
    feeds = {"x": np.ones((2, 3, 48), np.float32), "router": np.zeros((6, 4), np.float32)}
    comparison = compare(MOE, model, feeds=feeds)
    np.testing.assert_array_equal(comparison.expected[0][0, 0], fc2_bias[3])
    assert comparison.max_errors == [0.0]


def test_weights_are_relaid_out_once_not_transposed_per_run():
    from tests.op_harness import expand_model

    expanded = expand_model(moe_model(), MOE, np.random.default_rng(0)).model
    assert not any(n.op_type == "Transpose" and n.input[0] in ("fc1", "fc2") for n in expanded.graph.node)
    sizes = sorted(len(t.raw_data) for t in expanded.graph.initializer)
    assert sizes == sorted(len(t.raw_data) for t in moe_model().graph.initializer)


@pytest.mark.parametrize("fixture", ["builder-gpt-oss", "builder-gpt-oss-fp16"])
def test_gpt_oss_fixture_logits_match_after_moe_decomposition(fixture):
    source = MODELS / fixture / "model.onnx"
    original = onnx.load(source)
    model = ir.load(source)
    assert decompose_all(model, MOE) == 2
    rewritten = ir.serde.serialize_model(model)
    assert not any(n.op_type == "MoE" for n in rewritten.graph.node)
    reference = np.load(MODELS / fixture / "reference.npz")
    feeds = builder_feeds(original, reference["input_ids"][0].tolist(), _cache_shapes(fixture))
    want, got = run(original, feeds)[0].astype(np.float32), run(rewritten, feeds)[0].astype(np.float32)
    atol = 2e-2 if "fp16" in fixture else 1e-4
    np.testing.assert_allclose(got, want, atol=atol, rtol=atol)
    np.testing.assert_allclose(got, reference["prefill_logits"], atol=10 * atol)  # and torch's logits


@pytest.mark.parametrize("fixture", ["builder-gpt-oss", "builder-gpt-oss-fp16"])
def test_gpt_oss_fixture_runs_on_openvino_once_decomposed(fixture):
    """OpenVINO 2026.4 turned the [1, T, H] x [E, H, F] MatMul into a FullyConnected that refused the broadcast
    ("Can not clone with new dims"); the tokens are repeated per expert first."""
    from gqa_decompose import runtimes
    from gqa_decompose.runtime_check import check_runtime

    if "openvino" not in runtimes.available_runtimes():
        pytest.skip("openvino is not installed")
    checked = check_runtime(ir.load(MODELS / fixture / "model.onnx"), "openvino", verify_nodes=False)
    assert checked.model.passed, checked.model.failure


def _parse(model: onnx.ModelProto):
    ir_model = ir.serde.deserialize_model(model)
    return MOE.parse(next(iter(ir_model.graph)), OpContext(opset=21, container=ir_model.graph))


@pytest.mark.parametrize(
    "attributes, reason",
    [
        ({"swiglu_fusion": 2}, "interleaved"),
        ({"use_sparse_mixer": 1}, "ignores it"),
        ({"k": 5}, "k=5"),
        ({"activation_type": "tanh"}, "activation_type='tanh'"),
    ],
)
def test_refusals(attributes, reason):
    model = moe_model()
    node = model.graph.node[0]
    for name, value in attributes.items():
        kept = [a for a in node.attribute if a.name != name]
        del node.attribute[:]
        node.attribute.extend([*kept, onnx.helper.make_attribute(name, value)])
    with pytest.raises(GqaDecomposeError, match=reason):
        _parse(model)
