"""Real-producer fixtures: every ``models/builder-*/model.onnx`` (onnxruntime-genai's model builder on tiny random
Hugging Face checkpoints, made by ``scripts/make_builder_fixture.py``; see each folder's PROVENANCE.md).

For each fixture:

* the decomposition runs and leaves no GroupQueryAttention (or, for a fixture listed in ``REFUSED``, refuses with
  the documented reason);
* ``gqa_decompose.verify`` passes node by node, and the nodes have the GQA form the fixture is for (``FORMS``:
  EP, precision, packed or separate QKV, rotary, windows, cache kind, softcap, head sink, q/k norm, how the
  total length is computed; ``EXTRA_CHECKS`` for a closer look at some);
* (the whole decomposed model against the original, prompt + decode steps, batch 1 and 2, in the cache layout
  genai_config.json declares and with a growing cache: tests/test_verify_model.py, through
  ``gqa_decompose.verify_model``, which also runs fused q/k norm as ORT's SimplifiedLayerNormalization first);
* where ``reference.npz`` holds the torch logits, the decomposed model reproduces them.

Comparisons are ORT (original) against ORT (decomposed): the builder graphs keep ORT-only ops such as
SimplifiedLayerNormalization, which is fine.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import re

import numpy as np
import onnx
import pytest
from onnx import helper
from test_models import _run, _session

import gqa_decompose
from tests.conftest import has_gqa

MODELS = pathlib.Path(__file__).parent.parent / "models"
# The builder's fixtures with GroupQueryAttention (builder-llama-cpu-fp16 has MultiHeadAttention instead:
# tests/test_attention_producers.py).
FIXTURES = sorted(p.parent.name for p in MODELS.glob("builder-*/model.onnx") if has_gqa(p))

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


@functools.cache
def _genai_config(folder: str) -> dict:
    return json.loads((MODELS / folder / "genai_config.json").read_text())


def _head_size(folder: str) -> int:
    """The head size the runtime allocates caches with (genai_config.json): the graph declares the past's last dim
    as the symbolic ``kv_cache_dim``, and Q/K/V may be packed, separate or come out of MatMulNBits."""
    return _genai_config(folder)["model"]["decoder"]["head_size"]


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


# What each fixture is for: its GQA form, read from the graph and genai_config.json, must be the one listed in FORMS
# (README "Sample models" lists the same), and a few forms get a closer look (EXTRA_CHECKS).


@dataclasses.dataclass(frozen=True)
class Form:
    """How a builder fixture's GroupQueryAttention nodes look. Tuples have one entry per GQA node."""

    ep: str  # execution provider named in genai_config.json ("cpu" when none)
    precision: str  # KV cache / activation float type, "int4/" prefixed when weights are MatMulNBits
    qkv: str  # "packed" (one QKV input) or "separate"
    rotary: str  # "do_rotary" (fused), "RotaryEmbedding" (contrib op before GQA)
    windows: tuple[int, ...]  # local_window_size
    cache: tuple[str, ...]  # "max-length" (past_present_share_buffer) or "ring" (sliding_window_cache=1)
    softcap: bool = False
    head_sink: bool = False
    qk_norm: str = "none"  # "explicit" (SimplifiedLayerNormalization before GQA) or "fused" (q/k_norm_weight)
    total_length: str = "Shape"  # what total_sequence_length is computed from: "Shape" or "ReduceMax"


_FULL2 = (-1, -1)
_MAX2 = ("max-length", "max-length")
FORMS = {
    "builder-tiny-llama": Form("cpu", "fp32", "packed", "do_rotary", _FULL2, _MAX2),
    "builder-qwen2": Form("cpu", "fp32", "packed", "do_rotary", _FULL2, _MAX2),
    "builder-phi3": Form("cpu", "fp32", "packed", "do_rotary", _FULL2, _MAX2),
    "builder-qwen2-sliding": Form("cpu", "fp32", "packed", "do_rotary", (-1, 4), _MAX2),
    "builder-qwen2-ring": Form("cpu", "fp32", "packed", "do_rotary", (-1, 4), ("max-length", "ring")),
    "builder-gemma2": Form("cpu", "fp32", "packed", "do_rotary", (4, -1), _MAX2, softcap=True),
    "builder-llama-fp16": Form("cuda", "fp16", "packed", "do_rotary", _FULL2, _MAX2),
    "builder-llama-int4": Form("cpu", "int4/fp32", "packed", "do_rotary", _FULL2, _MAX2),
    "builder-llama-int4-zp": Form("cpu", "int4/fp32", "packed", "do_rotary", _FULL2, _MAX2),
    "builder-llama-int8kv": Form("cpu", "int8-kv/fp32", "packed", "do_rotary", _FULL2, ("growing", "growing")),
    "builder-llama-dml": Form("dml", "fp16", "separate", "RotaryEmbedding", _FULL2, _MAX2),
    "builder-mistral": Form("cpu", "fp32", "packed", "do_rotary", (4, 4), ("ring", "ring")),
    "builder-mistral-fp16": Form("cuda", "fp16", "packed", "do_rotary", (4, 4), ("ring", "ring")),
    "builder-mistral-webgpu": Form("webgpu", "fp16", "packed", "do_rotary", (4, 4), _MAX2, total_length="ReduceMax"),
    "builder-gpt-oss": Form("cpu", "fp32", "packed", "do_rotary", (4, -1), ("ring", "max-length"), head_sink=True),
    "builder-gpt-oss-fp16": Form(
        "cuda", "fp16", "packed", "do_rotary", (4, -1), ("ring", "max-length"), head_sink=True
    ),
    "builder-gemma3": Form(
        "cpu", "fp32", "separate", "do_rotary", (4, 4, 4, 4, 4, -1), ("max-length",) * 6, qk_norm="explicit"
    ),
    "builder-qwen3": Form("cpu", "fp32", "separate", "do_rotary", _FULL2, _MAX2, qk_norm="explicit"),
    "builder-qwen3-webgpu": Form("webgpu", "fp16", "separate", "do_rotary", _FULL2, _MAX2, qk_norm="fused"),
    "builder-gemma4": Form(
        "cpu", "fp32", "separate", "RotaryEmbedding", (4, -1), ("ring", "max-length"), qk_norm="explicit"
    ),
    "builder-gemma4-webgpu-fp16": Form(
        "webgpu", "fp16", "separate", "RotaryEmbedding", (4, -1), _MAX2, qk_norm="explicit"
    ),
}


def _walk_back(model: onnx.ModelProto, name: str, through: set[str]) -> onnx.NodeProto | None:
    """The first producer of ``name`` whose op type is not in ``through``."""
    producers = _producers(model)
    node = producers.get(name)
    while node is not None and node.op_type in through:
        node = producers.get(node.input[0])
    return node


def _form(folder: str) -> Form:
    model = _original(folder)
    nodes = _gqa_nodes(model)
    attrs = [_attributes(n) for n in nodes]
    session = _genai_config(folder)["model"]["decoder"]["session_options"]
    providers = [name for options in session.get("provider_options", []) for name in options]
    # An int8 KV cache (kv_cache_quant_scheme) around fp32 activations: "int8-kv/fp32".
    float_name = {
        onnx.TensorProto.FLOAT: "fp32",
        onnx.TensorProto.FLOAT16: "fp16",
        onnx.TensorProto.INT8: "int8-kv/fp32",
    }[_float_type(model)]
    quantized = any(n.op_type == "MatMulNBits" for n in model.graph.node)
    share_buffer = _genai_config(folder)["search"]["past_present_share_buffer"]

    def one(values: set[str]) -> str:
        assert len(values) == 1, values  # every layer has the same form here
        return values.pop()

    def rotary(node, attributes):
        if attributes["do_rotary"]:
            return "do_rotary"
        producer = _producers(model).get(node.input[0])
        return producer.op_type if producer is not None and producer.domain == "com.microsoft" else "none"

    def qk_norm(node):
        if len(node.input) > 15 and node.input[14] and node.input[15]:  # q_norm_weight, k_norm_weight
            return "fused"
        producer = _walk_back(model, node.input[0], {"Reshape", "RotaryEmbedding", "Cast"})  # fp16: norm in fp32
        return "explicit" if producer is not None and producer.op_type == "SimplifiedLayerNormalization" else "none"

    total_length = _walk_back(model, nodes[0].input[6], {"Cast"})
    if total_length.op_type == "Gather":
        total_length = _walk_back(model, total_length.input[0], set())
    return Form(
        ep=one(set(providers[:1]) or {"cpu"}),
        precision=f"int4/{float_name}" if quantized else float_name,
        qkv=one({"separate" if n.input[1] else "packed" for n in nodes}),
        rotary=one({rotary(n, a) for n, a in zip(nodes, attrs)}),
        windows=tuple(a.get("local_window_size", -1) for a in attrs),
        cache=tuple(
            "ring" if a.get("sliding_window_cache") else "max-length" if share_buffer else "growing" for a in attrs
        ),
        softcap=any(a.get("softcap", 0) > 0 for a in attrs),
        head_sink=any(len(n.input) > 11 and bool(n.input[11]) for n in nodes),
        qk_norm=one({qk_norm(n) for n in nodes}),
        total_length=total_length.op_type,
    )


def _qkv_bias(model, nodes, folder):
    producers = _producers(model)
    initializers = {i.name for i in model.graph.initializer}
    for node in nodes:
        add = producers[node.input[0]]
        assert add.op_type == "Add" and any(i in initializers for i in add.input), f"{node.name}: no QKV bias Add"


def _phi3(model, nodes, folder):
    for node in nodes:
        attrs = _attributes(node)
        assert attrs["num_heads"] == attrs["kv_num_heads"]
        widths = _if_branch_cos_widths(model, node.input[7])
        assert widths, f"{node.name}: cos_cache does not come from an If node"
        assert all(2 * w < _head_size(folder) for w in widths), (widths, _head_size(folder))  # partial rotary


def _custom_scale(model, nodes, folder):
    for node in nodes:
        assert not math.isclose(_attributes(node)["scale"], _head_size(folder) ** -0.5)


def _head_sink_values(model, nodes, folder):
    initializers = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in nodes:
        sink = initializers[node.input[11]]
        assert sink.shape == (_attributes(node)["num_heads"],) and np.abs(sink).max() > 1, sink


def _rotary_base_per_kind(model, nodes, folder):
    """Gemma 3: sliding layers read one cos/sin cache (local theta), full layers another (global theta)."""
    initializers = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    caches = {_attributes(n)["local_window_size"] > 0: (n.input[7], n.input[8]) for n in nodes}
    assert len({caches[True], caches[False]}) == 2, caches
    assert not np.allclose(initializers[caches[True][0]], initializers[caches[False][0]])


def _head_size_per_kind(model, nodes, folder):
    """Gemma 4: the sliding layers' head size (16, genai_config.json's) differs from the full layers' (32), in the
    declared past shapes and in GQA's query width."""
    sizes = {}
    for node in nodes:
        dims = next(i for i in model.graph.input if i.name == node.input[3]).type.tensor_type.shape.dim
        sizes.setdefault(_attributes(node)["local_window_size"] > 0, set()).add(dims[3].dim_value)
    assert sizes == {True: {_head_size(folder)}, False: {2 * _head_size(folder)}}, sizes


def _matmul_nbits_zero_points(model, nodes, folder):
    """builder-llama-int4-zp: every MatMulNBits has packed uint8 zero points and block size 16 at accuracy_level 4
    (builder-llama-int4 has none: block size 32, accuracy_level 1)."""
    matmuls = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert matmuls
    for node in matmuls:
        attrs = _attributes(node)
        assert len(node.input) > 3 and node.input[3], node.name
        assert (attrs["block_size"], attrs["accuracy_level"]) == (16, 4), attrs


EXTRA_CHECKS = {
    "builder-llama-int4-zp": (_matmul_nbits_zero_points,),
    "builder-qwen2": (_qkv_bias,),
    "builder-phi3": (_phi3,),
    "builder-gemma2": (_custom_scale,),
    "builder-gemma3": (_custom_scale, _rotary_base_per_kind),
    "builder-gpt-oss": (_qkv_bias, _head_sink_values),
    "builder-gpt-oss-fp16": (_qkv_bias, _head_sink_values),
    "builder-gemma4": (_head_size_per_kind,),
    "builder-gemma4-webgpu-fp16": (_head_size_per_kind,),
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
def test_fixture_has_its_form(folder, record_property):
    model = _original(folder)
    nodes = _gqa_nodes(model)
    assert nodes, "no GroupQueryAttention node"
    form = _form(folder)
    record_property("gqa_form", dataclasses.asdict(form))
    print(f"\n{folder}: {form}")  # shown with -s / -rP
    assert folder in FORMS, f"say in FORMS which GQA form {folder} is a fixture for"
    assert form == FORMS[folder]
    for check in EXTRA_CHECKS.get(folder, ()):
        check(model, nodes, folder)


def test_fixture_forms_are_distinct():
    """One fixture per form: two fixtures with the same form (and no extra check) would be duplicates."""
    seen = {}
    for folder, form in FORMS.items():
        key = (form, EXTRA_CHECKS.get(folder))
        assert key not in seen, (folder, seen.get(key))
        seen[key] = folder


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


def _cache_shapes(folder: str) -> dict[str, tuple[int, int, int]]:
    """(kv heads, head size, first past rows) for each past input: heads from the graph input, head size from
    it too when static (Gemma 4's differ per layer), else from genai_config.json (the symbolic ``kv_cache_dim``). A windowed
    cache (sliding_window_cache=1) starts full-size (capacity W, as onnxruntime-genai allocates it), a growing
    one empty."""
    model = _original(folder)
    by_past = {node.input[3]: node for node in _gqa_nodes(model)}
    shapes = {}
    for name in _past_names(model):
        node = by_past.get(name) or next(n for n in _gqa_nodes(model) if n.input[4] == name)
        dims = next(i for i in model.graph.input if i.name == name).type.tensor_type.shape.dim
        attributes = _attributes(node)
        heads = dims[1].dim_value or attributes["kv_num_heads"]
        rows = attributes["local_window_size"] if attributes.get("sliding_window_cache") else 0
        shapes[name] = (heads, dims[3].dim_value or _head_size(folder), rows)  # Gemma 4: per-layer head size
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
    history = _generate_reference(decomposed, _cache_shapes(folder), reference)
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
    positions = any(i.name == "position_ids" for i in model.graph.input)  # a separate RotaryEmbedding reads them
    feeds = {"input_ids": input_ids, "attention_mask": np.ones((1, length), np.int64), **past}
    if positions:
        feeds["position_ids"] = np.arange(length, dtype=np.int64)[None]
    prefill = _run(session, feeds)
    presents = {name: prefill[name.replace("past_key_values", "present")] for name in past}
    decode_feeds = {
        "input_ids": reference["next_id"],
        "attention_mask": np.ones((1, length + 1), np.int64),
        **presents,
    }
    if positions:
        decode_feeds["position_ids"] = np.array([[length]], np.int64)
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
