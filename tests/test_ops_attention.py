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


def _symbolic_batch_model(mask_length, P=2, **attributes) -> onnx.ModelProto:
    """A 1-D mask_index of ``mask_length`` entries (a dim name or a size) beside a symbolic batch."""
    model = attention_model(mask=1, P=P, **attributes)
    graph = model.graph
    batch_dims = [graph.input[0].type.tensor_type.shape.dim[0], graph.output[0].type.tensor_type.shape.dim[0]]
    batch_dims += [graph.input[2].type.tensor_type.shape.dim[1], graph.output[1].type.tensor_type.shape.dim[1]]
    for dim in batch_dims:
        dim.dim_param = "batch"
    mask_dim = graph.input[1].type.tensor_type.shape.dim[0]
    if isinstance(mask_length, str):
        mask_dim.dim_param = mask_length
    else:
        mask_dim.dim_value = mask_length
    return model


def _feeds_at(batch: int, mask_length: int, S=3, P=2, seed=0) -> dict[str, np.ndarray]:
    """Random input and past for ``batch`` rows; end positions 1..T (then start positions 0..T-1, for 2B)."""
    rng = np.random.default_rng(seed)
    T = P + S
    ends = rng.integers(1, T + 1, batch)
    starts = rng.integers(0, T, batch)
    mask = (ends if mask_length == batch else np.concatenate([ends, starts])).astype(np.int32)
    return {
        "input": rng.standard_normal((batch, S, DIN)).astype(np.float32),
        "mask_index": mask,
        "past": rng.standard_normal((2, batch, N, P, H)).astype(np.float32),
    }


@pytest.mark.parametrize(
    "mask_length, attributes",
    [("mask_length", {}), ("mask_length", {"unidirectional": 1}), (4, {})],
    ids=["symbolic length", "symbolic length, causal", "static length 4"],
)
def test_a_1d_mask_beside_a_symbolic_batch_is_told_b_or_2b_at_run_time(mask_length, attributes):
    """ORT tells [B] end positions from [2B] end and start positions by the length at run time: one rewritten
    model gives ORT's answer for both (with start positions that mask columns: the [2B] reading matters)."""
    from tests.op_harness import assert_standard, expand_model, run

    model = _symbolic_batch_model(mask_length, **attributes)
    expanded = expand_model(model, ATTENTION, np.random.default_rng(0))
    assert expanded.spec.start_positions_at_run_time
    assert_standard(expanded.model)
    lengths = [(2, 2), (2, 4), (3, 3), (3, 6)] if isinstance(mask_length, str) else [(4, 4), (2, 4)]
    for batch, length in lengths:
        feeds = _feeds_at(batch, length)
        want, got = run(model, feeds), run(expanded.model, feeds)
        for index, (expected, have) in enumerate(zip(want, got, strict=True)):
            np.testing.assert_allclose(have, expected, atol=2e-5, rtol=1e-4, err_msg=f"B={batch}, [{length}], {index}")
    # The [2B] reading is not the [B] one on these feeds (starts mask columns), so the test can fail.
    feeds = _feeds_at(2, 4)
    as_ends_only = {**feeds, "mask_index": np.concatenate([feeds["mask_index"][:2], np.zeros(2, np.int32)])}
    assert np.abs(run(model, feeds)[0] - run(model, as_ends_only)[0]).max() > 1e-3


def test_a_1d_mask_of_the_batch_s_own_dim_is_decided_at_rewrite_time():
    spec = _parse(_symbolic_batch_model("batch"))
    assert spec.mask_is_end_positions and not spec.start_positions_at_run_time and spec.start_positions_at == 0


def test_a_static_1d_mask_neither_b_nor_2b_is_refused():
    model = attention_model(mask=1)
    model.graph.input[1].type.tensor_type.shape.dim[0].dim_value = 3
    with pytest.raises(GqaDecomposeError, match=r"mask_index of 3 entries: ORT wants the batch 2 or twice it"):
        _parse(model)


def test_per_node_verification_of_the_run_time_form_feeds_start_positions():
    """verify_ops: sample_feeds gives the [2B] form (the batch a symbol takes there), and it verifies."""
    from gqa_decompose.verify_ops import verify_ops

    model = ir.serde.deserialize_model(_symbolic_batch_model("mask_length"))
    (verdict,) = verify_ops(model)
    assert verdict.ok, verdict
