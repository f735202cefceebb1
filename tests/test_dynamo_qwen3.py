"""Real-producer fixture ``models/dynamo-qwen3/model.onnx``: a tiny random-weight Qwen3 exported by
``torch.onnx.export(..., dynamo=True)`` and fused by onnxscript's ``optimize_for_ort`` (made by
``scripts/make_dynamo_fixture.py --arch qwen3``; see the folder's PROVENANCE.md).

Its GroupQueryAttention has the dynamo-tiny-llama form (tests/test_dynamo_producer.py) plus Qwen3's q/k RMS norm:
query and key come out of Reshape <- default-domain SimplifiedLayerNormalization <- Reshape, with no value_info
for the norm's or the Reshape's output, so the node's query type is only known by typing through the norm.

* the fixture has that form, and ORT runs it and reproduces the torch logits in ``reference.npz``;
* the decomposition leaves no GroupQueryAttention, ``gqa_decompose.verify`` passes node by node,
  ``verify_model`` passes over a prompt and four decode steps, and the rewrite reproduces the torch logits.

Before typing went through such nodes (issue 13 item 5) the package refused the fixture: "query type None is not
float, float16 or bfloat16 (or is unknown)".
"""

from __future__ import annotations

import functools
import pathlib

import numpy as np
import onnx
import pytest
from test_dynamo_producer import _reference_run
from test_real_producers import _gqa_nodes, _producers

import gqa_decompose
from gqa_decompose.verify_model import verify_model

FOLDER = pathlib.Path(__file__).parent.parent / "models" / "dynamo-qwen3"
MODEL = FOLDER / "model.onnx"
TORCH_ATOL = 1e-4

pytestmark = pytest.mark.skipif(not MODEL.exists(), reason=f"fixture {MODEL} is absent")


@functools.cache
def _original() -> onnx.ModelProto:
    return onnx.load(MODEL)


@functools.cache
def _decomposed() -> onnx.ModelProto:
    return gqa_decompose.decompose(_original())


def test_fixture_has_the_untyped_qk_norm_form():
    model = _original()
    producers = _producers(model)
    typed = {v.name for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]}
    nodes = _gqa_nodes(model)
    assert len(nodes) == 2 and model.ir_version <= 10
    for node in nodes:
        for index in (0, 1):  # query, key: Reshape <- SimplifiedLayerNormalization <- Reshape <- MatMul
            reshape = producers[node.input[index]]
            norm = producers[reshape.input[0]]
            assert reshape.op_type == "Reshape" and norm.op_type == "SimplifiedLayerNormalization"
            assert norm.domain in ("", "ai.onnx")
            assert node.input[index] not in typed and norm.output[0] not in typed
            weight = next(i for i in model.graph.initializer if i.name == norm.input[1])
            assert not np.allclose(onnx.numpy_helper.to_array(weight), 1.0)  # redrawn: a dropped weight shows
        assert node.input[2] and node.input[3].startswith("past_key_values")


def _check_torch_logits(model: onnx.ModelProto) -> None:
    reference = np.load(FOLDER / "reference.npz")
    prefill, decode = _reference_run(model, reference)
    np.testing.assert_allclose(prefill["logits"], reference["prefill_logits"], rtol=0, atol=TORCH_ATOL)
    np.testing.assert_allclose(decode["logits"], reference["decode_logits"], rtol=0, atol=TORCH_ATOL)


def test_original_matches_torch_logits():
    _check_torch_logits(_original())


def test_fixture_is_small():
    assert MODEL.stat().st_size < 1 << 20


def test_decomposes_without_leftover_gqa():
    assert not _gqa_nodes(_decomposed())


def test_verify_passes():
    report = gqa_decompose.verify(_original(), _decomposed())
    assert report.passed and len(report.nodes) == 2
    assert not any(node.skipped for node in report.nodes)


@pytest.mark.parametrize("static", [False, True], ids=["growing", "static"])
def test_whole_model_matches_over_a_prompt_and_four_decode_steps(static):
    result = verify_model(MODEL, _decomposed(), batch=2, static_kv_cache=static)
    assert result.passed, result.summary()
    assert result.cache_layout.startswith("static buffer" if static else "growing cache")


def test_decomposed_matches_torch_logits():
    _check_torch_logits(_decomposed())
