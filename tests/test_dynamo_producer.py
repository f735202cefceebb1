"""Real-producer fixture from the second producer family: ``models/dynamo-tiny-llama/model.onnx``, a tiny
random-weight Llama exported by ``torch.onnx.export(..., dynamo=True)`` and fused by onnxscript's
``optimize_for_ort`` (made by ``scripts/make_dynamo_fixture.py``; see the folder's PROVENANCE.md).

Its GroupQueryAttention differs from the builder fixtures': separate Q/K/V, no ``scale`` attribute, ``do_rotary=1``
with cos/sin caches computed in the graph (``Cos``/``Sin`` nodes whose row count follows ``max(position_ids)``),
``seqlens_k`` / ``total_sequence_length`` derived from ``position_ids`` (the ``attention_mask`` input is unused),
and separate growing past/present buffers.

* (a) the decomposition leaves no GroupQueryAttention;
* (b) ``gqa_decompose.verify`` passes node by node, and the nodes have the features above;
* (c) the whole decomposed model matches the original on ONNX Runtime: a right-padded batch-2 prompt, then
  decode steps (and, batch 1, a multi-token chunk) with the presents fed back as pasts;
* (d) both reproduce the torch logits in ``reference.npz``.
"""

from __future__ import annotations

import functools
import pathlib

import numpy as np
import onnx
import pytest
from test_models import _run, _session
from test_real_producers import _attributes, _gqa_nodes, _producers

import gqa_decompose

FOLDER = pathlib.Path(__file__).parent.parent / "models" / "dynamo-tiny-llama"
MODEL = FOLDER / "model.onnx"
REFERENCE = FOLDER / "reference.npz"

pytestmark = pytest.mark.skipif(not MODEL.exists(), reason=f"fixture {MODEL} is absent")

LOGITS_ATOL = 1e-4
PRESENT_ATOL = 1e-5
TORCH_ATOL = 1e-4


@functools.cache
def _original() -> onnx.ModelProto:
    return onnx.load(MODEL)


@functools.cache
def _decomposed() -> onnx.ModelProto:
    return gqa_decompose.decompose(_original())


def _ancestors(model: onnx.ModelProto, name: str) -> tuple[set[str], set[str]]:
    """Graph inputs and op types that ``name`` is computed from."""
    producers = _producers(model)
    inputs = {i.name for i in model.graph.input}
    seen, found_inputs, ops = set(), set(), set()
    stack = [name]
    while stack:
        current = stack.pop()
        if current in seen or not current:
            continue
        seen.add(current)
        if current in inputs:
            found_inputs.add(current)
        node = producers.get(current)
        if node is not None:
            ops.add(node.op_type)
            stack.extend(node.input)
    return found_inputs, ops


def _past_names(model: onnx.ModelProto) -> list[str]:
    return [i.name for i in model.graph.input if i.name.startswith("past_key_values")]


def _cache_shape(model: onnx.ModelProto) -> tuple[int, int]:
    """(kv heads, head size): static dims 1 and 3 of the past inputs ([batch, 2, past_seq, 16])."""
    dims = next(i for i in model.graph.input if i.name.startswith("past_key_values")).type.tensor_type.shape.dim
    assert dims[1].dim_value and dims[3].dim_value, "expected static kv-head and head-size dims"
    return dims[1].dim_value, dims[3].dim_value


# (a) decomposition ---------------------------------------------------------------------------------------------


def test_decomposes_without_leftover_gqa():
    assert _gqa_nodes(_original()), "the fixture has no GroupQueryAttention node"
    decomposed = _decomposed()
    assert not _gqa_nodes(decomposed)
    assert not any(n.domain == "com.microsoft" and "Attention" in n.op_type for n in decomposed.graph.node)


# (b) node-level verification and what the producer emits -------------------------------------------------------


def test_gqa_nodes_have_the_dynamo_producer_form(record_property):
    model = _original()
    nodes = _gqa_nodes(model)
    initializers = {i.name for i in model.graph.initializer}
    producers = _producers(model)
    summary = {}
    print("\ndynamo-tiny-llama:")  # shown with -s / -rP
    for node in nodes:
        attrs = _attributes(node)
        inputs = list(node.input) + [""] * (11 - len(node.input))
        seqlens_from, _ = _ancestors(model, inputs[5])
        total_from, _ = _ancestors(model, inputs[6])
        cos_from, cos_ops = _ancestors(model, inputs[7])
        summary[node.name] = {
            "attributes": attrs,
            "separate_qkv": bool(inputs[1] and inputs[2]),
            "past": (inputs[3], inputs[4]),
            "seqlens_k_from": sorted(seqlens_from),
            "total_sequence_length_from": sorted(total_from),
            "cos_cache_producer": producers[inputs[7]].op_type if inputs[7] in producers else "initializer",
            "cos_cache_from": sorted(cos_from),
            "sin_cache_producer": producers[inputs[8]].op_type if inputs[8] in producers else "initializer",
        }
        print(f"  {node.name}: {summary[node.name]}")

        assert "scale" not in attrs  # default 1/sqrt(head_size)
        assert attrs["do_rotary"] == 1 and attrs.get("rotary_interleaved", 0) == 0
        assert attrs["num_heads"] == 4 and attrs["kv_num_heads"] == 2
        assert not any(attrs.get(a) for a in ("softcap", "smooth_softmax", "qk_output"))
        assert attrs.get("local_window_size", -1) == -1
        assert inputs[1] and inputs[2], "expected separate Q/K/V"
        assert inputs[3].startswith("past_key_values") and inputs[4].startswith("past_key_values")
        # cos/sin: computed in the graph from position_ids, not constant tables
        assert inputs[7] not in initializers and inputs[8] not in initializers
        assert producers[inputs[7]].op_type == "Cos" and producers[inputs[8]].op_type == "Sin"
        assert cos_from == {"position_ids"} and "Range" in cos_ops
        # lengths: from position_ids alone
        assert seqlens_from == {"position_ids"} and total_from == {"position_ids"}
        assert not any(inputs[9:]), "no position_ids / attention_bias / head_sink inputs"
    record_property("gqa_nodes", summary)
    # the fused graph leaves attention_mask unused
    assert not any("attention_mask" in n.input for n in model.graph.node)


def test_verify_passes():
    report = gqa_decompose.verify(_original(), _decomposed())
    failures = [
        (node.name, node.skipped, [(r.phase.name, r.failure) for r in node.results if not r.passed])
        for node in report.nodes
        if not node.passed
    ]
    assert report.passed, failures
    assert len(report.nodes) == len(_gqa_nodes(_original()))
    assert not any(node.skipped for node in report.nodes), failures


# (c) whole-model parity ------------------------------------------------------------------------------------------


def _generate(model: onnx.ModelProto, prompt_ids, prompt_mask, chunks, seed=0):
    """The prompt, then one step per entry of ``chunks`` (that many new tokens for every row), the presents fed back
    as pasts; position_ids = cumsum(mask) - 1 (clipped at 0), as a right-padded batch gives them. Returns each
    step's feeds and outputs."""
    session = _session(model)
    heads, head_size = _cache_shape(_original())
    batch = prompt_ids.shape[0]
    past = {name: np.zeros((batch, heads, 0, head_size), np.float32) for name in _past_names(model)}
    rng = np.random.default_rng(seed)
    ids, mask = prompt_ids, prompt_mask
    history = []
    for chunk in [None, *chunks]:
        if chunk is not None:
            ids = rng.integers(0, 96, (batch, chunk)).astype(np.int64)
            mask = np.concatenate([mask, np.ones((batch, chunk), np.int64)], axis=1)
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)[:, -ids.shape[1] :].astype(np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, **past}
        outputs = _run(session, feeds)
        history.append((feeds, outputs))
        past = {name: outputs[name.replace("past_key_values", "present")] for name in past}
    return history


def _compare(expected_history, got_history):
    """Max errors on what ORT defines: logits of valid query rows, present rows < each row's length."""
    worst_logits = worst_present = 0.0
    for step, ((feeds, expected), (_, got)) in enumerate(zip(expected_history, got_history, strict=True)):
        lengths = feeds["attention_mask"].sum(axis=1)
        query_length = feeds["input_ids"].shape[1]
        for b, length in enumerate(lengths):
            rows = min(length, query_length) if step == 0 else query_length
            diff = np.abs(expected["logits"][b, :rows] - got["logits"][b, :rows])
            worst_logits = max(worst_logits, float(diff.max()))
            for name in expected:
                if name.startswith("present"):
                    assert expected[name].shape[2] >= length and got[name].shape[2] >= length, name
                    diff = np.abs(expected[name][b, :, :length] - got[name][b, :, :length])
                    worst_present = max(worst_present, float(diff.max()))
    return worst_logits, worst_present


@pytest.mark.parametrize(
    ("batch", "prompt_length", "chunks"),
    [
        pytest.param(2, 6, [1, 1], id="batch2-prompt6-decode2"),
        # ORT's GQA takes a multi-token step after a past only for batch 1 ("batch_size must be 1 when
        # sequence_length > 1 and past context is given")
        pytest.param(1, 5, [3, 1], id="batch1-prompt5-chunk3-decode1"),
    ],
)
def test_whole_model_matches_original(batch, prompt_length, chunks):
    rng = np.random.default_rng(5)
    prompt_ids = rng.integers(0, 96, (batch, prompt_length)).astype(np.int64)
    prompt_mask = np.ones((batch, prompt_length), np.int64)
    if batch > 1:
        prompt_mask[1, prompt_length - 2 :] = 0  # right-padded row
    expected = _generate(_original(), prompt_ids, prompt_mask, chunks)
    got = _generate(_decomposed(), prompt_ids, prompt_mask, chunks)
    worst_logits, worst_present = _compare(expected, got)
    print(f"\nmax |diff| logits {worst_logits:.2e}, presents {worst_present:.2e}")
    assert worst_logits <= LOGITS_ATOL and worst_present <= PRESENT_ATOL, (worst_logits, worst_present)


# (d) torch logits ------------------------------------------------------------------------------------------------


def _reference_run(model: onnx.ModelProto, reference):
    """The reference prompt with an empty past, then its greedy next token with the presents as pasts."""
    session = _session(model)
    heads, head_size = _cache_shape(model)  # the rewrite keeps the declared past shapes
    length = reference["input_ids"].shape[1]
    empty = np.zeros((1, heads, 0, head_size), np.float32)
    feeds = {
        "input_ids": reference["input_ids"],
        "attention_mask": reference["attention_mask"],
        "position_ids": reference["position_ids"],
        **{name: empty for name in _past_names(model)},
    }
    prefill = _run(session, feeds)
    decode_feeds = {
        "input_ids": reference["next_id"],
        "attention_mask": np.ones((1, length + 1), np.int64),
        "position_ids": np.array([[length]], np.int64),
        **{name: prefill[name.replace("past_key_values", "present")] for name in _past_names(model)},
    }
    return prefill, _run(session, decode_feeds)


@pytest.mark.skipif(not REFERENCE.exists(), reason="no reference.npz")
@pytest.mark.parametrize("which", ["original", "decomposed"])
def test_matches_torch_logits(which):
    reference = np.load(REFERENCE)
    model = _original() if which == "original" else _decomposed()
    prefill, decode = _reference_run(model, reference)
    np.testing.assert_allclose(prefill["logits"], reference["prefill_logits"], rtol=0, atol=TORCH_ATOL)
    np.testing.assert_allclose(decode["logits"], reference["decode_logits"], rtol=0, atol=TORCH_ATOL)


def test_fixture_is_small_and_loadable_by_ort_1_31():
    assert MODEL.stat().st_size < 1 << 20
    assert _original().ir_version <= 10
