"""The rewrite's output is shape-clean (issue 14): after ONNX shape inference with data propagation, every value
an emitted node produces has a known rank, and static dims when the model's inputs are static.

Compilers that read shapes ahead of time (IREE, TVM, onnx2tf) need this: a Split whose sizes come from a computed
Concat leaves every value downstream without a shape, and crashed IREE's Reshape lowering."""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib

import numpy as np
import onnx
import pytest

import gqa_decompose
from tests.gqa_models import GqaConfig, make_gqa_model

MODELS = pathlib.Path(__file__).resolve().parent.parent / "models"
FIXTURES = sorted(path.parent.name for path in MODELS.glob("*/model.onnx")) + ["tiny-llama-gqa.onnx"]
# T = total_sequence_length is read from the mask's or position_ids' contents here, not from a shape: the
# attention's columns and the present's rows depend on data, and only a known rank can be asked for.
DATA_DEPENDENT_TOTAL = {"builder-mistral-webgpu", "dynamo-qwen3", "dynamo-tiny-llama"}
# The builder's cpu fp16 graph builds its 4-D additive mask (and repeats the KV heads) with Expands whose shapes
# go through Where(Equal(ConstantOfShape(...), -1), ...): ONNX's data propagation stops there, so the mask's dims
# (the producer's values, before any emitted one) are unknown even with static inputs, and so are the scores'
# dims it is added to. Only a rank can be asked for.
SHAPE_OPAQUE_PRODUCER = {"builder-llama-cpu-fp16"}
PHASES = {"prompt": (5, 0), "decode": (1, 8)}  # (S, P): a first prompt with empty past, a step with 8 past rows

ONE_NODE_CONFIGS = {
    "plain": GqaConfig(),
    "rotary-half": GqaConfig(rotary="half"),
    "rotary-interleaved-partial": GqaConfig(head_size=32, rotary="interleaved", rotary_dim=16),
    "packed-window": GqaConfig(packed=True, rotary="half", local_window_size=3),
    "softcap-sink-bias": GqaConfig(softcap=30.0, head_sink=True, attention_bias="broadcast"),
    "qk-norm-position-ids": GqaConfig(qk_norm="qk", rotary="half", position_ids=True),
    "int8-cache": GqaConfig(kv_quant="PER_CHANNEL"),
    "int4-cache-rotary-input": GqaConfig(kv_quant="PER_TENSOR", kv_bits=4, rotary="half", rotary_as_input="static"),
    "fp16-qk-output": GqaConfig(dtype="float16", qk_output=1),
}


def _path(fixture: str) -> pathlib.Path:
    return MODELS / fixture if fixture.endswith(".onnx") else MODELS / fixture / "model.onnx"


def _head_size(fixture: str) -> int | None:
    config = _path(fixture).parent / "genai_config.json"
    return json.loads(config.read_text())["model"]["decoder"]["head_size"] if config.exists() else None


def _window(model: onnx.ModelProto) -> int:
    windows = [
        attribute.i
        for node in model.graph.node
        for attribute in node.attribute
        if node.op_type == "GroupQueryAttention" and attribute.name == "local_window_size"
    ]
    return max(windows)


def _fix_dims(model: onnx.ModelProto, fixture: str, seq: int, past: int) -> None:
    """Replace the inputs' symbolic dims by batch 1, S, P and S + P, wherever they occur (as
    onnx.tools.update_model_dims does, and in the exporter's value_info too, which would keep them)."""
    sizes = {}
    for value in model.graph.input:
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param"):
                sizes[dim.dim_param] = _size(model, fixture, dim.dim_param, seq, past)
    for value in (*model.graph.input, *model.graph.output, *model.graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if not dim.HasField("dim_param"):
                continue
            size = sizes.get(dim.dim_param)
            dim.Clear()  # an exporter's own symbol ("head_dim / 2") becomes unknown: inference finds it
            if size is not None:
                dim.dim_value = size


def _size(model: onnx.ModelProto, fixture: str, name: str, seq: int, past: int) -> int:
    if "batch" in name:
        return 1
    if name == "past_sliding_length":  # a sliding-window cache holds its window's rows
        return _window(model)
    if "total" in name:
        return seq + past
    if "past" in name:
        return past
    if "seq" in name:
        return seq
    if name == "kv_cache_dim":
        return _head_size(fixture)
    raise AssertionError(f"{fixture}: unknown symbolic dim {name!r}")


def shape_unclean(original: onnx.ModelProto, decomposed: onnx.ModelProto, static: bool = True) -> list[str]:
    """The values emitted nodes produce that lack a rank (or, when ``static``, a static dim) after shape
    inference."""
    known = {name for node in original.graph.node for name in node.output}
    known |= {value.name for value in original.graph.input} | {init.name for init in original.graph.initializer}
    inferred = onnx.shape_inference.infer_shapes(decomposed, strict_mode=False, data_prop=True)
    types = {value.name: value.type for value in (*inferred.graph.value_info, *inferred.graph.output)}
    bad = []
    for node in inferred.graph.node:
        for name in node.output:
            if not name or name in known:
                continue
            kind = types.get(name)
            if kind is None or not kind.tensor_type.HasField("shape"):
                bad.append(f"{name} ({node.op_type}): no rank")
            elif static and any(not dim.HasField("dim_value") for dim in kind.tensor_type.shape.dim):
                dims = [dim.dim_value if dim.HasField("dim_value") else "?" for dim in kind.tensor_type.shape.dim]
                bad.append(f"{name} ({node.op_type}): dims {dims}")
    return bad


@functools.cache
def _fixture(fixture: str) -> onnx.ModelProto:
    return onnx.load(_path(fixture))


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("fixture", FIXTURES)
def test_fixture_is_shape_clean(fixture, phase):
    seq, past = PHASES[phase]
    model = onnx.ModelProto()
    model.CopyFrom(_fixture(fixture))
    _fix_dims(model, fixture, seq, past)
    static = fixture not in DATA_DEPENDENT_TOTAL | SHAPE_OPAQUE_PRODUCER
    bad = shape_unclean(model, gqa_decompose.decompose(model), static=static)
    assert not bad, f"{len(bad)} values: " + "\n".join(bad[:20])


def _one_node(config: GqaConfig, seq: int, past: int) -> onnx.ModelProto:
    """The one-node model with static inputs, T a constant as exporters derive it from the mask's shape."""
    model = make_gqa_model(dataclasses.replace(config, sizes=(1, seq, past, seq + past)))
    total = next(value for value in model.graph.input if value.name == "total_sequence_length")
    model.graph.input.remove(total)
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(seq + past, np.int32), total.name))
    return model


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("name", ONE_NODE_CONFIGS)
def test_one_node_is_shape_clean(name, phase):
    seq, past = PHASES[phase]
    model = _one_node(ONE_NODE_CONFIGS[name], seq, past)
    bad = shape_unclean(model, gqa_decompose.decompose(model))
    assert not bad, f"{len(bad)} values: " + "\n".join(bad[:20])


_SHAPE_INPUTS = {"Split": (1,), "Reshape": (1,), "Pad": (1,), "Slice": (1, 2, 3), "Expand": (1,), "Tile": (1,)}


@pytest.mark.parametrize("fixture", ["tiny-llama-gqa.onnx", "builder-tiny-llama", "builder-phi3", "builder-gemma3"])
def test_shape_operands_are_constants(fixture):
    """The sizes shape inference must read (Split, Reshape, Pad, Slice, Expand, Tile) are Constants when the
    inputs are static, never computed from constants (the rotary Split's Concat(Constant, Constant) crashed IREE)."""
    model = onnx.ModelProto()
    model.CopyFrom(_fixture(fixture))
    _fix_dims(model, fixture, *PHASES["decode"])
    decomposed = gqa_decompose.decompose(model)
    constants = {name for node in decomposed.graph.node if node.op_type == "Constant" for name in node.output}
    constants |= {init.name for init in decomposed.graph.initializer}
    computed = [
        f"{node.name} input {index}: {node.input[index]}"
        for node in decomposed.graph.node
        if node.name not in {n.name for n in model.graph.node}
        for index in _SHAPE_INPUTS.get(node.op_type, ())
        if index < len(node.input) and node.input[index] and node.input[index] not in constants
    ]
    assert not computed, "\n".join(computed[:20])
