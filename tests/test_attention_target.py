"""The attention target: one standard Attention op per GQA node, verified against ORT CPU's fused GQA.

Same grids and rules as the primitive target (tests/test_grid.py, test_features.py,
quantized and windowed caches, cache promises), over a representative subset of the
foundation grid and every feature at least once, at opsets 23 and 24. Then what the
rewrite looks like, what falls back and what --strict-target refuses.
"""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from gqa_models import GqaConfig, make_gqa_model
from test_features import FEATURES, WINDOWED_CACHE
from test_grid import GRID, HEAD_RATIOS, assert_matches_ort
from test_quantized_cache import LAYOUTS, VARIANTS
from test_static_cache import CONFIGS as STATIC_CONFIGS
from test_static_cache import GROWING, _decode_feeds
from test_structure import MODELS

import gqa_decompose
from gqa_decompose import GqaDecomposeError
from gqa_decompose.cli import main
from gqa_decompose.spec import DecomposeOptions
from gqa_decompose.verify import Phase, verify

ATTENTION = DecomposeOptions(target="attention", strict_target=True)


def matches_ort_as_attention(config: GqaConfig, options: DecomposeOptions = ATTENTION, phases=None) -> None:
    """ORT's fused GQA against the attention-target rewrite; strict, so a fallback fails the test."""
    result = assert_matches_ort(config, phases, options)
    assert result.target == "attention" and result.fallback is None


def _ops(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


# Correctness: the same grids as the primitive target ------------------------------------------

# Every 7th cell of the foundation grid (288 cells): each ratio, head size, layout, rotary,
# dtype and static/symbolic choice appears; opsets 23 and 24 alternate.
GRID_SUBSET = [(cell, 23 + index % 2) for index, cell in enumerate(GRID[::7])]


@pytest.mark.parametrize(
    "cell,opset", GRID_SUBSET, ids=["-".join(str(p) for p in cell) + f"-opset{opset}" for cell, opset in GRID_SUBSET]
)
def test_grid_subset_matches_ort(cell, opset):
    ratio, head_size, packed, rotary, dtype, static_dims = cell
    heads, kv_heads = HEAD_RATIOS[ratio]
    config = GqaConfig(
        num_heads=heads,
        kv_num_heads=kv_heads,
        head_size=head_size,
        packed=packed,
        rotary=rotary,
        dtype=dtype,
        static_dims=static_dims,
        opset=opset,
    )
    matches_ort_as_attention(config)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("feature", list(FEATURES))
def test_every_feature_matches_ort(feature, dtype):
    matches_ort_as_attention(dataclasses.replace(FEATURES[feature], dtype=dtype, opset=24))


@pytest.mark.parametrize("feature", ["window2", "bias_full", "kv_empty", "qk_output_1", "head_sink", "causal_0"])
def test_features_with_static_dims_at_opset_23(feature):
    matches_ort_as_attention(dataclasses.replace(FEATURES[feature], static_dims=True, opset=23))


@pytest.mark.parametrize("feature", list(WINDOWED_CACHE))
def test_windowed_cache_matches_ort(feature):
    matches_ort_as_attention(dataclasses.replace(WINDOWED_CACHE[feature], opset=24))


@pytest.mark.parametrize(
    "variant,dtype",
    [
        ("plain", "float32"),
        ("packed_rotary", "float16"),
        ("interleaved", "float16"),
        ("window_bias", "float32"),
        ("kv_empty", "float32"),
        ("windowed_cache", "float32"),
        ("static_dims_sink", "float16"),
    ],
)
@pytest.mark.parametrize("bits,layout", LAYOUTS, ids=[f"int{b}-{q.lower()}" for b, q in LAYOUTS])
def test_quantized_cache_matches_ort(variant, dtype, bits, layout):
    config = dataclasses.replace(VARIANTS[variant], kv_quant=layout, kv_bits=bits, dtype=dtype, opset=24)
    result = assert_matches_ort(config, None, ATTENTION)
    assert result.target == "attention"
    for phase in result.results:  # present codes exact
        assert phase.max_errors.get("present_key", 0) == 0 and phase.max_errors.get("present_value", 0) == 0


@pytest.mark.parametrize("opset", [23, 24])
@pytest.mark.parametrize("name", list(STATIC_CONFIGS))
def test_static_kv_cache_matches_ort(name, opset):
    options = dataclasses.replace(ATTENTION, static_kv_cache=True)
    matches_ort_as_attention(dataclasses.replace(STATIC_CONFIGS[name], opset=opset), options)


@pytest.mark.parametrize("name", list(GROWING))
def test_growing_kv_cache_matches_ort(name):
    options = dataclasses.replace(ATTENTION, growing_kv_cache=True)
    matches_ort_as_attention(dataclasses.replace(GROWING[name], opset=24), options)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_ragged_batches(batch, dtype):
    lengths_prompt, lengths_decode = (6, 1, 4)[:batch], (9, 3, 6)[:batch]
    phases = [
        Phase("first prompt, growing cache", batch, 6, 0, 6, lengths_prompt),
        Phase("first prompt, static buffer", batch, 6, 12, 6, lengths_prompt),
        Phase("decode, growing cache", batch, 1, 8, 9, lengths_decode),
        Phase("decode, static buffer", batch, 1, 12, 9, lengths_decode),
    ]
    matches_ort_as_attention(GqaConfig(rotary="interleaved", dtype=dtype, opset=24), phases=phases)


@pytest.mark.parametrize("scale", [0.05, -0.3])
def test_scale_attribute_including_negative(scale):
    matches_ort_as_attention(GqaConfig(scale=scale, rotary="half", opset=24))


def test_native_precision_fp16_stays_close_to_ort():
    options = dataclasses.replace(ATTENTION, native_precision=True)
    config = GqaConfig(dtype="float16", rotary="half", head_sink=True, attention_bias="full", opset=24)
    matches_ort_as_attention(config, options)


def test_bfloat16_runs_on_the_reference_evaluator_and_matches_the_fp32_kernel():
    model = make_gqa_model(GqaConfig(dtype="bfloat16", rotary="half", opset=24))
    report = verify(model, target="attention", strict_target=True)
    assert report.passed, [r.failure for r in report.nodes[0].results]
    assert report.nodes[0].target == "attention"


# What the rewrite looks like ------------------------------------------------------------------


def test_one_attention_op_replaces_the_softmax_and_both_matmuls():
    ops = _ops(gqa_decompose.decompose(make_gqa_model(GqaConfig(rotary="half", opset=24)), target="attention"))
    assert ops.count("Attention") == 1
    assert not {"Softmax", "MatMul", "ScatterND"} & set(ops)
    assert ops.count("RotaryEmbedding") == 2 and ops.count("TensorScatter") == 2


def test_opset_23_writes_the_cache_with_scatter_nd_and_keeps_its_opset():
    decomposed = gqa_decompose.decompose(make_gqa_model(GqaConfig(rotary="half", opset=23)), target="attention")
    ops = _ops(decomposed)
    assert "TensorScatter" not in ops and "ScatterND" in ops and "Attention" in ops
    assert {o.domain: o.version for o in decomposed.opset_import}[""] == 23


@pytest.mark.parametrize(
    "config,options",
    [
        (GqaConfig(past=False, rotary="half", opset=24), {}),
        (GqaConfig(rotary="half", opset=24), {"growing_kv_cache": True}),
    ],
    ids=["no past", "growing cache"],
)
def test_causal_layers_without_a_mask_use_the_ops_own_is_causal(config, options):
    decomposed = gqa_decompose.decompose(make_gqa_model(config), target="attention", **options)
    attention = next(node for node in decomposed.graph.node if node.op_type == "Attention")
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in attention.attribute}
    assert attributes.get("is_causal") == 1
    assert len(attention.input) < 4 or attention.input[3] == ""  # no mask
    assert len(attention.input) == (6 if options else 3)


def test_the_growing_cache_promise_still_fails_loudly_when_broken():
    model = gqa_decompose.decompose(make_gqa_model(GqaConfig(opset=24)), target="attention", growing_kv_cache=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    session.run(None, _decode_feeds(6, [6, 6], 7))
    with pytest.raises(Exception, match="Reshape"):
        session.run(None, _decode_feeds(6, [6, 4], 7))


def test_a_head_sink_becomes_one_extra_zero_key_column_carrying_the_sink_logit():
    decomposed = gqa_decompose.decompose(make_gqa_model(GqaConfig(head_sink=True, opset=24)), target="attention")
    ops = _ops(decomposed)
    assert ops.count("Attention") == 1 and "Softmax" not in ops and "ConstantOfShape" in ops


def test_negative_scale_negates_the_query_and_passes_its_magnitude():
    decomposed = gqa_decompose.decompose(make_gqa_model(GqaConfig(scale=-0.3, opset=24)), target="attention")
    attention = next(node for node in decomposed.graph.node if node.op_type == "Attention")
    scale = next(a.f for a in attention.attribute if a.name == "scale")
    assert scale == pytest.approx(0.3) and "Neg" in _ops(decomposed)


# Fallback and refusal -------------------------------------------------------------------------


def test_below_opset_23_the_node_falls_back_to_primitives_and_says_why():
    model = onnx_ir_model(GqaConfig(opset=21))
    decomposed = gqa_decompose.rewrite(model, DecomposeOptions(target="attention"))
    assert decomposed[0].target == "primitives"
    assert "opset is 21" in decomposed[0].fallback and ">= 23" in decomposed[0].fallback
    ops = [node.op_type for node in model.graph]
    assert "Attention" not in ops and "Softmax" in ops
    assert model.opset_imports[""] == 21  # never raised


def test_below_opset_23_the_verify_report_names_the_fallback():
    report = verify(make_gqa_model(GqaConfig(opset=21)), target="attention")
    assert report.passed
    assert report.nodes[0].target == "primitives" and "opset" in report.nodes[0].fallback


def test_strict_target_refuses_a_node_that_would_fall_back():
    with pytest.raises(GqaDecomposeError, match="cannot target the Attention op: the model's opset is 21") as error:
        gqa_decompose.decompose(make_gqa_model(GqaConfig(opset=21)), target="attention", strict_target=True)
    assert error.value.node_name == "attn/GroupQueryAttention"


def test_an_unknown_target_is_refused():
    with pytest.raises(GqaDecomposeError, match="target must be one of"):
        DecomposeOptions(target="sdpa")


def test_the_primitive_target_is_unchanged_by_default():
    ops = _ops(gqa_decompose.decompose(make_gqa_model(GqaConfig(opset=24))))
    assert "Attention" not in ops and "Softmax" in ops


def onnx_ir_model(config: GqaConfig):
    import onnx_ir as ir

    return ir.serde.deserialize_model(make_gqa_model(config))


# Command line -----------------------------------------------------------------------------------


def test_cli_target_attention_says_what_each_node_became(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(make_gqa_model(GqaConfig(rotary="half", opset=24)), path)
    report_path = tmp_path / "r.json"
    result = CliRunner().invoke(main, [str(path), "-q", "--target", "attention", "--report", str(report_path)])
    assert result.exit_code == 0, result.output
    assert "(target attention); verified" in result.output
    import json

    node = json.loads(report_path.read_text())["nodes"][0]
    assert node["target"] == "attention" and node["fallback"] is None
    assert "Attention" in _ops(onnx.load(tmp_path / "m.decomposed.onnx"))


def test_cli_fallback_is_on_the_nodes_line_and_strict_target_exits_2(tmp_path):
    path = tmp_path / "m.onnx"
    shutil.copy(MODELS / "tiny-llama-gqa.onnx", path)  # opset 21
    result = CliRunner().invoke(main, [str(path), "-q", "--target", "attention"])
    assert result.exit_code == 0, result.output
    assert "(target primitives, fallback: the model's opset is 21" in result.output
    strict = CliRunner().invoke(main, [str(path), "-q", "--check", "--target", "attention", "--strict-target"])
    assert strict.exit_code == 1 and "REFUSED: cannot target the Attention op" in strict.output
    strict = CliRunner().invoke(main, [str(path), "-q", "--target", "attention", "--strict-target", "--no-verify"])
    assert strict.exit_code == 2 and "cannot target the Attention op" in strict.output


def test_the_rewritten_model_runs_a_prompt_and_decode_steps_like_the_fused_node():
    config = GqaConfig(rotary="half", local_window_size=3, opset=24)
    model = make_gqa_model(config)
    rewritten = gqa_decompose.decompose(model, target="attention")
    fused = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ours = ort.InferenceSession(rewritten.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    past = np.zeros((1, 2, 0, 16), np.float32)
    past_ours = past_fused = (past, past)
    length = 0
    for step, new in enumerate([5, 1, 1, 1]):
        length += new
        feeds = {
            "query": rng.standard_normal((1, new, 64)).astype(np.float32),
            "key": rng.standard_normal((1, new, 32)).astype(np.float32),
            "value": rng.standard_normal((1, new, 32)).astype(np.float32),
            "seqlens_k": np.array([length - 1], np.int32),
            "total_sequence_length": np.array(length, np.int32),
        }
        expected = fused.run(None, {**feeds, "past_key": past_fused[0], "past_value": past_fused[1]})
        got = ours.run(None, {**feeds, "past_key": past_ours[0], "past_value": past_ours[1]})
        np.testing.assert_allclose(got[0], expected[0], atol=1e-5, err_msg=f"step {step}")
        past_fused, past_ours = (expected[1], expected[2]), (got[1], got[2])


def test_verification_of_the_attention_target_catches_a_plain_concat_kv_update(monkeypatch):
    from test_refusals import use_plain_concat_kv_update

    use_plain_concat_kv_update(monkeypatch)
    report = verify(make_gqa_model(GqaConfig(opset=24)), target="attention")
    assert report.nodes[0].target == "attention"
    failing = {r.phase.name for r in report.nodes[0].results if not r.passed}
    assert "decode, growing cache" in failing and "first prompt, static buffer" in failing


def test_verification_of_the_attention_target_catches_a_lost_is_causal(monkeypatch):
    # The no-past path has no mask: causality is the op's is_causal alone.
    from gqa_decompose.expansion import gqa as expansion

    original = expansion.attention_op

    def without_causality(*args, **kwargs):
        return original(*args, **{**kwargs, "is_causal": False})

    monkeypatch.setattr(expansion, "attention_op", without_causality)
    report = verify(make_gqa_model(GqaConfig(past=False, opset=24)), target="attention")
    assert not report.passed


# Raising the opset (--raise-opset) ----------------------------------------------------------------


def _with_extra_node(config: GqaConfig, node: onnx.NodeProto, inputs, initializers=()) -> onnx.ModelProto:
    """The GQA model plus one unrelated node (its output becomes a graph output)."""
    model = make_gqa_model(config)
    model.graph.node.append(node)
    model.graph.input.extend(inputs)
    model.graph.initializer.extend(initializers)
    shape = [d.dim_value for d in inputs[0].type.tensor_type.shape.dim]  # y has x's shape
    model.graph.output.append(onnx.helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, shape))
    return model


@pytest.mark.parametrize("opset", [20, 21, 22])
def test_raise_opset_raises_20_to_22_to_23_when_no_op_changes_meaning(opset):
    model = make_gqa_model(GqaConfig(rotary="half", opset=opset))
    decomposed = gqa_decompose.decompose(model, target="attention", raise_opset=True)
    assert {o.domain: o.version for o in decomposed.opset_import}[""] == 23
    assert "Attention" in _ops(decomposed)
    report = verify(model, target="attention", raise_opset=True, strict_target=True)
    assert report.passed and report.nodes[0].target == "attention"


def test_raise_opset_refuses_a_model_whose_group_normalization_changes_meaning():
    from gqa_decompose.raise_opset import opset_raise_obstacle

    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, 3])
    weights = [onnx.numpy_helper.from_array(np.ones(2, np.float32), name) for name in ("gn_scale", "gn_bias")]
    node = onnx.helper.make_node("GroupNormalization", ["x", "gn_scale", "gn_bias"], ["y"], num_groups=2, name="gn")
    model = onnx_ir_model_from(_with_extra_node(GqaConfig(opset=20), node, [x], weights))
    assert opset_raise_obstacle(model) == "GroupNormalization-21 changed meaning (node 'gn')"
    assert opset_raise_obstacle(onnx_ir_model(GqaConfig(opset=20))) is None


def test_raise_opset_refuses_opsets_below_20():
    decomposed = gqa_decompose.rewrite(
        onnx_ir_model(GqaConfig(opset=19)), DecomposeOptions(target="attention", raise_opset=True)
    )
    assert decomposed[0].target == "primitives" and "below 20" in decomposed[0].fallback


def test_raise_opset_accepts_ort_only_ops_onnx_runtime_defines_once():
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    weight = onnx.numpy_helper.from_array(np.ones(4, np.float32), "norm_weight")
    node = onnx.helper.make_node("SimplifiedLayerNormalization", ["x", "norm_weight"], ["y"], name="norm")
    model = _with_extra_node(GqaConfig(opset=21), node, [x], [weight])
    decomposed = gqa_decompose.decompose(model, target="attention", raise_opset=True)
    assert {o.domain: o.version for o in decomposed.opset_import}[""] == 23


def test_without_raise_opset_the_fallback_reason_points_to_it():
    decomposed = gqa_decompose.rewrite(onnx_ir_model(GqaConfig(opset=22)), DecomposeOptions(target="attention"))
    assert "--raise-opset" in decomposed[0].fallback


def onnx_ir_model_from(model: onnx.ModelProto):
    import onnx_ir as ir

    return ir.serde.deserialize_model(model)


BUILDER_FIXTURES = sorted(p.parent.name for p in MODELS.glob("builder-*/model.onnx"))


@pytest.mark.parametrize("folder", BUILDER_FIXTURES)
def test_real_producer_models_generate_like_the_original_as_attention_ops(folder):
    """Each builder fixture (opset 20-22) raised to 23 with the default cache options: a prompt (right-padded
    rows where the cache allows) and decode steps, through model-level verification, with a growing cache and
    a static buffer."""
    from gqa_decompose.verify_model import verify_model

    path = MODELS / folder / "model.onnx"
    options = dict(target="attention", raise_opset=True, strict_target=True)
    original = onnx.load(path)
    rewritten = gqa_decompose.decompose(original, **options)
    assert _ops(rewritten).count("Attention") == sum(n.op_type == "GroupQueryAttention" for n in original.graph.node)
    result = verify_model(path, rewritten, steps=2, batch=2, **options)
    assert result.passed and result.skipped is None, result.summary()
    agree, compared = result.token_agreement
    assert compared and agree == compared


@pytest.mark.parametrize(
    "config",
    [
        GqaConfig(qk_norm="qk", rotary="half", opset=24),
        GqaConfig(qk_norm="qk", rotary="interleaved", packed=True, dtype="float16", opset=23),
        GqaConfig(qk_norm="qk", rotary="half", head_sink=True, local_window_size=3, opset=24),
    ],
    ids=["qk_norm", "qk_norm_packed_fp16", "qk_norm_sink_window"],
)
def test_qk_norm_then_rotary_embedding_op_matches_ort(config):
    matches_ort_as_attention(config)


def test_gqa_inside_if_branches_becomes_attention_ops():
    from test_structure import _run, _single_prompt_feeds, _wrap_in_if

    config = GqaConfig(past=False, rotary="half", present=False, local_window_size=2, opset=24)
    model = _wrap_in_if(make_gqa_model(config))
    decomposed = gqa_decompose.decompose(model, target="attention", strict_target=True)
    branches = [attr.g for attr in decomposed.graph.node[0].attribute]
    assert all([node.op_type for node in g.node].count("Attention") == 1 for g in branches)
    feeds = _single_prompt_feeds(config)
    for flag in (True, False):
        feeds["flag"] = np.array(flag)
        expected, got = _run(model, feeds)[0], _run(decomposed, feeds)[0]
        np.testing.assert_allclose(got[0], expected[0], atol=1e-5)
        np.testing.assert_allclose(got[1, :2], expected[1, :2], atol=1e-5)


def test_gqa_inside_a_model_local_function_becomes_an_attention_op():
    from test_structure import _run, _single_prompt_feeds, _wrap_in_function

    config = GqaConfig(past=False, present=False)
    model = _wrap_in_function(make_gqa_model(config), opset=24)
    decomposed_nodes = gqa_decompose.rewrite(onnx_ir_model_from(model), DecomposeOptions(target="attention"))
    assert decomposed_nodes[0].target == "attention" and decomposed_nodes[0].scope == "function local::Attention"
    decomposed = gqa_decompose.decompose(model, target="attention")
    feeds = _single_prompt_feeds(config)
    expected, got = _run(model, feeds)[0], _run(decomposed, feeds)[0]
    np.testing.assert_allclose(got[0], expected[0], atol=1e-5)


def test_raise_opset_raises_the_functions_import_with_the_models():
    from test_structure import _run, _single_prompt_feeds, _wrap_in_function

    config = GqaConfig(past=False, present=False)
    model = _wrap_in_function(make_gqa_model(config), opset=21)
    decomposed = gqa_decompose.decompose(model, target="attention", raise_opset=True, strict_target=True)
    assert {o.domain: o.version for o in decomposed.functions[0].opset_import}[""] == 23
    assert "Attention" in [node.op_type for node in decomposed.functions[0].node]
    feeds = _single_prompt_feeds(config)
    np.testing.assert_allclose(_run(decomposed, feeds)[0][0], _run(model, feeds)[0][0], atol=1e-5)


def test_a_model_without_gqa_keeps_its_opset_even_with_raise_opset():
    import onnx_ir as ir

    from gqa_decompose.passes import DecomposeGqaPass

    model = ir.serde.deserialize_model(make_gqa_model(GqaConfig(opset=21)))
    model.graph.remove(list(model.graph), safe=False)
    DecomposeGqaPass(DecomposeOptions(target="attention", raise_opset=True))(model)
    assert model.opset_imports[""] == 21


def test_check_and_the_rewrite_agree_on_a_function_with_its_own_opset():
    # The function imports opset 24 and the model 21: the node takes the function's opset
    # (an Attention op), in check() as in the rewrite; check() once read the model's (primitives).
    from test_structure import _wrap_in_function

    model = _wrap_in_function(make_gqa_model(GqaConfig(past=False, present=False)), opset=24)
    for opset in model.opset_import:
        if opset.domain == "":
            opset.version = 21
    decomposed = gqa_decompose.rewrite(onnx_ir_model_from(model), DecomposeOptions(target="attention"), check=False)
    gate = gqa_decompose.check(model, verify_mode="none", target="attention")
    assert [(n.target, n.fallback) for n in gate.nodes] == [(n.target, n.fallback) for n in decomposed]
    assert decomposed[0].target == "attention"


def test_verify_takes_a_function_nodes_own_opset_as_the_rewrite_does():
    from test_structure import _wrap_in_function

    model = _wrap_in_function(make_gqa_model(GqaConfig(past=False, present=False)), opset=24)
    for opset in model.opset_import:
        if opset.domain == "":
            opset.version = 21
    (result,) = gqa_decompose.verify(model, target="attention").nodes
    assert (result.target, result.fallback) == ("attention", None)
    assert result.passed
