"""KV-shared layers in a whole model (tests/kv_shared_model.py): a Gemma 4-style decoder at opset 24 whose layers 2
and 3 run GroupQueryAttention with empty key/value on layers 0 and 1's presents, with no present outputs of their
own; head sizes 256 (sliding, window 4) and 512 (full).

* the model has that form, and ONNX Runtime CPU runs it;
* the decomposition leaves no GroupQueryAttention and keeps opset 24;
* ``gqa_decompose.verify`` passes node by node, shared layers included;
* ``gqa_decompose.verify_model`` passes over a prompt and four decode steps (right-padded batch 2 and batch 1),
  with a growing cache and with a static buffer, for the default decomposition and ``static_kv_cache``;
* a rewrite that gets a shared layer wrong fails that comparison (so it covers the shared layers).
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest
from kv_shared_model import KvSharedConfig, make_kv_shared_model
from onnx import helper

import gqa_decompose
from gqa_decompose.verify_model import verify_model

CONFIGS = {"float32": KvSharedConfig(), "float16": KvSharedConfig(dtype="float16")}


@functools.cache
def _original(dtype: str) -> onnx.ModelProto:
    return make_kv_shared_model(CONFIGS[dtype])


@functools.cache
def _decomposed(dtype: str, static: bool = False) -> onnx.ModelProto:
    return gqa_decompose.decompose(_original(dtype), static_kv_cache=static)


def _gqa_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]


def test_model_has_the_kv_shared_form():
    model = _original("float32")
    config = CONFIGS["float32"]
    producers = {out: n for n in model.graph.node for out in n.output}
    opsets = {o.domain: o.version for o in model.opset_import}
    assert opsets[""] == 24 and model.ir_version <= 13
    nodes = _gqa_nodes(model)
    assert len(nodes) == 4
    for layer, node in enumerate(nodes):
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert attributes["do_rotary"] == 1
        assert attributes.get("local_window_size", -1) == (4 if layer % 2 == 0 else -1)
        assert node.input[7] == ("cos_cache_sliding" if layer % 2 == 0 else "cos_cache_full")
        if layer < 2:
            assert node.input[3] == f"past_key_values.{layer}.key"
            assert list(node.output[1:]) == [f"present.{layer}.key", f"present.{layer}.value"]
        else:
            assert node.input[1] == node.input[2] and producers[node.input[1]].op_type == "ConstantOfShape"
            assert list(node.input[3:5]) == [f"present.{layer - 2}.key", f"present.{layer - 2}.value"]
            assert len(node.output) == 1, "a shared layer declares no present"
    heads = {i.name: i.type.tensor_type.shape.dim[3].dim_value for i in model.graph.input if "past" in i.name}
    assert set(heads.values()) == {config.sliding_head_size, config.full_head_size} == {256, 512}


@pytest.mark.parametrize("dtype", CONFIGS)
def test_decomposes_without_leftover_gqa(dtype):
    decomposed = _decomposed(dtype)
    assert not _gqa_nodes(decomposed)
    assert not any(n.domain == "com.microsoft" for n in decomposed.graph.node)
    assert {o.domain: o.version for o in decomposed.opset_import}[""] == 24
    assert decomposed.ir_version <= 13


@pytest.mark.parametrize("dtype", CONFIGS)
def test_verify_passes_node_by_node(dtype):
    report = gqa_decompose.verify(_original(dtype), _decomposed(dtype))
    failures = [
        (node.name, node.skipped, [(r.phase.name, r.failure) for r in node.results if not r.passed])
        for node in report.nodes
        if not node.passed
    ]
    assert report.passed, failures
    assert len(report.nodes) == 4 and not any(node.skipped for node in report.nodes), failures
    assert all(node.results for node in report.nodes)


@pytest.mark.parametrize(
    ("dtype", "static_decomposition", "static_drive", "batch"),
    [
        pytest.param("float32", False, False, 2, id="fp32-default-growing-batch2"),
        pytest.param("float32", False, True, 2, id="fp32-default-static-batch2"),
        pytest.param("float32", True, True, 1, id="fp32-static-static-batch1"),
        pytest.param("float16", False, False, 2, id="fp16-default-growing-batch2"),
        pytest.param("float16", False, True, 1, id="fp16-default-static-batch1"),
    ],
)
def test_whole_model_matches_over_a_prompt_and_four_decode_steps(dtype, static_decomposition, static_drive, batch):
    result = verify_model(
        _original(dtype),
        _decomposed(dtype, static_decomposition),
        batch=batch,
        static_kv_cache=static_drive,
        genai_config={},
    )
    failures = [(s.step, s.failure, [o for o in s.outputs if not o.passed]) for s in result.steps if not s.passed]
    assert result.passed, (result.summary(), failures)
    assert result.cache_layout.startswith("static buffer" if static_drive else "growing cache")
    assert len(result.steps) == 5 and result.prompt_length > CONFIGS[dtype].window  # the window matters
    assert "logits" in result.max_errors()
    agree, compared = result.token_agreement
    assert agree == compared == batch * 5
    print(f"\n{dtype} batch {batch}: {result.summary()}")


def _perturbed(model: onnx.ModelProto, output: str, factor: float) -> onnx.ModelProto:
    """``model`` with ``output`` multiplied by ``factor`` after its producer."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    producer = next(n for n in model.graph.node if output in n.output)
    producer.output[list(producer.output).index(output)] = output + "/unperturbed"
    scale = onnx.numpy_helper.from_array(np.array(factor, np.float32), output + "/factor")
    model.graph.initializer.append(scale)
    model.graph.node.append(helper.make_node("Mul", [output + "/unperturbed", scale.name], [output]))
    return model


def test_a_wrong_shared_layer_fails_model_verification():
    wrong = _perturbed(_decomposed("float32"), "/model/layers.2/attn_out", 1.01)
    result = verify_model(_original("float32"), wrong, batch=2, genai_config={})
    assert not result.passed, result.summary()
    assert len(result.steps) == 5 and result.max_error("logits") > 1e-3  # it ran, and the logits moved


def test_attention_target_uses_opset_24s_attention_and_verifies():
    # At opset 24 every layer can become the standard Attention op (a shared layer rotates only its query).
    decomposed = gqa_decompose.decompose(_original("float32"), target="attention")
    ops = [n.op_type for n in decomposed.graph.node if n.domain in ("", "ai.onnx")]
    assert ops.count("Attention") == 4 and ops.count("RotaryEmbedding") == 6
    assert not _gqa_nodes(decomposed)
    assert gqa_decompose.verify(_original("float32"), decomposed).passed
    for static in (False, True):
        result = verify_model(_original("float32"), decomposed, batch=2, static_kv_cache=static, genai_config={})
        assert result.passed, result.summary()
