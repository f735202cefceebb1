"""Real-producer fixtures: every ``models/builder-*/model.onnx`` (onnxruntime-genai's model builder on tiny random
Hugging Face checkpoints, made by ``scripts/make_builder_fixture.py``; see each folder's PROVENANCE.md).

For each fixture:

* the decomposition runs and leaves no GroupQueryAttention (or, for a fixture listed in ``REFUSED``, refuses with
  the documented reason);
* ``gqa_decompose.verify`` passes node by node, and the nodes really carry the GQA feature the fixture is for
  (``FEATURES``);
* (the whole decomposed model against the original, prompt + decode steps: tests/test_verify_model.py);
* where ``reference.npz`` holds the torch logits, the decomposed model reproduces them.

Comparisons are ORT (original) against ORT (decomposed): the builder graphs keep ORT-only ops such as
SimplifiedLayerNormalization, which is fine.
"""

from __future__ import annotations

import functools
import math
import pathlib
import re

import numpy as np
import onnx
import pytest
from onnx import helper
from test_models import _run, _session

import gqa_decompose

MODELS = pathlib.Path(__file__).parent.parent / "models"
FIXTURES = sorted(p.parent.name for p in MODELS.glob("builder-*/model.onnx"))

# Tolerances by the model's float type: (logits, presents) for ORT original vs decomposed, and logits vs torch.
PARITY_TOLERANCE = {
    onnx.TensorProto.FLOAT: (1e-4, 1e-5),
    onnx.TensorProto.FLOAT16: (2e-2, 1e-2),
}
# fp32 builder models match torch to ~1e-5; the fp16 one is ~1.7e-2 away from the float32 torch model.
TORCH_TOLERANCE = {onnx.TensorProto.FLOAT: 1e-4, onnx.TensorProto.FLOAT16: 5e-2}

# Fixtures whose decomposition is refused by design (README "refused" table), with the reason it must name.
REFUSED: dict[str, str] = {}


# Model facts -------------------------------------------------------------------------------------------------


@functools.cache
def _original(folder: str) -> onnx.ModelProto:
    return onnx.load(MODELS / folder / "model.onnx")


@functools.cache
def _decomposed(folder: str) -> onnx.ModelProto:
    return gqa_decompose.decompose(_original(folder))


def _gqa_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]


def _attributes(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in model.graph.node for out in node.output}


def _head_size(node: onnx.NodeProto, model: onnx.ModelProto) -> int:
    """Packed QKV width / (N + 2 Nkv), the width taken from the QKV MatMul's weight."""
    attrs = _attributes(node)
    producers = _producers(model)
    initializers = {i.name: i for i in model.graph.initializer}
    name = node.input[0]
    while name not in initializers:  # walk back through the bias Add to the MatMul and its weight
        producer = producers[name]
        weights = [i for i in producer.input if i in initializers and len(initializers[i].dims) == 2]
        name = weights[0] if weights else producer.input[0]
    width = initializers[name].dims[-1]
    return width // (attrs["num_heads"] + 2 * attrs["kv_num_heads"])


def _if_branch_cos_widths(model: onnx.ModelProto, cos_name: str) -> list[int] | None:
    """Widths of the cos caches an If node chooses between, or None when cos_cache is not an If output."""
    producer = _producers(model).get(cos_name)
    if producer is None or producer.op_type != "If":
        return None
    index = list(producer.output).index(cos_name)
    widths = []
    for attr in producer.attribute:
        branch = attr.g
        out = branch.output[index].name
        for node in branch.node:
            if out in node.output and node.op_type == "Constant":
                widths.append(int(helper.get_attribute_value(node.attribute[0]).dims[1]))
    return widths


def _elem_type(model: onnx.ModelProto, name: str) -> int:
    return next(i.type.tensor_type.elem_type for i in model.graph.input if i.name == name)


def _float_type(model: onnx.ModelProto) -> int:
    return _elem_type(model, _past_names(model)[0])


def _past_names(model: onnx.ModelProto) -> list[str]:
    return [i.name for i in model.graph.input if i.name.startswith("past_key_values")]


def _past_layer(name: str) -> int:
    return int(name.split(".")[1])


# What each fixture is for: a check on its GQA nodes' attributes (and the graph around them).


def _plain(model, nodes):
    attrs = [_attributes(n) for n in nodes]
    assert all(a["do_rotary"] == 1 and a.get("local_window_size", -1) < 0 for a in attrs)
    assert all(not a.get("softcap") for a in attrs)


def _qkv_bias(model, nodes):
    producers = _producers(model)
    initializers = {i.name for i in model.graph.initializer}
    for node in nodes:
        add = producers[node.input[0]]
        assert add.op_type == "Add" and any(i in initializers for i in add.input), f"{node.name}: no QKV bias Add"


def _phi3(model, nodes):
    for node in nodes:
        attrs = _attributes(node)
        assert attrs["num_heads"] == attrs["kv_num_heads"]
        widths = _if_branch_cos_widths(model, node.input[7])
        assert widths, f"{node.name}: cos_cache does not come from an If node"
        head_size = _head_size(node, model)
        assert all(2 * w < head_size for w in widths), (widths, head_size)  # partial rotary


def _sliding(model, nodes):
    windows = [_attributes(n).get("local_window_size", -1) for n in nodes]
    assert 4 in windows and any(w < 0 for w in windows), windows  # one windowed layer, one full layer
    assert not any(_attributes(n).get("sliding_window_cache", 0) for n in nodes)


def _ring(model, nodes):
    ringed = [n for n in nodes if _attributes(n).get("sliding_window_cache", 0)]
    assert ringed and all(_attributes(n)["local_window_size"] > 0 for n in ringed)


def _gemma2(model, nodes):
    for node in nodes:
        attrs = _attributes(node)
        assert attrs["softcap"] > 0
        assert not math.isclose(attrs["scale"], _head_size(node, model) ** -0.5)
    assert any(_attributes(n)["local_window_size"] > 0 for n in nodes)


def _fp16(model, nodes):
    assert _float_type(model) == onnx.TensorProto.FLOAT16


FEATURES = {
    "builder-tiny-llama": _plain,
    "builder-qwen2": _qkv_bias,
    "builder-phi3": _phi3,
    "builder-qwen2-sliding": _sliding,
    "builder-qwen2-ring": _ring,
    "builder-gemma2": _gemma2,
    "builder-llama-fp16": _fp16,
}


def _not_refused(folder: str) -> None:
    if folder in REFUSED:
        pytest.skip(f"decomposition refused by design ({REFUSED[folder]})")


# (a) decomposition ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("folder", FIXTURES)
def test_decomposes_without_leftover_gqa(folder):
    if folder in REFUSED:
        with pytest.raises(gqa_decompose.GqaDecomposeError, match=REFUSED[folder]):
            gqa_decompose.decompose(_original(folder))
        return
    decomposed = _decomposed(folder)
    assert not _gqa_nodes(decomposed)
    assert not any(n.op_type == "GroupQueryAttention" for g in _subgraphs(decomposed.graph) for n in g.node)


def _subgraphs(graph: onnx.GraphProto):
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield attr.g
                yield from _subgraphs(attr.g)


# (b) node-level verification and the fixture's feature ---------------------------------------------------------


@pytest.mark.parametrize("folder", FIXTURES)
def test_fixture_has_its_feature(folder, record_property):
    model = _original(folder)
    nodes = _gqa_nodes(model)
    assert nodes, "no GroupQueryAttention node"
    summary = {n.name: {**_attributes(n), "head_size": _head_size(n, model)} for n in nodes}
    record_property("gqa_attributes", summary)
    print(f"\n{folder}:")  # shown with -s / -rP
    for name, attrs in summary.items():
        print(f"  {name}: {attrs}")
    assert folder in FEATURES, f"say in FEATURES what {folder} is a fixture for"
    FEATURES[folder](model, nodes)


@pytest.mark.parametrize("folder", FIXTURES)
def test_verify_passes(folder):
    if folder in REFUSED:
        report = gqa_decompose.verify(_original(folder))
        assert not report.passed
        assert any(node.refused and re.search(REFUSED[folder], node.refused) for node in report.nodes)
        return
    report = gqa_decompose.verify(_original(folder), _decomposed(folder))
    failures = [
        (node.name, node.skipped, [(r.phase.name, r.failure) for r in node.results if not r.passed])
        for node in report.nodes
        if not node.passed
    ]
    assert report.passed, failures
    assert len(report.nodes) == len(_gqa_nodes(_original(folder)))
    assert not any(node.skipped for node in report.nodes), failures


def test_every_refusal_is_a_fixture():
    assert set(REFUSED) <= set(FIXTURES)


# (c) whole-model parity ------------------------------------------------------------------------------------------


def _cache_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, int, int]]:
    """(kv heads, head size, first past rows) for each past input: heads from the graph input, head size from
    its layer's GQA node (the input's last dim is the symbolic ``kv_cache_dim`` in builder graphs). A windowed
    cache (sliding_window_cache=1) starts full-size (capacity W, as onnxruntime-genai allocates it), a growing
    one empty."""
    by_past = {node.input[3]: node for node in _gqa_nodes(model)}
    shapes = {}
    for name in _past_names(model):
        node = by_past.get(name) or next(n for n in _gqa_nodes(model) if n.input[4] == name)
        dims = next(i for i in model.graph.input if i.name == name).type.tensor_type.shape.dim
        attributes = _attributes(node)
        heads = dims[1].dim_value or attributes["kv_num_heads"]
        rows = attributes["local_window_size"] if attributes.get("sliding_window_cache") else 0
        shapes[name] = (heads, _head_size(node, model), rows)
    return shapes


# Whole-model parity (prompt + decode steps, batch 1 and 2, static buffer and growing cache) is
# tests/test_verify_model.py, through gqa_decompose.verify_model, for every fixture.


# (d) torch logits ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("folder", [f for f in FIXTURES if (MODELS / f / "reference.npz").exists()])
def test_decomposed_matches_torch_logits(folder):
    _not_refused(folder)
    reference = np.load(MODELS / folder / "reference.npz")
    decomposed = _decomposed(folder)
    atol = TORCH_TOLERANCE[_float_type(decomposed)]
    history = _generate_reference(decomposed, _cache_shapes(_original(folder)), reference)
    (_, prefill), (_, decode) = history
    np.testing.assert_allclose(prefill["logits"].astype(np.float32), reference["prefill_logits"], atol=atol)
    np.testing.assert_allclose(decode["logits"].astype(np.float32), reference["decode_logits"], atol=atol)


def _generate_reference(model, cache_shapes, reference):
    """The reference prompt, then its greedy next token, with a growing cache."""
    session = _session(model)
    dtype = helper.tensor_dtype_to_np_dtype(_float_type(model))
    input_ids = reference["input_ids"]
    length = input_ids.shape[1]
    past = {name: np.zeros((1, h, rows, d), dtype) for name, (h, d, rows) in cache_shapes.items()}
    feeds = {"input_ids": input_ids, "attention_mask": np.ones((1, length), np.int64), **past}
    prefill = _run(session, feeds)
    presents = {name: prefill[name.replace("past_key_values", "present")] for name in past}
    decode_feeds = {
        "input_ids": reference["next_id"],
        "attention_mask": np.ones((1, length + 1), np.int64),
        **presents,
    }
    return [(feeds, prefill), (decode_feeds, _run(session, decode_feeds))]


def test_fixtures_are_small():
    for folder in FIXTURES:
        assert (MODELS / folder / "model.onnx").stat().st_size < 1 << 20, folder



def test_phi3_node_verification_exercises_partial_rotary():
    # The builder declares the LongRoPE If output's width symbolically ('head_dim / 2' = 16) while the
    # tables are 8 wide: verification must synthesize 8-wide tables, or partial rotary goes untested.
    import onnx_ir as ir

    from gqa_decompose.passes import find_gqa_nodes
    from gqa_decompose.verify import _rotary_half_hint

    model = ir.serde.deserialize_model(_original("builder-phi3"))
    for _, node in find_gqa_nodes(model):
        assert _rotary_half_hint(node.inputs[7]) == 8
