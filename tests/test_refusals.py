"""What is refused, with the node's name and the feature, and never half-rewritten."""

from __future__ import annotations

import onnx
import pytest
from gqa_models import GqaConfig, gqa_node, make_gqa_model
from refusal_cases import CASES, ort_message
from test_cli import scale_attention_by

import gqa_decompose
from gqa_decompose import GqaDecomposeError
from gqa_decompose.verify import verify

NODE = "attn/GroupQueryAttention"


REFUSED = {
    "unknown attribute": (GqaConfig(extra_attributes=(("kv_share_buffer", 1),)), "unknown attribute"),
    "quantized cache without scales": (
        GqaConfig(
            extra_attributes=(("k_quant_type", "PER_TENSOR"), ("v_quant_type", "PER_TENSOR"), ("kv_cache_bit_width", 8))
        ),
        "k_scale' must be provided",
    ),
    "heads not divisible": (GqaConfig(num_heads=6, kv_num_heads=4), "not a multiple of kv_num_heads"),
    "qk_output out of range": (GqaConfig(extra_attributes=(("qk_output", 3),)), "qk_output must be 0, 1 or 2"),
    "causal with window": (GqaConfig(causal=0, local_window_size=2), "local_window_size must be -1 when causal is 0"),
    "causal out of range": (GqaConfig(causal=2), "causal must be 0 or 1"),
    "head size not multiple of 8": (GqaConfig(head_size=12), "multiple of 8"),
    "rotary head size not multiple of 16": (GqaConfig(head_size=24, rotary="half"), "multiple of 16"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_with_node_name_and_feature(case):
    config, message = REFUSED[case]
    model = make_gqa_model(config)
    with pytest.raises(GqaDecomposeError, match=message) as raised:
        gqa_decompose.decompose(model)
    assert raised.value.node_name == NODE
    assert NODE in str(raised.value)


def test_contradictory_head_counts_are_refused():
    model = make_gqa_model(GqaConfig())
    key = next(i for i in model.graph.input if i.name == "key")
    key.type.tensor_type.shape.dim[2].dim_value = 48  # kv_num_heads * head_size is 32
    with pytest.raises(GqaDecomposeError, match="contradictory head counts"):
        gqa_decompose.decompose(model)


def test_output_qk_read_with_qk_output_zero_is_refused():
    model = make_gqa_model(GqaConfig(qk_output=1))
    del model.graph.node[0].attribute[-1]  # drop qk_output; the output stays
    assert all(a.name != "qk_output" for a in model.graph.node[0].attribute)
    with pytest.raises(GqaDecomposeError, match="garbage"):
        gqa_decompose.decompose(model)


def test_one_present_output_without_the_other_is_refused():
    model = make_gqa_model(GqaConfig())
    model.graph.node[0].output[2] = ""
    del model.graph.output[2]
    with pytest.raises(GqaDecomposeError, match="both provided or both omitted"):
        gqa_decompose.decompose(model)


def test_refusal_of_a_later_node_leaves_the_model_untouched():
    ir_model, _ = gqa_node(make_gqa_model(GqaConfig()))
    bad, _ = gqa_node(make_gqa_model(GqaConfig(extra_attributes=(("foo", 1),))))
    # Two nodes in one graph: the first is fine, the second refused.
    ok_node = next(iter(ir_model.graph))
    bad_node = next(iter(bad.graph))
    bad.graph.remove(bad_node)
    bad_node.name = "second"
    for value in bad_node.outputs:
        value.name = "second_" + value.name
    ir_model.graph.append(bad_node)
    for index, value in enumerate(bad_node.inputs):
        if value is not None:
            bad_node.replace_input_with(index, ok_node.inputs[index])
    before = [node.op_type for node in ir_model.graph]
    with pytest.raises(GqaDecomposeError, match="second"):
        gqa_decompose.decompose(ir_model)
    assert [node.op_type for node in ir_model.graph] == before


def test_verification_catches_a_wrong_expansion(monkeypatch):
    """The verifier is only worth something if a wrong rewrite fails it."""
    scale_attention_by(1.01, monkeypatch)
    report = verify(make_gqa_model(GqaConfig()))
    assert not report.passed


def use_plain_concat_kv_update(monkeypatch) -> None:
    """Sabotage: append the new K/V after the past, as a naive rewrite would."""
    from gqa_decompose.expansion import gqa as expansion
    from gqa_decompose.expansion import kv_cache

    def concat_update(op, shared, info, past, new, *forms, **form_options):  # write_new_rows' signature
        return op.op("Concat", past, new, axis=2)

    monkeypatch.setattr(expansion, "write_new_rows", concat_update)
    monkeypatch.setattr(kv_cache, "write_new_rows", concat_update)
    monkeypatch.setattr(expansion, "present_length", lambda shared, info, past, static=False: info.total_length)


def test_verification_catches_a_plain_concat_kv_update(monkeypatch):
    """Concatenating new K/V after the past is wrong for ragged batches (semantics §3-4)."""
    use_plain_concat_kv_update(monkeypatch)
    report = verify(make_gqa_model(GqaConfig()))
    failing = {r.phase.name for r in report.nodes[0].results if not r.passed}
    assert "decode, growing cache" in failing  # ragged rows
    assert "first prompt, static buffer" in failing


@pytest.mark.parametrize("window", [1, 2])
def test_verification_catches_an_off_by_one_window(monkeypatch, window):
    config = GqaConfig(local_window_size=window)
    model = make_gqa_model(config)
    report_ok = verify(model)
    assert report_ok.passed
    report_legacy = verify(model, legacy_window=True)
    assert not report_legacy.passed


def test_verify_reports_a_refused_node_instead_of_raising():
    report = verify(make_gqa_model(GqaConfig(extra_attributes=(("kv_share_buffer", 1),))))
    assert not report.passed
    assert "unknown attribute" in report.nodes[0].refused


@pytest.mark.parametrize(
    "config,message",
    [
        (GqaConfig(extra_attributes=(("sliding_window_cache", 1),)), "requires local_window_size > 0"),
        (
            GqaConfig(past=False, local_window_size=2, extra_attributes=(("sliding_window_cache", 1),)),
            "requires past_key",
        ),
        (GqaConfig(kv_empty=True, local_window_size=2, extra_attributes=(("sliding_window_cache", 1),)), "shared KV"),
        (GqaConfig(qk_output=1, local_window_size=2, extra_attributes=(("sliding_window_cache", 1),)), "qk_output"),
        (
            GqaConfig(static_dims=True, local_window_size=9, extra_attributes=(("sliding_window_cache", 1),)),
            "capacity 8",
        ),
    ],
)
def test_invalid_windowed_cache_is_refused(config, message):
    with pytest.raises(GqaDecomposeError, match=message):
        gqa_decompose.decompose(make_gqa_model(config))


@pytest.mark.parametrize("case", list(CASES))
def test_every_refusal_is_one_ort_makes_too(case):
    """Each refusal of the table (docs/refusals.md): we refuse, and ORT CPU rejects the node too."""
    refusal = CASES[case]
    model = refusal.build()
    with pytest.raises(GqaDecomposeError) as raised:
        gqa_decompose.decompose(model)
    assert refusal.ours in str(raised.value)
    message = ort_message(model)
    assert message is not None, "ONNX Runtime runs this node: the refusal narrows the op"
    assert refusal.ort in message


def test_present_declared_against_the_node_is_decomposed_and_runs_as_the_original():
    """ORT runs a node whose present is declared with other KV heads (graph output shapes are not checked).
    The rewrite reads present back: it did so through the contradicted declaration, and ORT's shape inference
    rejected the rewritten graph ("Incompatible dimensions"), so the node was refused. Present now reaches the
    graph output through an Identity, the declaration stays as it was, and the rewrite runs."""
    model = make_gqa_model(GqaConfig())
    model.graph.output[1].CopyFrom(
        onnx.helper.make_tensor_value_info("present_key", onnx.TensorProto.FLOAT, ["batch", 3, None, 16])
    )
    assert ort_message(model) is None
    rewritten = gqa_decompose.decompose(model)
    assert ort_message(rewritten) is None
    assert rewritten.graph.output[1] == model.graph.output[1]
    result = gqa_decompose.verify(model, rewritten)
    assert result.passed, result
