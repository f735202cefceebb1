"""Real-producer fixtures without GroupQueryAttention, whose attention is a companion op:

* ``models/dynamo-llama-mha``: torch dynamo + onnxscript's ``optimize_for_ort`` on a Llama with Hkv = H, which
  fuses into ``com.microsoft.MultiHeadAttention`` after contrib ``RotaryEmbedding`` (scripts/make_dynamo_fixture.py
  ``--arch llama-mha``);
* ``models/optimizer-tiny-bert``: ONNX Runtime's transformers optimizer on a TorchScript BERT export, with
  ``EmbedLayerNormalization``, contrib ``Attention`` (1-D ``mask_index``), ``SkipLayerNormalization``, ``BiasGelu``
  and a default-domain ``LayerNormalization`` at opset 14 (scripts/make_optimizer_fixture.py).

For each (``FORMS`` says what the fixture is for, read from its graph): the default rewrite leaves no contrib
op, every companion-op node verifies alone against ORT CPU, and the decomposed model reproduces the torch logits
in ``reference.npz``. (Whole-model parity with the original is tests/test_verify_model.py, tests/test_ops_fixtures.py
checks the full checker, as for every fixture.)
"""

from __future__ import annotations

import collections
import functools
import json
import pathlib

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

import gqa_decompose
from gqa_decompose.passes.infer_types import InferGqaTypesPass
from gqa_decompose.verify_ops import verify_ops
from tests.conftest import has_gqa

MODELS = pathlib.Path(__file__).resolve().parent.parent / "models"
TORCH_ATOL = 1e-4
TORCH_ATOL_FP16 = 5e-2  # an fp16 graph against the float32 torch model, as the fixture's script accepts it

# The contrib (and ORT-only default-domain) ops each fixture holds, by count: what it is a fixture for.
FORMS = {
    "dynamo-llama-mha": {
        "com.microsoft::MultiHeadAttention": 2,
        "com.microsoft::RotaryEmbedding": 4,
        "com.microsoft::SkipSimplifiedLayerNormalization": 4,
        "SimplifiedLayerNormalization": 1,
    },
    "builder-llama-cpu-fp16": {
        "com.microsoft::MultiHeadAttention": 2,
        "com.microsoft::RotaryEmbedding": 4,
        "com.microsoft::SkipSimplifiedLayerNormalization": 4,
        "SimplifiedLayerNormalization": 1,
    },
    "optimizer-tiny-bert": {
        "com.microsoft::EmbedLayerNormalization": 1,
        "com.microsoft::Attention": 2,
        "com.microsoft::SkipLayerNormalization": 4,
        "com.microsoft::BiasGelu": 3,
        "LayerNormalization": 1,
    },
}
FIXTURES = [name for name in FORMS if (MODELS / name / "model.onnx").exists()]


@functools.cache
def _original(folder: str) -> onnx.ModelProto:
    return onnx.load(MODELS / folder / "model.onnx")


@functools.cache
def _decomposed(folder: str) -> onnx.ModelProto:
    return gqa_decompose.decompose(_original(folder))


def _ort_only_ops(model: onnx.ModelProto) -> collections.Counter:
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    counts = collections.Counter()
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            counts[f"{node.domain}::{node.op_type}"] += 1
        elif not onnx.defs.has(node.op_type, max_inclusive_version=opset, domain=""):
            counts[node.op_type] += 1
    return counts


def test_every_fixture_is_listed():
    listed = {p.parent.name for p in MODELS.glob("*/model.onnx") if not has_gqa(p)}
    assert listed == set(FIXTURES)


@pytest.mark.parametrize("folder", FIXTURES)
def test_fixture_has_its_form(folder):
    assert dict(_ort_only_ops(_original(folder))) == FORMS[folder]


@pytest.mark.parametrize("folder", FIXTURES)
def test_decomposes_into_standard_ops(folder):
    decomposed = _decomposed(folder)
    assert not _ort_only_ops(decomposed)
    assert "com.microsoft" not in {o.domain for o in decomposed.opset_import}


@pytest.mark.parametrize("folder", FIXTURES)
def test_every_companion_node_verifies_alone(folder):
    model = ir.serde.deserialize_model(_original(folder))
    InferGqaTypesPass()(model)
    results = verify_ops(model)
    assert len(results) == sum(FORMS[folder].values())
    failed = [r for r in results if r.ok is not True]
    assert not failed, failed


@pytest.mark.parametrize("folder", FIXTURES)
def test_decomposed_matches_torch_logits(folder):
    reference = dict(np.load(MODELS / folder / "reference.npz"))
    session = ort.InferenceSession(_decomposed(folder).SerializeToString(), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    for step in ("prefill", "decode"):
        if f"{step}_logits" not in reference:
            continue
        feeds = _feeds(folder, reference, step, session)
        logits = session.run(["logits"], {k: v for k, v in feeds.items() if k in names})[0]
        atol = TORCH_ATOL_FP16 if logits.dtype == np.float16 else TORCH_ATOL
        np.testing.assert_allclose(logits.astype(np.float32), reference[f"{step}_logits"], atol=atol)


def _head_size(folder: str, past) -> int:
    """A past's last dim: declared, or (the builder's symbolic ``kv_cache_dim``) genai_config.json's head_size."""
    if isinstance(past.shape[3], int):
        return past.shape[3]
    return json.loads((MODELS / folder / "genai_config.json").read_text())["model"]["decoder"]["head_size"]


def _feeds(folder: str, reference: dict, step: str, session) -> dict[str, np.ndarray]:
    """The prompt's feeds from reference.npz (pasts empty), or the decode step's (the prompt's presents as pasts)."""
    prompt = {
        k: reference[k] for k in ("input_ids", "attention_mask", "position_ids", "token_type_ids") if k in reference
    }
    pasts = [i for i in session.get_inputs() if i.name.startswith("past")]
    for value in pasts:
        dtype = np.float16 if value.type == "tensor(float16)" else np.float32
        prompt[value.name] = np.zeros((1, value.shape[1], 0, _head_size(folder, value)), dtype)
    names = {i.name for i in session.get_inputs()}
    length = prompt["input_ids"].shape[1]
    if "attention_mask" in names and "attention_mask" not in prompt:  # the builder's reference holds the ids only
        prompt["attention_mask"] = np.ones((1, length), np.int64)
    if "position_ids" in names and "position_ids" not in prompt:
        prompt["position_ids"] = np.arange(length, dtype=np.int64)[None]
    if step == "prefill":
        return prompt
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, prompt)))
    decode = {
        "input_ids": reference["next_id"],
        "attention_mask": np.ones((1, length + 1), np.int64),
        "position_ids": np.array([[length]], np.int64),
    }
    for value in pasts:
        decode[value.name] = outputs[value.name.replace("past_key_values", "present")]
    return decode


@pytest.mark.parametrize("folder", FIXTURES)
def test_check_verifies_the_whole_model_without_gqa(folder):
    """check() ran model-level verification only when a GQA node was decomposable: a model whose attention is
    MultiHeadAttention or contrib Attention was called portable without its whole-model run."""
    result = gqa_decompose.check(MODELS / folder / "model.onnx", verify_mode="all", steps=1)
    assert result.portable
    assert result.model_verification is not None and result.model_verification.passed
    assert result.model_verification.skipped is None


def test_typing_keeps_the_query_length_apart_from_the_total_length():
    """The builder's cpu fp16 graph carries no value_info. ORT's symbolic inference (auto_merge) merges the
    query's length with the total length there; a rewrite typed from it declared the query T rows long, and ORT,
    trusting the declaration, failed the first decode step. Typing keeps ``sequence_length`` on the query."""
    folder = "builder-llama-cpu-fp16"
    if folder not in FIXTURES:
        pytest.skip(f"{folder} is not in models/")
    model = ir.serde.deserialize_model(_original(folder))
    InferGqaTypesPass()(model)
    attention = [node for node in model.graph if node.op_type == "MultiHeadAttention"]
    assert attention
    for node in attention:
        assert node.inputs[0].shape[1] == ir.SymbolicDim("sequence_length"), node.inputs[0].shape
        assert node.inputs[1].shape[1] == ir.SymbolicDim("total_sequence_length"), node.inputs[1].shape


def test_ort_symbolic_inference_reports_the_symbols_it_merged():
    """On the builder's cpu fp16 graph ORT's symbolic inference merges the query's length with the total length;
    the pass reads that back, so dims named by merged symbols are not copied from it (tiny BERT: none merged)."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    from gqa_decompose.passes.infer_types import _symbolic_inference

    for folder, merged in (
        ("builder-llama-cpu-fp16", {"sequence_length", "total_sequence_length"}),
        ("optimizer-tiny-bert", set()),
    ):
        if folder not in FIXTURES:
            continue
        _, found = _symbolic_inference(SymbolicShapeInference, _original(folder))
        assert merged <= found and (found or not merged), (folder, found)


def test_check_runtime_feeds_the_concat_grown_pasts_their_head_size():
    """``--check --runtime``'s prompt feeds: the builder's cpu fp16 pasts are [batch, 2, past, kv_cache_dim], read
    by no GQA node. kv_cache_dim took the prompt length (4), and OpenVINO refused the Concat of an empty
    [1, 2, 0, 4] past with [1, 2, 4, 16] rows; it is the head size, from the rows the graph's Concat appends."""
    from gqa_decompose.runtime_check import _cache_dims, synthesize_prompt_feeds

    folder = "builder-llama-cpu-fp16"
    if folder not in FIXTURES:
        pytest.skip(f"{folder} is not in models/")
    known = _cache_dims(ir.serde.deserialize_model(_original(folder)), gqa_decompose.DecomposeOptions())
    assert known == {"kv_cache_dim": 16}
    feeds = synthesize_prompt_feeds(_original(folder), known_dims=known)
    assert feeds["past_key_values.0.key"].shape == (1, 2, 0, 16)
