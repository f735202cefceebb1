"""Nodes ONNX Runtime runs that the rewrite once refused or broke (issue "Never narrower than the original").

* separate key/value whose sequence length the shapes do not tell (a symbolic dim
  named unlike the query's, or an unknown one): ORT decides at run time between 0
  (a KV-shared layer, §11) and S; so does the expansion;
* position_ids of rank 3 ((B, S, 1)), which ORT reads flat like (B, S);
* do_rotary=1 with a zero-width cos/sin table, which rotates nothing.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from gqa_models import GqaConfig, gqa_node, make_gqa_model
from onnx import TensorProto, helper

import gqa_decompose
from gqa_decompose.spec import DecomposeOptions, parse_gqa_node
from gqa_decompose.verify import NodeVerification, Phase, phases_for, verify_node_model


def _set_dim(model: onnx.ModelProto, names: tuple[str, ...], axis: int, dim: str | None) -> onnx.ModelProto:
    """Rename (or, with None, forget) dimension ``axis`` of the graph inputs ``names``."""
    for value in model.graph.input:
        if value.name in names:
            entry = value.type.tensor_type.shape.dim[axis]
            entry.Clear()
            if dim is not None:
                entry.dim_param = dim
    return model


def _assert_verifies(model: onnx.ModelProto, options: DecomposeOptions | None = None, phases=None) -> NodeVerification:
    _, node = gqa_node(model)
    opset = next(o.version for o in model.opset_import if o.domain == "")
    result = verify_node_model(node, opset, model.ir_version, options, phases=phases)
    assert result.skipped is None and result.refused is None, (result.skipped, result.refused)
    failures = [f"{r.phase.name}: {r.failure}" for r in result.results if not r.passed]
    assert result.results and not failures, failures
    return result


KEY_LENGTH_CASES = {
    "named": "kv_sequence",
    "unknown": None,
}
KEY_LENGTH_CONFIGS = {
    "plain": GqaConfig(),
    "rotary": GqaConfig(rotary="half", position_ids=True),
    "rotary_interleaved_window": GqaConfig(rotary="interleaved", local_window_size=2),
    "no_present": GqaConfig(rotary="half", present=False),
    "bias_softcap": GqaConfig(attention_bias="full", softcap=2.0),
    "qk_norm": GqaConfig(qk_norm="qk", rotary="half"),
    "int8_cache": GqaConfig(kv_quant="PER_TENSOR", rotary="half"),
    "fp16": GqaConfig(dtype="float16", rotary="half"),
    "opset24": GqaConfig(rotary="half", opset=24),
}


def _key_length_model(config: GqaConfig, dim: str | None) -> onnx.ModelProto:
    return _set_dim(make_gqa_model(config), ("key", "value"), 1, dim)


@pytest.mark.parametrize("dim", list(KEY_LENGTH_CASES))
@pytest.mark.parametrize("case", list(KEY_LENGTH_CONFIGS))
def test_key_length_decided_at_run_time(case, dim):
    model = _key_length_model(KEY_LENGTH_CONFIGS[case], KEY_LENGTH_CASES[dim])
    _, node = gqa_node(model)
    spec = parse_gqa_node(node)
    assert spec.kv_maybe_empty and not spec.kv_empty
    phases = phases_for(node, spec)
    assert any(p.kv_empty for p in phases) and any(not p.kv_empty for p in phases)
    _assert_verifies(model)


@pytest.mark.parametrize(
    "options",
    [
        DecomposeOptions(fast_paths=True),
        DecomposeOptions(runtime_profile="openvino"),
        DecomposeOptions(static_kv_cache=True),
        DecomposeOptions(growing_kv_cache=True),
        DecomposeOptions(target="attention"),
    ],
    ids=["fast_paths", "openvino", "static", "growing", "attention"],
)
def test_key_length_decided_at_run_time_with_options(options):
    config = GqaConfig(rotary="half", opset=24 if options.target == "attention" else 21)
    model = _key_length_model(config, "kv_sequence")
    _assert_verifies(model, options)


def test_key_length_without_past_is_the_query_length():
    """Without a past ORT requires Skv == S: nothing is decided at run time."""
    model = _key_length_model(GqaConfig(past=False, rotary="half"), "kv_sequence")
    _, node = gqa_node(model)
    assert not parse_gqa_node(node).kv_maybe_empty
    _assert_verifies(model)


def test_key_length_ragged_shared_decode_matches_ort():
    """A shared layer in decode reads each row's t_b past rows; ragged rows, bias columns and all."""
    model = _key_length_model(GqaConfig(rotary="half", attention_bias="full"), None)
    phases = [
        Phase("decode, static buffer, shared KV", 3, 1, 12, 9, (9, 2, 6), kv_empty=True),
        Phase("chunked prefill, static buffer, shared KV", 1, 3, 12, 7, (7,), kv_empty=True),
        Phase("first prompt, static buffer, shared KV", 2, 4, 9, 4, (4, 2), kv_empty=True),
        Phase("decode, static buffer", 3, 1, 12, 9, (9, 2, 6)),
    ]
    _assert_verifies(model, phases=phases)


@pytest.mark.parametrize("dims", [["batch", "sequence", 1], ["batch", "sequence", "one"], ["batch", "sequence", 1, 1]])
@pytest.mark.parametrize("rotary", ["half", "interleaved"])
def test_position_ids_of_higher_rank(dims, rotary):
    """ORT checks dim 0 == B and dim 1 >= S, and reads position_ids flat: (B, S, 1) is (B, S)."""
    model = make_gqa_model(GqaConfig(rotary=rotary, position_ids=True))
    for value in model.graph.input:
        if value.name == "position_ids":
            value.CopyFrom(helper.make_tensor_value_info("position_ids", TensorProto.INT64, dims))
    _assert_verifies(model)


@pytest.mark.parametrize("dims", [[], ["batch"]])
def test_position_ids_below_rank_2_stay_refused(dims):
    """A 0-D or 1-D position_ids aborts the ORT process (terminate called without an active exception)."""
    model = make_gqa_model(GqaConfig(rotary="half", position_ids=True))
    for value in model.graph.input:
        if value.name == "position_ids":
            value.CopyFrom(helper.make_tensor_value_info("position_ids", TensorProto.INT64, dims))
    with pytest.raises(gqa_decompose.GqaDecomposeError, match="position_ids must be at least 2-D"):
        gqa_decompose.decompose(model)


def _zero_width_rotary_model(opset: int, packed: bool) -> onnx.ModelProto:
    """do_rotary=1, head size 16, cos/sin of width 0 (partial rotary rounded down to nothing)."""
    model = make_gqa_model(GqaConfig(rotary="half", opset=opset, packed=packed, head_size=16))
    for tensor in model.graph.initializer:
        if tensor.name in ("cos_cache", "sin_cache"):
            tensor.CopyFrom(onnx.numpy_helper.from_array(np.zeros((64, 0), np.float32), tensor.name))
    return model


@pytest.mark.parametrize("opset", [21, 23, 24])
@pytest.mark.parametrize("target", ["primitives", "attention"])
@pytest.mark.parametrize("packed", [False, True])
def test_zero_width_rotary_is_identity(opset, target, packed):
    model = _zero_width_rotary_model(opset, packed)
    options = DecomposeOptions(target=target, raise_opset=True)
    _assert_verifies(model, options)
    rewritten = gqa_decompose.decompose(model, options=options)
    assert all(node.op_type != "RotaryEmbedding" for node in rewritten.graph.node)
    # It loads and runs on ORT (RotaryEmbedding-23 would reject the zero-width table at run time).
    ort.InferenceSession(rewritten.SerializeToString(), providers=["CPUExecutionProvider"])


def _clear_shapes(model: onnx.ModelProto, names: tuple[str, ...]) -> onnx.ModelProto:
    for value in model.graph.input:
        if value.name in names:
            value.type.tensor_type.ClearField("shape")
    return model


def test_key_and_value_without_shapes():
    """ORT checks key/value at run time; without shapes their length may be 0 or S."""
    model = _clear_shapes(make_gqa_model(GqaConfig(rotary="half")), ("key", "value"))
    _, node = gqa_node(model)
    assert parse_gqa_node(node).kv_maybe_empty
    _assert_verifies(model)


def test_past_without_shapes():
    _assert_verifies(_clear_shapes(make_gqa_model(GqaConfig(rotary="half")), ("past_key", "past_value")))


def _add_input(model: onnx.ModelProto, index: int, name: str, elem: int, dims) -> onnx.ModelProto:
    node = model.graph.node[0]
    while len(node.input) <= index:
        node.input.append("")
    node.input[index] = name
    model.graph.input.append(helper.make_tensor_value_info(name, elem, dims))
    return model


def test_scales_without_quantization_are_ignored():
    """ORT ignores k_scale / v_scale when the cache is not quantized."""
    model = make_gqa_model(GqaConfig(rotary="half"))
    _add_input(model, 12, "k_scale", TensorProto.FLOAT, [1])
    _add_input(model, 13, "v_scale", TensorProto.FLOAT, [1])
    _assert_verifies(model)


def test_qk_norm_epsilon_is_unused_without_norm_weights():
    _assert_verifies(make_gqa_model(GqaConfig(qk_norm_epsilon=0.0)))


def test_output_declared_with_another_width_is_kept():
    """ORT runs a node whose output is declared wider or narrower; nothing of the rewrite reads it back."""
    model = make_gqa_model(GqaConfig())
    output = model.graph.output[0]
    output.CopyFrom(helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", "sequence", 48]))
    _assert_verifies(model)
    rewritten = gqa_decompose.decompose(model)
    assert [d.dim_value or d.dim_param for d in rewritten.graph.output[0].type.tensor_type.shape.dim][2] == 48


@pytest.mark.parametrize("shape", [(32, 8, 2), (64, 8, 1)])
@pytest.mark.parametrize("target", ["primitives", "attention"])
def test_rotary_tables_of_rank_3_are_read_flat(shape, target):
    """ORT reads a cos/sin table of rank > 2 flat, in rows of shape[1] values."""
    model = make_gqa_model(GqaConfig(rotary="half", rotary_dim=16, position_ids=True, opset=23))
    rng = np.random.default_rng(5)
    for tensor in model.graph.initializer:
        if tensor.name in ("cos_cache", "sin_cache"):
            tensor.CopyFrom(onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), tensor.name))
    _assert_verifies(model, DecomposeOptions(target=target))


SYMBOLIC_HIDDEN_CONFIGS = {
    "key": GqaConfig(rotary="half"),  # H from key/value (Nkv*H) and past
    "packed": GqaConfig(packed=True, rotary="interleaved"),  # H from past only
    "packed_no_past": GqaConfig(packed=True, past=False, qk_norm="q"),  # H from q_norm_weight only
    "int4_cache": GqaConfig(kv_quant="PER_CHANNEL", kv_bits=4, head_size=32),  # past holds H/2 bytes
    "fp16_window": GqaConfig(dtype="float16", rotary="half", local_window_size=3),
}


@pytest.mark.parametrize("case", list(SYMBOLIC_HIDDEN_CONFIGS))
def test_symbolic_query_hidden_size_takes_the_head_size_from_another_input(case):
    """ORT reads H from the query at run time; a symbolic query hidden size is decomposed when a static head
    dimension of another input fixes H (issue 13: a refusal of a node ORT runs)."""
    config = SYMBOLIC_HIDDEN_CONFIGS[case]
    model = _set_dim(make_gqa_model(config), ("query",), 2, "hidden")
    if case == "packed_no_past":
        model = _set_dim(model, ("query",), 2, None)
    _, node = gqa_node(model)
    assert parse_gqa_node(node).head_size == config.head_size
    _assert_verifies(model)


def test_symbolic_query_hidden_size_without_any_static_head_dim_stays_refused():
    """Nothing static tells H (the expansion's reshapes, scale and rotary widths need it): refused, though ORT runs
    it (docs/refusals.md, "Refusals kept for another reason")."""
    model = _set_dim(make_gqa_model(GqaConfig(packed=True, rotary="half")), ("query",), 2, "hidden")
    model = _set_dim(model, ("past_key", "past_value"), 3, "head")
    feeds = {
        "query": np.random.default_rng(0).standard_normal((1, 2, 8 * 16), np.float32),
        "past_key": np.zeros((1, 2, 4, 16), np.float32),
        "past_value": np.zeros((1, 2, 4, 16), np.float32),
        "seqlens_k": np.array([5], np.int32),
        "total_sequence_length": np.array(6, np.int32),
    }
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})
    with pytest.raises(gqa_decompose.GqaDecomposeError, match="no other input has a static head dimension"):
        gqa_decompose.decompose(model)


def test_contradictory_static_head_dims_are_refused():
    model = _set_dim(make_gqa_model(GqaConfig()), ("query",), 2, "hidden")
    for value in model.graph.input:
        if value.name in ("past_key", "past_value"):
            value.type.tensor_type.shape.dim[3].dim_value = 24
    with pytest.raises(gqa_decompose.GqaDecomposeError, match="head size 16 from key != head size 24 from past_key"):
        gqa_decompose.decompose(model)
