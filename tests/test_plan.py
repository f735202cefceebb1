"""The planner: every node, where it sits, its opset, target and spec, and the refusals, before anything is touched."""

from __future__ import annotations

import onnx_ir as ir
import pytest
from gqa_models import GqaConfig, make_gqa_model
from test_structure import _wrap_in_function, _wrap_in_if

import gqa_decompose
from gqa_decompose.errors import GqaDecomposeError
from gqa_decompose.passes import InferGqaTypesPass
from gqa_decompose.plan import plan_gqa
from gqa_decompose.spec import DecomposeOptions


def _serialized(model: ir.Model) -> bytes:
    return ir.serde.serialize_model(model).SerializeToString(deterministic=True)


def test_nodes_in_both_branches_are_planned_and_the_model_is_not_touched():
    model = ir.serde.deserialize_model(_wrap_in_if(make_gqa_model(GqaConfig(past=False, present=False))))
    before = _serialized(model)
    plan = plan_gqa(model, DecomposeOptions())
    assert [item.scope.split()[0] for item in plan.nodes] == ["subgraph", "subgraph"]
    assert all(item.spec is not None and item.target == "primitives" and item.refusal is None for item in plan.nodes)
    assert plan.raised_opset is None
    assert _serialized(model) == before


def test_a_function_node_takes_its_functions_opset_and_the_target_it_allows():
    model = _wrap_in_function(make_gqa_model(GqaConfig(past=False, present=False)), opset=24)
    for opset in model.opset_import:
        if opset.domain == "":
            opset.version = 21
    typed = ir.serde.deserialize_model(model)
    InferGqaTypesPass()(typed)  # a function body is untyped in ONNX; the planner takes a typed model
    (item,) = plan_gqa(typed, DecomposeOptions(target="attention")).nodes
    assert (item.scope, item.opset, item.target, item.fallback) == ("function local::Attention", 24, "attention", None)


def test_refusals_are_collected_and_the_first_is_the_one_the_rewrite_raises():
    proto = make_gqa_model(GqaConfig())
    for attribute in proto.graph.node[0].attribute:
        if attribute.name == "num_heads":
            attribute.i = 3  # not a multiple of kv_num_heads
    plan = plan_gqa(ir.serde.deserialize_model(proto), DecomposeOptions())
    (item,) = plan.refused
    assert item.spec is None and item.target is None
    with pytest.raises(GqaDecomposeError) as planned:
        plan.raise_first_refusal()
    with pytest.raises(GqaDecomposeError) as rewritten:
        gqa_decompose.decompose(proto)
    assert str(planned.value) == str(rewritten.value)
    gate = gqa_decompose.check(proto, verify_mode="none")
    assert [(n.status, n.reason) for n in gate.nodes] == [("refused", planned.value.reason)]


def test_ops_leaving_gqa_out_plan_no_gqa_node():
    model = ir.serde.deserialize_model(make_gqa_model(GqaConfig()))
    assert plan_gqa(model, DecomposeOptions(ops=("RotaryEmbedding",))).nodes == ()
