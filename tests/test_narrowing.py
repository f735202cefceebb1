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
import onnx_ir as ir
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


def _runtime_head_model(config: GqaConfig, shapeless_query: bool = False) -> onnx.ModelProto:
    """``config``'s model with every head dimension symbolic (query, key/value hidden, past head): H is known
    only at run time. ``shapeless_query``: the query has no shape at all (ORT checks rank 3 at run time)."""
    model = _set_dim(make_gqa_model(config), ("query", "key", "value"), 2, "hidden")
    if config.past:
        model = _set_dim(model, ("past_key", "past_value"), 3, "head")
    if config.kv_quant == "PER_CHANNEL":
        model = _set_dim(model, ("k_scale", "v_scale"), 0, "scales")
    if config.qk_norm and not config.qk_norm_constant:
        model = _set_dim(model, ("q_norm_weight", "k_norm_weight"), 0, "head")
    if shapeless_query:
        model = _clear_shapes(model, ("query",))
    return model


RUNTIME_HEAD_CONFIGS = {
    "packed": GqaConfig(packed=True),
    "packed_rotary": GqaConfig(packed=True, rotary="half"),  # verified at H = 32: partial (R = 16)
    "packed_no_past": GqaConfig(packed=True, past=False, rotary="interleaved"),
    "separate_rotary_interleaved": GqaConfig(rotary="interleaved", position_ids=True),
    "separate_no_past": GqaConfig(past=False, rotary="half"),
    "fp16_softcap_window": GqaConfig(dtype="float16", rotary="half", local_window_size=3, softcap=2.0),
    "ratio_4_scale": GqaConfig(num_heads=8, kv_num_heads=2, scale=0.3, rotary="half"),
    "bias_sink": GqaConfig(attention_bias="full", head_sink=True),
    "qk_output": GqaConfig(qk_output=2, rotary="half"),
    "non_causal": GqaConfig(causal=0, past=False),
    "int8_per_channel": GqaConfig(kv_quant="PER_CHANNEL", rotary="half"),
    "int4_per_tensor": GqaConfig(kv_quant="PER_TENSOR", kv_bits=4, head_size=32),
    "sliding_window_cache": GqaConfig(
        local_window_size=4, extra_attributes=(("sliding_window_cache", 1),), sizes=(None, None, 6, None)
    ),
    "opset24_rotary": GqaConfig(rotary="half", opset=24),
    "qk_norm_inputs": GqaConfig(qk_norm="qk", qk_norm_constant=False, rotary="half"),
    "packed_qk_norm_inputs": GqaConfig(packed=True, qk_norm="qk", qk_norm_constant=False, rotary="interleaved"),
}


@pytest.mark.parametrize("case", list(RUNTIME_HEAD_CONFIGS))
def test_head_size_known_only_at_run_time(case):
    """Nothing static tells H: ORT reads it from the query at run time, and so does the expansion (issue 13)."""
    model = _runtime_head_model(RUNTIME_HEAD_CONFIGS[case])
    _, node = gqa_node(model)
    spec = parse_gqa_node(node)
    assert spec.head_size is None
    assert (spec.scale is None) == (RUNTIME_HEAD_CONFIGS[case].scale == 0.0)
    _assert_verifies(model)


@pytest.mark.parametrize(
    "options",
    [
        DecomposeOptions(fast_paths=True),
        DecomposeOptions(runtime_profile="openvino"),
        DecomposeOptions(static_kv_cache=True),
        DecomposeOptions(growing_kv_cache=True),
        DecomposeOptions(native_precision=True),
        DecomposeOptions(target="attention"),
    ],
    ids=["fast_paths", "openvino", "static", "growing", "native", "attention"],
)
@pytest.mark.parametrize("packed", [False, True])
def test_head_size_known_only_at_run_time_with_options(options, packed):
    dtype = "float16" if options.native_precision else "float32"
    config = GqaConfig(packed=packed, rotary="half", dtype=dtype, opset=24 if options.target == "attention" else 21)
    _assert_verifies(_runtime_head_model(config), options)


@pytest.mark.parametrize(
    "target,config",
    [
        ("primitives", GqaConfig(rotary="half", opset=24)),
        ("attention", GqaConfig(rotary="half", opset=24)),
        ("primitives", GqaConfig(rotary="interleaved")),
        ("primitives", GqaConfig(kv_quant="PER_CHANNEL", kv_bits=4, head_size=32, rotary="half")),
    ],
    ids=["primitives", "attention", "interleaved", "int4_per_channel"],
)
def test_head_size_and_key_length_both_at_run_time(target, config):
    """Separate key/value of unknown length (0 in a KV-shared step, or S) and a run-time H: the new rows'
    reshapes cannot use -1 (no elements), and ORT's ReshapeFusion makes [0, 0, <run-time>] a -1, so
    their copied dims come from their own shapes."""
    model = _set_dim(_runtime_head_model(config), ("key", "value"), 1, "kv_sequence")
    _, node = gqa_node(model)
    spec = parse_gqa_node(node)
    assert spec.head_size is None and spec.kv_maybe_empty
    _assert_verifies(model, DecomposeOptions(target=target))


@pytest.mark.parametrize("packed", [False, True])
def test_query_without_a_shape(packed):
    """ORT checks rank 3 at run time and fails on any other, so a shape-less query is (B, S, hidden)."""
    model = _clear_shapes(make_gqa_model(GqaConfig(packed=packed, rotary="half")), ("query",))
    _, node = gqa_node(model)
    assert parse_gqa_node(node).head_size == 16  # from past (and key/value)
    _assert_verifies(model)
    model = _runtime_head_model(GqaConfig(packed=packed, rotary="half"), shapeless_query=True)
    _, node = gqa_node(model)
    assert parse_gqa_node(node).head_size is None
    _assert_verifies(model)


def _phase_feeds(config: GqaConfig, head_size: int, batch: int, length: int, past=None, rng=None) -> dict:
    """Feeds of ``_runtime_head_model(config)`` for ``length`` new tokens after ``past`` (a growing cache)."""
    np_type = np.float16 if config.dtype == "float16" else np.float32
    n, nkv = config.num_heads, config.kv_num_heads
    past_length = 0 if past is None else past[0].shape[2]
    if past is None:
        past = tuple(np.zeros((batch, nkv, 0, head_size), np_type) for _ in range(2))
    hidden = (n + 2 * nkv) * head_size if config.packed else n * head_size
    feeds = {
        "query": rng.standard_normal((batch, length, hidden)).astype(np_type),
        "seqlens_k": np.full((batch,), past_length + length - 1, np.int32),
        "total_sequence_length": np.array(past_length + length, np.int32),
    }
    if not config.packed:
        for name in ("key", "value"):
            feeds[name] = rng.standard_normal((batch, length, nkv * head_size)).astype(np_type)
    if config.past:
        feeds["past_key"], feeds["past_value"] = past
    return feeds


def _run(session: ort.InferenceSession, feeds: dict) -> list[np.ndarray]:
    return session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("target", ["primitives", "attention"])
@pytest.mark.parametrize(
    "head_size,rotary", [(16, "half"), (32, "half"), (16, "interleaved"), (32, "interleaved"), (32, "off")]
)
def test_one_rewrite_runs_every_head_size_over_prompt_and_decode(dtype, packed, target, head_size, rotary):
    """The SAME rewritten model, fed a prompt and then decode steps, matches ORT's node for H = 16 (the cos/sin
    table's width 8 makes rotary full) and H = 32 (partial): one graph, H and the rotary split read at run time."""
    config = GqaConfig(packed=packed, rotary=rotary, dtype=dtype, opset=23, local_window_size=4)
    model = _runtime_head_model(config)
    rewritten = gqa_decompose.decompose(model, options=DecomposeOptions(target=target))
    assert not any(node.domain == "com.microsoft" for node in rewritten.graph.node)
    assert (target == "attention") == any(node.op_type == "Attention" for node in rewritten.graph.node)
    providers = ["CPUExecutionProvider"]
    original = ort.InferenceSession(model.SerializeToString(), providers=providers)
    decomposed = ort.InferenceSession(rewritten.SerializeToString(), providers=providers)
    tolerance = 2e-3 if dtype == "float16" else 1e-5
    rng = np.random.default_rng(head_size)
    past = None
    for length in (5, 1, 1):  # a prompt, two decode steps (ORT takes a chunk after a past only at batch 1)
        feeds = _phase_feeds(config, head_size, 2, length, past, rng)
        expected, got = _run(original, feeds), _run(decomposed, feeds)
        assert got[0].shape == expected[0].shape == (2, length, config.num_heads * head_size)
        for want, have in zip(expected, got):
            np.testing.assert_allclose(have.astype(np.float32), want.astype(np.float32), atol=tolerance, rtol=tolerance)
        past = (expected[1], expected[2])


@pytest.mark.parametrize(
    "config,options,key_length",
    [
        (GqaConfig(packed=True, rotary="half"), DecomposeOptions(), None),
        (GqaConfig(rotary="interleaved", local_window_size=3, dtype="float16"), DecomposeOptions(), None),
        (GqaConfig(rotary="half", opset=24), DecomposeOptions(target="attention"), None),
        (GqaConfig(rotary="half", kv_quant="PER_CHANNEL", kv_bits=4, head_size=32), DecomposeOptions(), "kv"),
    ],
    ids=["packed", "separate_fp16_window", "attention", "int4_key_length_at_run_time"],
)
def test_run_time_head_size_rewrite_keeps_every_rank(config, options, key_length):
    """Shape inference of the rewrite knows the rank of every value it emits (only sizes are symbolic)."""
    model = _runtime_head_model(config)
    if key_length:
        model = _set_dim(model, ("key", "value"), 1, key_length)
    rewritten = onnx.shape_inference.infer_shapes(gqa_decompose.decompose(model, options=options), data_prop=True)
    typed = {v.name: v.type.tensor_type for v in [*rewritten.graph.value_info, *rewritten.graph.output]}
    unranked = [
        output
        for node in rewritten.graph.node
        for output in node.output
        if output and (output not in typed or not typed[output].HasField("shape"))
    ]
    assert not unranked, unranked
    assert [d.dim_param or d.dim_value for d in typed["output"].shape.dim][:2] == ["batch", "sequence"]


def test_contradictory_static_head_dims_are_refused():
    model = _set_dim(make_gqa_model(GqaConfig()), ("query",), 2, "hidden")
    for value in model.graph.input:
        if value.name in ("past_key", "past_value"):
            value.type.tensor_type.shape.dim[3].dim_value = 24
    with pytest.raises(gqa_decompose.GqaDecomposeError, match="head size 16 from key != head size 24 from past_key"):
        gqa_decompose.decompose(model)


@pytest.mark.parametrize("shapeless_query", [False, True])
def test_run_time_head_size_outputs_are_typed_with_their_ranks(shapeless_query):
    """Typing a GQA node (for what reads its outputs) knows the outputs' ranks though not their head dims."""
    from gqa_decompose.passes import InferGqaTypesPass

    model = _runtime_head_model(GqaConfig(packed=True), shapeless_query=shapeless_query)
    del model.graph.output[:]
    model.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in model.graph.node[0].output)
    typed = ir.serde.deserialize_model(model)
    InferGqaTypesPass()(typed)
    outputs = typed.graph.node(0).outputs
    assert [None if v.shape is None else len(v.shape) for v in outputs] == [3, 4, 4]
    assert [v.dtype for v in outputs] == [ir.DataType.FLOAT] * 3
    assert not isinstance(outputs[0].shape[2], int)
