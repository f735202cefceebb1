"""Every shipped fixture, decomposed with the companion ops: none of them left, the full checker passes,
and a prompt with decode steps matches the original on ORT CPU."""

from __future__ import annotations

import pathlib

import onnx
import onnx_ir as ir
import pytest

from gqa_decompose import model_io
from gqa_decompose.api import rewrite
from gqa_decompose.ops import lookup
from gqa_decompose.verify_model import verify_model
from tests.conftest import MODELS

FIXTURES = sorted(path / "model.onnx" for path in MODELS.iterdir() if (path / "model.onnx").exists())


def _registered_left(model: ir.Model) -> list[str]:
    return [
        f"{node.domain}::{node.op_type}"
        for node in ir.traversal.RecursiveGraphIterator(model.graph)
        if lookup(node.domain, node.op_type) is not None and node.op_type != "LayerNormalization"
    ]


@pytest.mark.parametrize("path", FIXTURES, ids=[path.parent.name for path in FIXTURES])
def test_fixture_comes_out_without_companion_ops_checked_and_matching(path: pathlib.Path):
    model = model_io.load_model(path)
    result = rewrite(model)
    assert result.ops, "the fixture has companion ops to decompose"
    assert not _registered_left(model)
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    verification = verify_model(path, model, steps=2)
    assert verification.passed, verification


def test_only_gqa_leaves_the_norms_in_place():
    model = model_io.load_model(MODELS / "builder-tiny-llama" / "model.onnx")
    from gqa_decompose.spec import DecomposeOptions

    result = rewrite(model, DecomposeOptions(ops=("GroupQueryAttention",)))
    assert len(result) == 2 and not result.ops
    left = {node.op_type for node in model.graph}
    assert {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"} <= left
    assert "GroupQueryAttention" not in left


def test_only_the_norms_leaves_gqa_in_place():
    from gqa_decompose.spec import DecomposeOptions

    model = model_io.load_model(MODELS / "builder-tiny-llama" / "model.onnx")
    result = rewrite(
        model, DecomposeOptions(ops=("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization")), check=False
    )
    assert not len(result) and len(result.ops) == 5
    assert "GroupQueryAttention" in {node.op_type for node in model.graph}


@pytest.mark.parametrize("name", ["builder-llama-dml", "builder-qwen3"])
def test_raised_to_opset_23_the_norms_and_rotary_become_the_standard_ops_and_match(name):
    from gqa_decompose.spec import DecomposeOptions

    path = MODELS / name / "model.onnx"
    model = model_io.load_model(path)
    rewrite(model, DecomposeOptions(target="attention", raise_opset=True))
    assert model.opset_imports[""] == 23
    op_types = {node.op_type for node in model.graph}
    assert {"RMSNormalization", "RotaryEmbedding", "Attention"} <= op_types
    assert not _registered_left(model) and "SimplifiedLayerNormalization" not in op_types
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)
    assert verify_model(path, model, steps=2, target="attention", raise_opset=True).passed
