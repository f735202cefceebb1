"""Model-level verification (gqa_decompose.verify_model): every committed model, prompt + decode steps, batch 1
and 2, in the cache layout it is deployed with; and what makes the comparison fail or refuse.

Fixtures are globbed (``models/*/model.onnx``, ``models/*.onnx``), so new ones are picked up without editing
this file. Run with ``-s`` to see each fixture's errors.
"""

from __future__ import annotations

import functools
import pathlib

import numpy as np
import onnx
import pytest
from gqa_models import GqaConfig, make_gqa_model
from onnx import helper
from test_cli import scale_attention_by

import gqa_decompose
import gqa_decompose.expansion.gqa
from gqa_decompose import model_io
from gqa_decompose.verify_model import MODEL_TOLERANCES, verify_model
from tests.conftest import has_gqa

MODELS = pathlib.Path(__file__).resolve().parent.parent / "models"
# A README run leaves models/*.decomposed.onnx behind (git-ignored): not a fixture.
FIXTURES = sorted(
    p for p in [*MODELS.glob("*/model.onnx"), *MODELS.glob("*.onnx")] if not p.name.endswith(".decomposed.onnx")
)
# Fixtures the package cannot rewrite yet (strict: the mark must come off when it can), by folder.
KNOWN_FAILURES: dict[str, str] = {}  # fixture id -> why it fails today (strict xfail)
TINY_LLAMA = MODELS / "tiny-llama-gqa.onnx"
BUILDER = MODELS / "builder-tiny-llama" / "model.onnx"


def _id(path: pathlib.Path) -> str:
    return path.parent.name if path.name == "model.onnx" else path.stem


@functools.cache
def _decomposed(path: pathlib.Path, static: bool) -> onnx.ModelProto:
    return gqa_decompose.decompose(onnx.load(path), static_kv_cache=static)


def _run(path: pathlib.Path, **kwargs):
    """verify_model with the default options (the CLI's --kv-cache auto, whatever sits beside ``path``)."""
    return verify_model(path, _decomposed(path, False), **kwargs)


def _assert_passed(result, batch: int, steps: int) -> None:
    failures = [(s.step, s.failure, [o for o in s.outputs if not o.passed]) for s in result.steps if not s.passed]
    assert result.passed, (result.summary(), failures)
    assert result.skipped is None
    assert result.batch == batch
    assert len(result.steps) == steps + 1 and result.steps[0].kind == "prompt"
    cached = result.cache_layout != "no KV cache"  # without one (a BERT) each step runs the whole sequence
    assert all(s.query_length == 1 for s in result.steps[1:]) or not cached
    agree, compared = result.token_agreement
    assert compared == batch * (steps + 1) and agree == compared
    errors = result.max_errors()
    assert "logits" in errors and (any(name.startswith("present") for name in errors) or not cached)


def _with_known_failures(paths):
    return [
        pytest.param(p, marks=pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[_id(p)]))
        if _id(p) in KNOWN_FAILURES
        else p
        for p in paths
    ]


def _has_past(path: pathlib.Path) -> bool:
    return any(value.name.startswith("past") for value in onnx.load(path, load_external_data=False).graph.input)


def _ring_only(result) -> bool:
    return result.cache_layout == "windowed ring"


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("path", _with_known_failures(FIXTURES), ids=_id)
def test_every_fixture_matches_its_original_with_both_cache_forms_under_the_default_options(path, batch):
    """A prompt and four decode steps with a growing cache and with a static buffer, whatever genai_config.json
    says (the one it names comes first): the default output accepts both, as the original does."""
    result = _run(path, batch=batch)
    _assert_passed(result, batch, steps=4)
    layouts = [result.cache_layout, *(other.cache_layout for other in result.also)]
    kinds = {layout.split(" of ")[0].split(",")[0] for layout in layouts}
    if not has_gqa(path):  # MultiHeadAttention's caches grow by concatenation; an encoder (BERT) has none
        assert kinds == ({"growing cache"} if _has_past(path) else {"no KV cache"})
    else:
        expected_first = "static buffer" if model_io.genai_shares_kv_buffer(path) else "growing cache"
        assert result.cache_layout.startswith(expected_first) or _ring_only(result)
        if not _ring_only(result):
            assert kinds == {"growing cache", "static buffer"}
    for other in result.also:
        _assert_passed(other, batch, steps=4)
    for form in (result, *result.also):
        lengths = form.steps[0].total_lengths
        if batch == 2 and "windowed ring" not in form.cache_layout and form.cache_layout != "no KV cache":
            assert lengths[1] < lengths[0], "batch 2 must be right-padded"
    print(f"\n{_id(path)} batch {batch}: {result.summary()}")


def test_a_static_only_graph_fails_default_verification_beside_a_share_buffer_genai_config():
    """genai_config.json names a static buffer; verification with the default options (which promise every
    cache form) must still drive a growing cache, where a static-only rewrite crashes at the first prompt."""
    result = verify_model(BUILDER, _decomposed(BUILDER, True), steps=1)
    assert not result.passed
    assert result.cache_layout.startswith("static buffer") and all(s.passed for s in result.steps)
    (growing,) = result.also
    assert growing.cache_layout == "growing cache" and "ScatterND" in growing.steps[0].failure
    assert any(note.startswith("also driven (FAILED)") and "growing cache" in note for note in result.notes)


@pytest.mark.parametrize("static", [False, True], ids=["growing", "static"])
def test_phi3_matches_past_the_long_rope_switch_at_64_positions(static):
    path = MODELS / "builder-phi3" / "model.onnx"
    if not path.exists():
        pytest.skip("no builder-phi3 fixture")
    config = None if static else {}
    result = verify_model(
        path,
        _decomposed(path, static),
        genai_config=config,
        static_kv_cache=static,
        dims={"sequence_length": 70},
        steps=2,
    )
    _assert_passed(result, 2, steps=2)
    assert result.prompt_length == 70 and max(result.steps[-1].total_lengths) == 72


def test_a_wrong_expansion_fails_model_verification_on_logits_and_presents(monkeypatch):
    scale_attention_by(1.01, monkeypatch)
    result = verify_model(TINY_LLAMA)
    assert not result.passed
    assert all(not s.passed for s in result.steps)
    failed = {o.name for s in result.steps for o in s.outputs if not o.passed}
    assert "logits" in failed and "present.1.key" in failed
    assert "present.0.key" not in failed  # layer 0's keys do not depend on attention
    assert "MODEL VERIFICATION FAILED" in result.summary()


def _corrupted(model: onnx.ModelProto, where: str) -> onnx.ModelProto:
    """``model`` with 100 added to the logits and present.0.key wherever the attention mask is 0 (``where`` =
    "padding": rows ORT leaves undefined) or 1 ("tokens"). The mask is [B, T]; in a growing cache's prompt
    T = S and present has T rows, so the mask lines up with both."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    targets = {"logits": [2], "present.0.key": [1, 3]}  # Unsqueeze axes that line the mask up
    for node in model.graph.node:
        for i, name in enumerate(node.output):
            if name in targets:
                node.output[i] = f"{name}_clean"
    mask = "mask_as_float"
    model.graph.node.append(helper.make_node("Cast", ["attention_mask"], [mask], to=onnx.TensorProto.FLOAT))
    if where == "padding":
        model.graph.node.append(helper.make_node("Sub", ["one", mask], ["mask_selected"]))
    else:
        model.graph.node.append(helper.make_node("Identity", [mask], ["mask_selected"]))
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(1, np.float32), "one"))
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(100, np.float32), "hundred"))
    model.graph.node.append(helper.make_node("Mul", ["mask_selected", "hundred"], ["offset"]))
    for name, axes in targets.items():
        axes_name = f"{name}_axes"
        model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(axes, np.int64), axes_name))
        model.graph.node.append(helper.make_node("Unsqueeze", ["offset", axes_name], [f"{name}_offset"]))
        model.graph.node.append(helper.make_node("Add", [f"{name}_clean", f"{name}_offset"], [name]))
    return model


def test_errors_are_measured_on_the_rows_ort_defines_only():
    decomposed = _decomposed(TINY_LLAMA, False)
    # Garbage in the padded rows of the prompt (logits of padded queries, present rows >= t_b): still equal.
    # (The corruption lines the mask up with a growing cache's present only.)
    result = verify_model(TINY_LLAMA, _corrupted(decomposed, "padding"), batch=2, steps=0, cache_forms=["growing"])
    assert result.passed, result.summary()
    assert result.steps[0].total_lengths == (8, 6)
    # The same garbage in rows that hold tokens: caught in both outputs.
    result = verify_model(TINY_LLAMA, _corrupted(decomposed, "tokens"), batch=2, steps=0, cache_forms=["growing"])
    failed = {o.name for o in result.steps[0].outputs if not o.passed}
    assert failed == {"logits", "present.0.key"}


def test_fed_prompt_inputs_set_batch_and_prompt_length(tmp_path):
    feeds = {
        "input_ids": np.array([[1, 2, 3, 4, 5], [6, 7, 8, 0, 0], [9, 10, 0, 0, 0]], np.int64),
        "attention_mask": np.array([[1] * 5, [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], np.int64),
    }
    np.savez(tmp_path / "feeds.npz", **feeds)
    result = verify_model(TINY_LLAMA, feeds=tmp_path / "feeds.npz", steps=2)
    _assert_passed(result, 3, steps=2)
    assert result.prompt_length == 5
    assert result.steps[0].total_lengths == (5, 3, 2)
    assert result.steps[2].total_lengths == (7, 5, 4)


def test_feeding_an_input_the_model_does_not_have_is_refused():
    with pytest.raises(gqa_decompose.GqaDecomposeError, match="does not have: token_type_ids"):
        verify_model(TINY_LLAMA, feeds={"token_type_ids": np.zeros((2, 8), np.int64)})


def test_a_dim_binds_the_static_buffer_rows_and_the_prompt_length():
    result = _run(BUILDER, dims={"past_sequence_length": 24, "sequence_length": 5}, steps=3)
    _assert_passed(result, 2, steps=3)
    assert result.cache_layout == "static buffer of 24 rows"
    assert result.prompt_length == 5


def test_a_static_buffer_too_short_for_the_run_is_refused():
    with pytest.raises(gqa_decompose.GqaDecomposeError, match="cannot hold a prompt of 8 and 4 decode steps"):
        _run(BUILDER, dims={"past_sequence_length": 10})


def test_binding_the_past_length_of_a_growing_cache_is_refused():
    with pytest.raises(gqa_decompose.GqaDecomposeError, match="grows from empty"):
        verify_model(TINY_LLAMA, dims={"past_sequence_length": 10})


def _with_extra_input(model: onnx.ModelProto, dims) -> onnx.ModelProto:
    """The tiny llama plus an input the generation loop knows nothing about, added into the logits."""
    extra = helper.make_tensor_value_info("extra_bias", onnx.TensorProto.FLOAT, dims)
    model = onnx.ModelProto.FromString(model.SerializeToString())
    model.graph.input.append(extra)
    logits = model.graph.output[0].name
    for node in model.graph.node:
        for i, name in enumerate(node.output):
            if name == logits:
                node.output[i] = "logits_before_bias"
    model.graph.node.append(helper.make_node("Add", ["logits_before_bias", "extra_bias"], [logits]))
    return model


def test_an_input_with_an_unbound_symbolic_dim_must_be_bound_or_fed():
    model = _with_extra_input(onnx.load(TINY_LLAMA), ["vocab_slots"])
    with pytest.raises(gqa_decompose.GqaDecomposeError, match="--dim vocab_slots=N"):
        verify_model(model)
    result = verify_model(model, dims={"vocab_slots": 64}, steps=1)
    assert result.passed
    result = verify_model(model, feeds={"extra_bias": np.ones(64, np.float32)}, steps=1)
    assert result.passed


def test_an_original_that_onnx_runtime_rejects_is_a_one_line_error():
    bad_past = np.zeros((2, 3, 0, 16), np.float32)  # 3 KV heads where the node has 2
    with pytest.raises(gqa_decompose.GqaDecomposeError, match="fails on the original model at step 0"):
        verify_model(TINY_LLAMA, feeds={"past_key_values.0.key": bad_past})


def test_a_bfloat16_model_is_skipped_with_the_reason():
    model = make_gqa_model(GqaConfig(dtype="bfloat16"))
    result = verify_model(model)
    assert not result.passed and result.steps == ()
    assert "no bfloat16 GroupQueryAttention kernel" in result.skipped


def test_a_model_without_gqa_nor_companion_ops_is_skipped():
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    assert verify_model(model).skipped == "no GroupQueryAttention node nor companion-op node"


def test_tolerances_are_per_float_type():
    import onnx_ir as ir

    path = MODELS / "builder-llama-fp16" / "model.onnx"
    if not path.exists():
        pytest.skip("no fp16 fixture")
    assert _run(path, steps=1).tolerance == MODEL_TOLERANCES[ir.DataType.FLOAT16]
    assert _run(TINY_LLAMA, steps=1).tolerance == MODEL_TOLERANCES[ir.DataType.FLOAT]


def test_the_original_is_left_unmodified():
    import onnx_ir as ir

    model = ir.serde.deserialize_model(onnx.load(TINY_LLAMA))
    before = ir.serde.serialize_model(model).SerializeToString()
    verify_model(model, steps=1)
    assert ir.serde.serialize_model(model).SerializeToString() == before


def _with_qk_norm(model: onnx.ModelProto) -> onnx.ModelProto:
    """The tiny llama with q_norm_weight / k_norm_weight on every GQA node (head size 16)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    rng = np.random.default_rng(3)
    for index, node in enumerate(n for n in model.graph.node if n.op_type == "GroupQueryAttention"):
        names = [f"q_norm_{index}", f"k_norm_{index}"]
        for name in names:
            weight = (1 + 0.5 * rng.standard_normal(16)).astype(np.float32)
            model.graph.initializer.append(onnx.numpy_helper.from_array(weight, name))
        inputs = list(node.input) + [""] * (14 - len(node.input)) + names
        del node.input[:]
        node.input.extend(inputs)
    return model


@pytest.mark.parametrize(
    "path", [TINY_LLAMA, MODELS / "dynamo-tiny-llama" / "model.onnx"], ids=["packed QKV", "separate QKV"]
)
def test_q_k_norm_nodes_are_verified_against_ort_normalizing_the_heads_first(path, monkeypatch):
    # ORT CPU rejects q_norm_weight / k_norm_weight: the original runs with the norm moved out of the node.
    model = _with_qk_norm(onnx.load(path))
    result = verify_model(model, steps=2)
    assert result.passed, result.summary()
    assert any("q/k norm" in note for note in result.notes)
    # A wrong epsilon in the expansion is caught.
    import dataclasses

    import gqa_decompose.plan as plan_module  # where the rewrite parses its nodes

    parse = plan_module.parse_gqa_node

    def wrong_epsilon(node, options=None):
        return dataclasses.replace(parse(node, options), qk_norm_epsilon=0.5)

    monkeypatch.setattr(plan_module, "parse_gqa_node", wrong_epsilon)
    result = verify_model(model, steps=1)
    assert not result.passed
