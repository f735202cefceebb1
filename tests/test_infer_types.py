"""Typing GQA inputs: ONNX shape inference is taught GQA's outputs, so a deep model is typed in one round."""

from __future__ import annotations

import pathlib
import sys

import onnx
import onnx_ir as ir

from gqa_decompose.passes import InferGqaTypesPass, find_gqa_nodes
from gqa_decompose.passes import infer_types

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "scripts"))
from make_tiny_llama import write_sparse_model  # noqa: E402


def test_every_layer_of_a_deep_model_is_typed_in_one_inference_round(tmp_path, monkeypatch):
    path = write_sparse_model(tmp_path, layers=12, hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=64)
    model = ir.load(path)
    rounds = []
    original = infer_types.quiet_shape_inference
    monkeypatch.setattr(infer_types, "quiet_shape_inference", lambda m: rounds.append(1) or original(m))
    monkeypatch.setattr(infer_types, "_ort_symbolic_inference", lambda m: (_ for _ in ()).throw(AssertionError))
    InferGqaTypesPass()(model)
    nodes = [node for _, node in find_gqa_nodes(model)]
    assert len(nodes) == 12
    assert all(node.inputs[0].shape is not None and node.inputs[0].shape[2] == 128 for node in nodes)
    assert all(node.outputs[0].shape is not None and node.outputs[0].shape[2] == 64 for node in nodes)
    assert len(rounds) == 1  # was one round per layer


def test_the_gqa_schema_is_registered_only_during_inference():
    assert not onnx.defs.has("GroupQueryAttention", "com.microsoft")
    with infer_types._gqa_schema_registered():
        assert onnx.defs.has("GroupQueryAttention", "com.microsoft")
    assert not onnx.defs.has("GroupQueryAttention", "com.microsoft")
