"""MatMulNBits -> DequantizeLinear-21 + MatMul (or an exact unpack): numeric against ORT CPU, structure, refusals."""

from __future__ import annotations

import pathlib

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto

from gqa_decompose.errors import GqaDecomposeError
from gqa_decompose.ops.base import OpContext
from gqa_decompose.ops.matmul_nbits import MATMUL_NBITS
from tests.op_harness import (
    builder_feeds,
    compare,
    decompose_all,
    expand_model,
    one_node_model,
    run,
)

MODELS = pathlib.Path(__file__).resolve().parent.parent / "models"


def nbits_model(
    K=64,
    N=48,
    bits=4,
    block_size=32,
    zero_points="packed",
    g_idx=False,
    bias=False,
    accuracy_level=4,
    dtype=np.float32,
    opset=21,
    constant=True,
    seed=0,
) -> onnx.ModelProto:
    """One MatMulNBits node with random packed weights; A is [2, 3, K]."""
    rng = np.random.default_rng(seed)
    k_blocks = -(-K // block_size)
    inputs = [
        ("A", np.zeros((2, 3, K), dtype)),
        ("B", rng.integers(0, 256, (N, k_blocks, block_size * bits // 8), dtype=np.uint8)),
        ("scales", (rng.random((N, k_blocks)) * 0.02 + 0.005).astype(dtype)),
    ]
    if zero_points == "packed":
        inputs.append(("zp", rng.integers(0, 256, (N, -(-k_blocks * bits // 8)), dtype=np.uint8)))
    elif zero_points == "float":
        inputs.append(("zp", rng.uniform(0, 15, (N, k_blocks)).astype(dtype)))
    else:
        inputs.append(None)
    inputs.append(("g_idx", rng.permutation(np.arange(K) // block_size).astype(np.int32)) if g_idx else None)
    inputs.append(("bias", rng.standard_normal(N).astype(dtype)) if bias else None)
    elem = TensorProto.FLOAT if dtype == np.float32 else TensorProto.FLOAT16
    return one_node_model(
        "MatMulNBits",
        inputs,
        [("Y", elem, [2, 3, N])],
        constants=["B", "scales", "zp", "g_idx", "bias"] if constant else [],
        opset=opset,
        K=K,
        N=N,
        bits=bits,
        block_size=block_size,
        accuracy_level=accuracy_level,
    )


CASES = {
    "int4 packed zero points": ({}, "dq"),
    "int4 no zero points": ({"zero_points": "none"}, "dq"),
    "int8 packed zero points": ({"bits": 8}, "dq"),
    "int8 no zero points": ({"bits": 8, "zero_points": "none"}, "dq"),
    "K not a multiple of the block": ({"K": 80}, "dq"),
    "int8, K not a multiple of the block": ({"K": 80, "bits": 8, "zero_points": "none"}, "dq"),
    "odd N and zero point count": ({"N": 7, "K": 80}, "dq"),
    "bias": ({"bias": True}, "dq"),
    "block 16": ({"block_size": 16}, "dq"),
    "block 128": ({"block_size": 128, "K": 256}, "dq"),
    "fp16": ({"dtype": np.float16, "bias": True}, "dq"),
    "opset 18 int4": ({"opset": 18}, "unpack"),
    "opset 18 int8 no zero points": ({"opset": 18, "bits": 8, "zero_points": "none"}, "unpack"),
    "opset 18 fp16": ({"opset": 18, "dtype": np.float16}, "unpack"),
    "opset 13, K padded": ({"opset": 13, "K": 80, "bias": True}, "unpack"),
    "int2": ({"bits": 2}, "unpack"),
    "int2 no zero points, K padded": ({"bits": 2, "zero_points": "none", "K": 80}, "unpack"),
    "float zero points": ({"zero_points": "float"}, "unpack"),
    "fp16 float zero points": ({"zero_points": "float", "dtype": np.float16}, "unpack"),
    "g_idx": ({"g_idx": True, "zero_points": "none"}, "unpack"),
    "g_idx with float zero points": ({"g_idx": True, "zero_points": "float"}, "unpack"),
    "weights as graph inputs": ({"constant": False}, "unpack"),
    "accuracy level 0": ({"accuracy_level": 0}, "dq"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_expansion_matches_ort(case):
    kwargs, form = CASES[case]
    comparison = compare(MATMUL_NBITS, nbits_model(**kwargs))
    assert comparison.expanded.spec.form == form
    # The int8-exact feeds leave only fp32 summation order (and fp16's rounding of Y).
    assert comparison.max_errors[0] <= (2e-3 if kwargs.get("dtype") == np.float16 else 2e-5)


def test_expansion_is_the_exact_fp32_product_on_any_feeds():
    """accuracy_level 0 (fp32 in ORT) against the expansion that ORT may not re-fuse: standard-normal A."""
    for kwargs in ({"accuracy_level": 0}, {"accuracy_level": 0, "opset": 18}, {"accuracy_level": 0, "bits": 8}):
        model = nbits_model(**kwargs)
        feeds = {"A": np.random.default_rng(1).standard_normal((2, 3, 64)).astype(np.float32)}
        comparison = compare(MATMUL_NBITS, model, feeds=feeds, optimize=False)
        assert comparison.max_errors[0] < 2e-5, kwargs


def test_accuracy_level_4_rounds_activations_to_int8_per_block():
    """What the tolerance note in the module says: ORT's level-4 path differs from fp32 by int8 rounding of A."""
    model = nbits_model(accuracy_level=4)
    a = np.random.default_rng(2).standard_normal((2, 3, 64)).astype(np.float32)
    fp32 = run(expand_model(model, MATMUL_NBITS, np.random.default_rng(0)).model, {"A": a}, optimize=False)[0]
    int8 = run(model, {"A": a})[0]
    error = np.abs(fp32 - int8)
    # The bound: sum over blocks of max|a_block| / 254 * sum_k |W[n, k]| (|W| <= 15 * 0.025 here).
    blocks = np.abs(a).reshape(2, 3, 2, 32).max(-1)
    bound = (blocks / 254 * 32 * 15 * 0.025).sum(-1, keepdims=True)
    assert 1e-4 < error.max() and np.all(error <= bound)


def test_dq_form_keeps_the_weights_int4_with_the_same_bytes():
    model = nbits_model(K=256, N=64, block_size=32)
    expanded = expand_model(model, MATMUL_NBITS, np.random.default_rng(0)).model
    types = {t.name.rsplit("/", 1)[-1]: t.data_type for t in expanded.graph.initializer}
    assert types == {
        "weight_KpN": TensorProto.UINT4,
        "scale_KbN": TensorProto.FLOAT,
        "zero_point_KbN": TensorProto.UINT4,
    }
    size_in = sum(len(t.raw_data) for t in model.graph.initializer)
    size_out = sum(len(t.raw_data) for t in expanded.graph.initializer)
    assert size_out == size_in
    assert [n.op_type for n in expanded.graph.node] == ["DequantizeLinear", "MatMul"]


def test_no_zero_points_become_signed_int4_without_a_zero_point_tensor():
    expanded = expand_model(nbits_model(zero_points="none"), MATMUL_NBITS, np.random.default_rng(0)).model
    assert sorted(t.data_type for t in expanded.graph.initializer) == [TensorProto.FLOAT, TensorProto.INT4]


def test_unpack_form_uses_float_floors_and_keeps_the_original_initializers():
    for opset in (13, 18):
        expanded = expand_model(nbits_model(opset=opset), MATMUL_NBITS, np.random.default_rng(0)).model
        ops = {n.op_type for n in expanded.graph.node}
        assert "Floor" in ops and not ops & {"BitShift", "BitwiseAnd", "DequantizeLinear"}
        assert {t.name for t in expanded.graph.initializer} == {"B", "scales", "zp"}


def _parse(model: onnx.ModelProto):
    ir_model = ir.serde.deserialize_model(model)
    node = next(iter(ir_model.graph))
    return MATMUL_NBITS.parse(node, OpContext(opset=ir_model.opset_imports[""], container=ir_model.graph))


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        ({"bits": 3, "block_size": 32}, "bits=3"),
        ({"block_size": 8, "K": 64}, "block_size=8"),
        ({"g_idx": True}, "ignores those zero points"),
        ({"bits": 8, "zero_points": "float"}, "4 bits only"),
    ],
)
def test_refusals(kwargs, reason):
    if kwargs.get("bits") == 3:  # nbits_model cannot pack 3 bits; the attribute alone is refused
        model = nbits_model(bits=4)
        next(a for a in model.graph.node[0].attribute if a.name == "bits").i = 3
    else:
        model = nbits_model(**kwargs)
    with pytest.raises(GqaDecomposeError, match=reason):
        _parse(model)


def test_g_idx_with_uint8_zero_points_is_refused_because_ort_ignores_them():
    """The refusal's premise, measured: ORT's output equals zero points of 8, not the given ones."""
    model = nbits_model(g_idx=True, zero_points="packed", accuracy_level=0)
    as_if_8 = onnx.ModelProto()
    as_if_8.CopyFrom(model)
    as_if_8.graph.node[0].input[3] = ""  # no zero points: 8
    a = np.random.default_rng(3).standard_normal((2, 3, 64)).astype(np.float32)
    np.testing.assert_allclose(run(model, {"A": a})[0], run(as_if_8, {"A": a})[0], atol=1e-5)


# Symmetric int4 with block size 32, and asymmetric (packed uint4 zero points) with block size 16,
# both at accuracy_level 4.
@pytest.mark.parametrize("fixture", ["builder-llama-int4", "builder-llama-int4-zp"])
def test_builder_int4_fixture_keeps_its_size_and_its_logits(tmp_path, fixture):
    source = MODELS / fixture / "model.onnx"
    original = onnx.load(source)
    model = ir.load(source)
    assert decompose_all(model, MATMUL_NBITS) == 11
    ir.save(model, tmp_path / "model.onnx", external_data="model.onnx.data", size_threshold_bytes=0)
    onnx.save(
        onnx.load(source),
        tmp_path / "original.onnx",
        save_as_external_data=True,
        location="original.onnx.data",
        size_threshold=0,
    )
    size_in = (tmp_path / "original.onnx.data").stat().st_size
    size_out = (tmp_path / "model.onnx.data").stat().st_size
    assert size_out <= 1.1 * size_in, (size_in, size_out)
    rewritten = onnx.load(tmp_path / "model.onnx")
    assert not any(n.op_type == "MatMulNBits" for n in rewritten.graph.node)
    feeds = builder_feeds(original, [5, 17, 42, 3])
    want, got = run(original, feeds)[0], run(rewritten, feeds)[0]
    # Both sides run int8 activations on ORT (the rewritten DQ+MatMul fuses back at level 4).
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_ort_fuses_the_dq_form_back_into_its_matmul_nbits_kernel(tmp_path):
    """The [Kp, N] axis-0 layout is the one ORT's DequantizeLinear+MatMul fusion takes: no speed lost on ORT."""
    import onnxruntime as ort

    expanded = expand_model(nbits_model(K=256, N=64), MATMUL_NBITS, np.random.default_rng(0)).model
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(expanded.SerializeToString(), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(tmp_path / "optimized.onnx")
    assert [n.op_type for n in optimized.graph.node] == ["MatMulNBits"]


# Issue 16: both int4 fixtures hold MatMulNBits at accuracy_level 4, which ORT CPU runs on int8-rounded activations.
# A runtime computing the rewrite's DequantizeLinear + MatMul exactly is compared with the original at level 1.
INT4_FIXTURES = ["builder-llama-int4", "builder-llama-int4-zp"]


@pytest.mark.parametrize("fixture", INT4_FIXTURES)
def test_check_on_reference_passes_against_the_exact_oracle(fixture):
    from tests.test_cli import run

    code, out, err = run(MODELS / fixture / "model.onnx", "--check", "--runtime", "reference")
    assert code == 0, out + err
    assert "against the original on ONNX Runtime CPU with 11 MatMulNBits/QMoE node(s) at accuracy_level 1" in out


@pytest.mark.parametrize("runtime", ["reference", "openvino"])
@pytest.mark.parametrize("fixture", INT4_FIXTURES)
def test_whole_model_on_an_exact_runtime_matches_the_exact_oracle(fixture, runtime):
    from gqa_decompose import runtimes
    from gqa_decompose.runtime_check import check_runtime

    if runtime not in runtimes.available_runtimes():
        pytest.skip(f"{runtime} is not installed")
    checked = check_runtime(ir.load(MODELS / fixture / "model.onnx"), runtime, verify_nodes=False)
    assert checked.model.passed, checked.model.failure
    assert checked.model.max_error < 1e-5
    assert "accuracy_level 1" in checked.model.oracle


@pytest.mark.parametrize("fixture", INT4_FIXTURES)
def test_onnxruntime_keeps_the_original_as_its_oracle(fixture):
    """ORT fuses the rewrite back into MatMulNBits at its session's level 4: it matches the original unchanged."""
    from gqa_decompose.runtime_check import check_runtime

    checked = check_runtime(ir.load(MODELS / fixture / "model.onnx"), "onnxruntime", verify_nodes=False)
    assert checked.model.passed and checked.model.max_error < 1e-5
    assert checked.model.oracle == "ONNX Runtime CPU"


@pytest.mark.parametrize("fixture", INT4_FIXTURES)
def test_exact_accuracy_levels_changes_what_ort_computes_and_nothing_else(fixture):
    """The oracle's premise: ORT at the fixture's level 4 is 1e-2 away from level 1, and only attributes change."""
    from gqa_decompose import verify_core as core
    from gqa_decompose.runtime_check import _cache_dims, synthesize_prompt_feeds
    from gqa_decompose.spec import DecomposeOptions

    model = ir.load(MODELS / fixture / "model.onnx")
    levels = {n.attributes["accuracy_level"].value for n in model.graph if n.op_type == "MatMulNBits"}
    assert levels == {4}
    weights = {name: id(value.const_value) for name, value in model.graph.initializers.items()}
    before = ir.to_proto(model)
    feeds = synthesize_prompt_feeds(before, known_dims=_cache_dims(model, DecomposeOptions()))
    rounded = core.run_session(core.ort_session(before), feeds)["logits"]
    assert core.exact_accuracy_levels(model) == 11
    assert {name: id(value.const_value) for name, value in model.graph.initializers.items()} == weights
    exact = core.run_session(core.ort_session(model), feeds)["logits"]
    assert np.abs(exact - rounded).max() > 1e-2
    assert core.exact_accuracy_levels(model) == 0
