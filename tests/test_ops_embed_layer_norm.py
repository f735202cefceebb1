"""com.microsoft.EmbedLayerNormalization (the transformers optimizer's BERT embeddings) against ORT CPU: every
optional input and output, position_ids per row or broadcast, opsets below and at LayerNormalization-17."""

from __future__ import annotations

import onnx_ir as ir
import pytest
from onnx import TensorProto

from gqa_decompose.errors import GqaDecomposeError
from gqa_decompose.ops import lookup
from gqa_decompose.ops.base import OpContext
from tests.ops_cases import FLOAT, FLOAT16, node_model, verify

INT32 = TensorProto.INT32
V, P, G, D = 11, 7, 2, 16  # vocabulary, positions, token types, hidden


def _model(segment=True, mask=True, positions=None, outputs=(0, 1), opset=14, batch="batch", length="seq", dtype=FLOAT):
    inputs = [
        ("input_ids", INT32, [batch, length]),
        ("segment_ids", INT32, [batch, length]) if segment else None,
        ("word_embedding", dtype, [V, D]),
        ("position_embedding", dtype, [P, D]),
        ("segment_embedding", dtype, [G, D]) if segment else None,
        ("gamma", dtype, [D]),
        ("beta", dtype, [D]),
        ("mask", INT32, [batch, length]) if mask else None,
    ]
    if positions is not None:
        inputs.append(("position_ids", INT32, {"per_row": [batch, length], "broadcast": [1, length]}[positions]))
    names = [("output", dtype), ("mask_index", INT32), ("embedding_sum", dtype)]
    out = [names[i] if i in outputs else None for i in range(max(outputs) + 1)]
    return node_model("com.microsoft", "EmbedLayerNormalization", inputs, out, {"epsilon": 1e-12}, opset)


@pytest.mark.parametrize("opset", [14, 17])
@pytest.mark.parametrize("segment", [False, True])
@pytest.mark.parametrize("mask", [False, True])
@pytest.mark.parametrize("positions", [None, "per_row", "broadcast"])
@pytest.mark.parametrize("outputs", [(0, 1), (0, 1, 2), (0, 2)])
def test_embed_layer_norm_matches_ort(opset, segment, mask, positions, outputs):
    for seed in range(2):
        verify(_model(segment, mask, positions, outputs, opset), seed)


def test_static_shapes_match_ort():
    verify(_model(batch=3, length=5, outputs=(0, 1, 2)))


@pytest.mark.parametrize("opset", [14, 17])
@pytest.mark.parametrize("positions", [None, "per_row"])
def test_fp16_matches_ort(opset, positions):
    """ORT CPU has an fp16 kernel too (computed in fp32, rounded once)."""
    for seed in range(2):
        verify(_model(positions=positions, outputs=(0, 1, 2), opset=opset, dtype=FLOAT16), seed)


def _parse(model):
    node = next(iter(model.graph))
    return lookup(node.domain, node.op_type).parse(node, OpContext(14))


def test_refusals():
    model = _model()
    node = next(iter(model.graph))
    node.replace_input_with(1, None)  # a segment table without segment_ids
    with pytest.raises(GqaDecomposeError, match="together"):
        _parse(model)
    model = _model()
    next(iter(model.graph)).inputs[0].dtype = ir.DataType.INT64
    with pytest.raises(GqaDecomposeError, match="input_ids has element type"):
        _parse(model)


def test_one_output_is_refused_as_ort_refuses_it():
    """ORT's schema requires mask_index ("output index 1 is out of range; node has 1 outputs")."""
    with pytest.raises(GqaDecomposeError, match="mask_index output"):
        _parse(_model(outputs=(0,)))
