"""QMoE (integer experts) -> dequantized experts + MoE's dense masked sum: numeric against ORT CPU, refusals."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto

from gqa_decompose.errors import GqaDecomposeError
from gqa_decompose.ops._blockwise import pack_np, unpack_np
from gqa_decompose.ops.base import OpContext
from gqa_decompose.ops.qmoe import QMOE
from tests.op_harness import compare, expand_model, one_node_model, run

E, H, I, K_CHOSEN, T = 4, 64, 32, 2, 6
SWIGLU = {
    "activation_type": "swiglu",
    "activation_alpha": 1.702,
    "activation_beta": 1.0,
    "swiglu_fusion": 1,
    "swiglu_limit": 7.0,
    "normalize_routing_weights": 1,
}


def _quantized(rng, rows, cols, bits, block_size, zero_points):
    """Weights as a quantizer leaves them: levels around the middle, scales ~ range / levels (|W| ~ 0.1)."""
    blocks = 1 if block_size == 0 else cols // block_size
    middle = 2 ** (bits - 1)
    levels = np.clip(np.rint(rng.normal(middle, middle / 3, (E, rows, cols))), 0, 2 * middle - 1)
    q = pack_np(levels.astype(np.uint8), bits)
    s = rng.random((E, rows) if block_size == 0 else (E, rows, blocks)) * 0.2 / middle + 0.05 / middle
    s = s.astype(np.float32)
    zp_shape = (E, -(-rows * bits // 8)) if block_size == 0 else (E, rows, -(-blocks * bits // 8))
    return q, s, rng.integers(0, 256, zp_shape, dtype=np.uint8) if zero_points else None


def dequantized(q, s, zp, bits, block_size, rows, cols):
    """numpy: [E, rows, cols] fp32 weights, ORT's layout read independently of the module."""
    values = unpack_np(q, bits).astype(np.float32)
    blocks, block = (1, cols) if block_size == 0 else (cols // block_size, block_size)
    if zp is None:
        zz = np.full((E, rows, blocks), 2 ** (bits - 1), np.float32)
    elif block_size == 0:
        zz = unpack_np(zp, bits)[:, :rows].astype(np.float32)[..., None]
    else:
        zz = unpack_np(zp, bits)[..., :blocks].astype(np.float32)
    ss = s[..., None] if block_size == 0 else s
    return ((values.reshape(E, rows, blocks, block) - zz[..., None]) * ss[..., None]).reshape(E, rows, cols)


def qmoe_models(bits=4, block_size=32, zero_points=False, dtype=np.float32, opset=21, seed=0, **attributes):
    """(QMoE model, the same MoE on the dequantized weights)."""
    rng = np.random.default_rng(seed)
    q1, s1, z1 = _quantized(rng, 2 * I, H, bits, block_size, zero_points)
    q2, s2, z2 = _quantized(rng, H, I, bits, block_size, zero_points)
    b1 = (rng.standard_normal((E, 2 * I)) * 0.1).astype(np.float32)
    b2 = (rng.standard_normal((E, H)) * 0.1).astype(np.float32)
    x, r = np.zeros((T, H), dtype), np.zeros((T, E), dtype)
    cast = lambda a: a.astype(dtype)
    inputs = [
        ("x", x),
        ("router", r),
        ("w1", q1),
        ("s1", cast(s1)),
        ("b1", cast(b1)),
        ("w2", q2),
        ("s2", cast(s2)),
        ("b2", cast(b2)),
        None,
        None,
        None,
        ("z1", z1) if zero_points else None,
        ("z2", z2) if zero_points else None,
    ]
    attributes = {**SWIGLU, "k": K_CHOSEN, "expert_weight_bits": bits, **attributes}
    if block_size:
        attributes["block_size"] = block_size
    elem = TensorProto.FLOAT if dtype == np.float32 else TensorProto.FLOAT16
    constants = ["w1", "s1", "b1", "w2", "s2", "b2", "z1", "z2"]
    qmoe = one_node_model("QMoE", inputs, [("y", elem, [T, H])], constants=constants, opset=opset, **attributes)
    w1 = dequantized(q1, cast(s1).astype(np.float32), z1, bits, block_size, 2 * I, H)
    w2 = dequantized(q2, cast(s2).astype(np.float32), z2, bits, block_size, H, I)
    moe_inputs = [
        ("x", x.astype(np.float32)),
        ("router", r.astype(np.float32)),
        ("w1", w1),
        ("b1", cast(b1).astype(np.float32)),
        ("w2", w2),
        ("b2", cast(b2).astype(np.float32)),
    ]
    moe = one_node_model(
        "MoE",
        moe_inputs,
        [("y", TensorProto.FLOAT, [T, H])],
        constants=["w1", "b1", "w2", "b2"],
        opset=opset,
        **{**SWIGLU, "k": K_CHOSEN},
    )
    return qmoe, moe


CASES = {
    "4 bits, block 32": ({}, "dq", 5e-6),
    "4 bits, block 32, zero points": ({"zero_points": True}, "dq", 5e-6),
    "4 bits per row": ({"block_size": 0}, "dq", 5e-6),
    "4 bits per row, zero points": ({"block_size": 0, "zero_points": True}, "dq", 5e-6),
    "8 bits per row": ({"bits": 8, "block_size": 0}, "dq", 5e-4),
    "4 bits, block 16, opset 18": ({"block_size": 16, "opset": 18, "zero_points": True}, "unpack", 5e-6),
    "weights_prepacked=0": ({"weights_prepacked": 0}, "dq", 5e-6),
    "fp16": ({"dtype": np.float16}, "dq", 1e-2),
    # ORT rounds activations to int8 here: the bound is its rounding (see test_..._dequantized_moe).
    "8 bits, block 32 (ORT: int8 activations)": ({"bits": 8}, "dq", None),
    "4 bits, accuracy_level 4 (ORT: int8 activations)": ({"accuracy_level": 4}, "dq", None),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_expansion_matches_ort(case):
    kwargs, form, bound = CASES[case]
    qmoe, _ = qmoe_models(**kwargs)
    comparison = compare(QMOE, qmoe)
    assert comparison.expanded.spec.fc1.form == form
    assert comparison.expanded.spec.int8_activations == (bound is None)
    if bound is not None:
        assert comparison.max_errors[0] <= bound * max(1.0, float(np.abs(comparison.expected[0]).max()))


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_expansion_equals_ort_moe_on_the_dequantized_weights(case):
    """The layout, read by an independent numpy dequantizer: exact to fp32 for every form, int8 ones included."""
    kwargs, _, _ = CASES[case]
    qmoe, moe = qmoe_models(**kwargs)
    rng = np.random.default_rng(5)
    x, r = rng.standard_normal((T, H)), rng.standard_normal((T, E))
    dtype = np.float16 if kwargs.get("dtype") == np.float16 else np.float32
    expanded = expand_model(qmoe, QMOE, rng).model
    got = run(expanded, {"x": x.astype(dtype), "router": r.astype(dtype)}, optimize=False)[0].astype(np.float32)
    want = run(moe, {"x": x.astype(dtype).astype(np.float32), "router": r.astype(dtype).astype(np.float32)})[0]
    atol = 1e-2 if dtype == np.float16 else 1e-5 * max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, atol=atol, rtol=1e-3 if dtype == np.float16 else 1e-5)


def test_dq_form_keeps_the_expert_bytes():
    qmoe, _ = qmoe_models(zero_points=True)
    expanded = expand_model(qmoe, QMOE, np.random.default_rng(0)).model
    size_in = sum(len(t.raw_data) for t in qmoe.graph.initializer)
    size_out = sum(len(t.raw_data) for t in expanded.graph.initializer)
    assert size_out <= size_in  # the zero points' row padding is gone
    assert {t.data_type for t in expanded.graph.initializer if "weight_EKN" in t.name} == {TensorProto.UINT4}


def _parse(model: onnx.ModelProto):
    ir_model = ir.serde.deserialize_model(model)
    return QMOE.parse(next(iter(ir_model.graph)), OpContext(opset=21, container=ir_model.graph))


@pytest.mark.parametrize(
    "attributes, reason",
    [
        ({"quant_type": "fp4"}, "quant_type='fp4'"),
        ({"weights_prepacked": 1}, "private layout"),
        ({"swiglu_fusion": 2}, "interleaved"),
        ({"expert_weight_bits": 3}, "bits 3/3"),
    ],
)
def test_refusals(attributes, reason):
    model, _ = qmoe_models()
    node = model.graph.node[0]
    for name, value in attributes.items():
        kept = [a for a in node.attribute if a.name != name]
        del node.attribute[:]
        node.attribute.extend([*kept, onnx.helper.make_attribute(name, value)])
    with pytest.raises(GqaDecomposeError, match=reason):
        _parse(model)


def test_exact_accuracy_levels_makes_ort_compute_4_bit_experts_in_fp32():
    """The exact oracle (--check --runtime X off ORT): a 4-bit QMoE at accuracy_level 4 set to 1 on ORT equals the
    expansion to fp32 rounding, as the level-0 forms do; at level 4 it does not."""
    from gqa_decompose import verify_core as core

    qmoe, _ = qmoe_models(accuracy_level=4)
    expanded = expand_model(qmoe, QMOE, np.random.default_rng(0)).model
    rng = np.random.default_rng(5)
    feeds = {
        "x": rng.standard_normal((T, H)).astype(np.float32),
        "router": rng.standard_normal((T, E)).astype(np.float32),
    }
    got = run(expanded, feeds, optimize=False)[0]
    model = ir.serde.deserialize_model(qmoe)
    assert core.exact_accuracy_levels(model) == 1
    exact = run(ir.serde.serialize_model(model), feeds)[0]
    rounded = run(qmoe, feeds)[0]
    scale = max(1.0, float(np.abs(exact).max()))
    assert np.abs(got - exact).max() <= 5e-6 * scale
    assert np.abs(got - rounded).max() > 1e-4 * scale
