"""Every refusal of ``spec.parse_gqa_node`` that ONNX Runtime 1.31 CPU also rejects, as a one-node model.

Each case: the model, a fragment of our refusal and a fragment of ORT's own message
(at load or at run time, on inputs the model's shapes admit). ``tests/test_refusals.py``
checks both; ``scripts/refusal_table.py`` prints the table of ``docs/refusals.md``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort
from gqa_models import GqaConfig, make_gqa_model
from onnx import TensorProto, helper

# Sizes of the symbolic dims the inputs are fed with: a decode step of a growing cache.
SIZES = {"batch": 2, "sequence": 1, "past_sequence": 4, "total_sequence": 5, "positions": 64}
_NP_TYPES = {
    TensorProto.FLOAT: np.float32,
    TensorProto.FLOAT16: np.float16,
    TensorProto.INT32: np.int32,
    TensorProto.INT64: np.int64,
    TensorProto.INT8: np.int8,
    TensorProto.UINT8: np.uint8,
}


@dataclasses.dataclass(frozen=True)
class RefusalCase:
    build: Callable[[], onnx.ModelProto]
    ours: str  # a fragment of our refusal
    ort: str  # a fragment of ORT's message


def _edit(config: GqaConfig, edit: Callable[[onnx.ModelProto], None]) -> Callable[[], onnx.ModelProto]:
    def build() -> onnx.ModelProto:
        model = make_gqa_model(config)
        edit(model)
        return model

    return build


def _plain(config: GqaConfig) -> Callable[[], onnx.ModelProto]:
    return _edit(config, lambda model: None)


def _graph_input(model: onnx.ModelProto, name: str) -> onnx.ValueInfoProto:
    return next(i for i in model.graph.input if i.name == name)


def _set_input(model: onnx.ModelProto, index: int, name: str, elem: int, dims) -> None:
    node = model.graph.node[0]
    while len(node.input) <= index:
        node.input.append("")
    node.input[index] = name
    existing = [i for i in model.graph.input if i.name == name]
    for value in existing:
        model.graph.input.remove(value)
    model.graph.input.append(helper.make_tensor_value_info(name, elem, dims))


def _drop_input(model: onnx.ModelProto, index: int) -> None:
    node = model.graph.node[0]
    name = node.input[index]
    node.input[index] = ""
    for value in [i for i in model.graph.input if i.name == name]:
        model.graph.input.remove(value)
    for tensor in [t for t in model.graph.initializer if t.name == name]:
        model.graph.initializer.remove(tensor)


def _set_attr(model: onnx.ModelProto, name: str, value) -> None:
    node = model.graph.node[0]
    for attribute in [a for a in node.attribute if a.name == name]:
        node.attribute.remove(attribute)
    node.attribute.append(helper.make_attribute(name, value))


def _del_attr(model: onnx.ModelProto, name: str) -> None:
    node = model.graph.node[0]
    for attribute in [a for a in node.attribute if a.name == name]:
        node.attribute.remove(attribute)


def _set_dims(model: onnx.ModelProto, name: str, dims) -> None:
    value = _graph_input(model, name)
    elem = value.type.tensor_type.elem_type
    value.CopyFrom(helper.make_tensor_value_info(name, elem, dims))


def _rotary_table(model: onnx.ModelProto, name: str, shape) -> None:
    for tensor in model.graph.initializer:
        if tensor.name == name:
            tensor.CopyFrom(onnx.numpy_helper.from_array(np.zeros(shape, np.float32), name))


_QUANT = (("k_quant_type", "PER_TENSOR"), ("v_quant_type", "PER_TENSOR"), ("kv_cache_bit_width", 8))
_SLIDING = (("sliding_window_cache", 1),)

CASES: dict[str, RefusalCase] = {
    "unknown attribute": RefusalCase(
        _plain(GqaConfig(extra_attributes=(("kv_share_buffer", 1),))),
        "unknown attribute",
        "Unrecognized attribute: kv_share_buffer",
    ),
    "num_heads missing": RefusalCase(
        _edit(GqaConfig(), lambda m: _del_attr(m, "num_heads")),
        "'num_heads' is missing",
        "Required attribute 'num_heads' is missing",
    ),
    "kv_num_heads 0": RefusalCase(
        _edit(GqaConfig(), lambda m: _set_attr(m, "kv_num_heads", 0)), "must be > 0", "kv_num_heads > 0"
    ),
    "num_heads not a multiple of kv_num_heads": RefusalCase(
        _plain(GqaConfig(num_heads=6, kv_num_heads=4)),
        "not a multiple of kv_num_heads",
        "num_heads must be a multiple of kv_num_heads",
    ),
    "quantization type unknown": RefusalCase(
        _plain(GqaConfig(extra_attributes=(("k_quant_type", "INT8"), ("v_quant_type", "INT8")))),
        "is not NONE, PER_TENSOR or PER_CHANNEL",
        "Invalid KV quantization type",
    ),
    "k_quant_type != v_quant_type": RefusalCase(
        _plain(GqaConfig(kv_quant="PER_TENSOR", extra_attributes=(("v_quant_type", "PER_CHANNEL"),))),
        "k_quant_type PER_TENSOR != v_quant_type",
        "k_quant_type == v_quant_type",
    ),
    "bit width without quantization": RefusalCase(
        _plain(GqaConfig(extra_attributes=(("kv_cache_bit_width", 8),))),
        "kv_cache_bit_width must be 0",
        "kv_cache_bit_width must be 0 when quantization is disabled",
    ),
    "bit width 2": RefusalCase(
        _plain(GqaConfig(kv_quant="PER_TENSOR", extra_attributes=(("kv_cache_bit_width", 2),))),
        "kv_cache_bit_width must be 4 or 8",
        "kv_cache_bit_width must be 4 or 8",
    ),
    "quantized cache without k_scale": RefusalCase(
        _plain(GqaConfig(extra_attributes=_QUANT)), "k_scale' must be provided", "k_scale must be provided"
    ),
    "k_scale not float": RefusalCase(
        _edit(GqaConfig(kv_quant="PER_TENSOR"), lambda m: _set_input(m, 12, "k_scale", TensorProto.FLOAT16, [1])),
        "'k_scale' must be float",
        "Type Error",
    ),
    "17 inputs": RefusalCase(
        _edit(GqaConfig(), lambda m: _set_input(m, 16, "extra", TensorProto.FLOAT, [1])),
        "has 17 inputs",
        "has input size 17 not in range [min=7, max=16]",
    ),
    "query int32": RefusalCase(
        _edit(
            GqaConfig(past=False),
            lambda m: (
                [
                    _set_input(m, i, n, TensorProto.INT32, d)
                    for i, n, d in (
                        (0, "query", ["batch", "sequence", 64]),
                        (1, "key", ["batch", "sequence", 32]),
                        (2, "value", ["batch", "sequence", 32]),
                    )
                ]
                and None
            ),
        ),
        "query type INT32 is not float",
        "Type Error",
    ),
    "query of rank 2": RefusalCase(
        _edit(GqaConfig(), lambda m: _set_dims(m, "query", ["batch", 64])),
        "query must be 3-D (B, S, hidden)",
        "Inputs 0 (query) shall be 3 dimensions",
    ),
    "head size not a multiple of 8": RefusalCase(
        _plain(GqaConfig(head_size=12)), "head size 12 is not a multiple of 8", "head_size must be a multiple of 8"
    ),
    "packed hidden size not a multiple of N + 2Nkv": RefusalCase(
        _edit(GqaConfig(packed=True), lambda m: _set_dims(m, "query", ["batch", "sequence", 124])),
        "is not a multiple of num_heads + 2*kv_num_heads",
        "Packed query hidden size must be divisible",
    ),
    "key without value": RefusalCase(
        _edit(GqaConfig(), lambda m: _drop_input(m, 2)),
        "key and value must be both present",
        "shall be both present, or both absent",
    ),
    "key type differs from query": RefusalCase(
        _edit(GqaConfig(), lambda m: _set_input(m, 1, "key", TensorProto.FLOAT16, ["batch", "sequence", 32])),
        "key type FLOAT16 differs",
        "Type Error",
    ),
    "key hidden size contradicts the heads": RefusalCase(
        _edit(GqaConfig(), lambda m: [_set_dims(m, n, ["batch", "sequence", 48]) for n in ("key", "value")] and None),
        "contradictory head counts",
        "kv_hidden_size / kv_num_heads must be equal to head_size",
    ),
    "key length != value length": RefusalCase(
        _edit(GqaConfig(static_dims=True), lambda m: _set_dims(m, "value", [2, 4, 32])),
        "key sequence length 5 != value sequence length 4",
        "value",
    ),
    "key length != query length": RefusalCase(
        _edit(GqaConfig(static_dims=True), lambda m: [_set_dims(m, n, [2, 4, 32]) for n in ("key", "value")] and None),
        "key sequence length 4 != query sequence length 5",
        "query and key must have the same sequence length",
    ),
    "past_key without past_value": RefusalCase(
        _edit(GqaConfig(), lambda m: _drop_input(m, 4)),
        "past_key and past_value must be both present",
        "TypeInferenceError",
    ),
    "past of rank 3": RefusalCase(
        _edit(
            GqaConfig(),
            lambda m: [_set_dims(m, n, ["batch", "past_sequence", 32]) for n in ("past_key", "past_value")] and None,
        ),
        "must be 4-D",
        "The past_key input shall be 4 dimensions",
    ),
    "past of another type": RefusalCase(
        _edit(
            GqaConfig(),
            lambda m: (
                [
                    _set_input(m, i, n, TensorProto.FLOAT16, ["batch", 2, "past_sequence", 16])
                    for i, n in ((3, "past_key"), (4, "past_value"))
                ]
                and None
            ),
        ),
        "is not the cache type",
        "Type Error",
    ),
    "past with other KV heads": RefusalCase(
        _edit(
            GqaConfig(),
            lambda m: [_set_dims(m, n, ["batch", 3, "past_sequence", 16]) for n in ("past_key", "past_value")] and None,
        ),
        "does not match kv_num_heads",
        "shall have kv_num_heads",
    ),
    "empty key/value without past": RefusalCase(
        _plain(GqaConfig(kv_empty=True, past=False)),
        "requires a past",
        "query and key must have the same sequence length when past_key is not provided",
    ),
    "quantized cache without past": RefusalCase(
        _plain(GqaConfig(kv_quant="PER_TENSOR", past=False)),
        "needs a past_key/past_value of the quantized type",
        "does not match expected type",
    ),
    "seqlens_k missing": RefusalCase(
        _edit(GqaConfig(), lambda m: _drop_input(m, 5)),
        "'seqlens_k' is missing",
        "input 5 is marked single but has an empty string in the graph",
    ),
    "seqlens_k int64": RefusalCase(
        _edit(GqaConfig(), lambda m: _set_input(m, 5, "seqlens_k", TensorProto.INT64, ["batch"])),
        "'seqlens_k' must be int32",
        "Type Error",
    ),
    "seqlens_k scalar": RefusalCase(
        _edit(GqaConfig(), lambda m: _set_dims(m, "seqlens_k", [])),
        "seqlens_k must be at least 1-D",
        "seqlens_k must be at least 1D",
    ),
    "cos_cache without sin_cache": RefusalCase(
        _edit(GqaConfig(rotary="half"), lambda m: _drop_input(m, 8)),
        "cos_cache and sin_cache must be both",
        "shall be both present or both absent",
    ),
    "cos/sin given, head size not a multiple of 16": RefusalCase(
        _plain(GqaConfig(head_size=24, rotary="half")),
        "must be a multiple of 16",
        "head_size shall be a multiple of 16",
    ),
    "cos/sin shapes differ": RefusalCase(
        _edit(GqaConfig(rotary="half"), lambda m: _rotary_table(m, "sin_cache", (64, 0))),
        "shapes differ",
        "cos_cache and sin_cache must have the same shape",
    ),
    "rotary width not a multiple of 8": RefusalCase(
        _edit(
            GqaConfig(rotary="half"),
            lambda m: [_rotary_table(m, n, (64, 4)) for n in ("cos_cache", "sin_cache")] and None,
        ),
        "must be <= head_size/2 and a multiple of 8",
        "cos_cache dimension 1 must be <= head_size / 2 and a multiple of 8",
    ),
    "cos/sin of another type": RefusalCase(
        _edit(
            GqaConfig(rotary="half", rotary_as_input="static"),
            lambda m: (
                [_set_input(m, i, n, TensorProto.FLOAT16, [64, 8]) for i, n in ((7, "cos_cache"), (8, "sin_cache"))]
                and None
            ),
        ),
        "cos_cache type FLOAT16 differs",
        "Type Error",
    ),
    "do_rotary without cos/sin": RefusalCase(
        _edit(GqaConfig(), lambda m: _set_attr(m, "do_rotary", 1)),
        "do_rotary=1 requires cos_cache",
        "cos_cache and sin_cache must be provided",
    ),
    "attention_bias 3-D": RefusalCase(
        _edit(
            GqaConfig(),
            lambda m: _set_input(m, 10, "attention_bias", TensorProto.FLOAT, ["batch", "sequence", "total_sequence"]),
        ),
        "attention_bias must be 4-D",
        "attention_bias must be a 4D tensor",
    ),
    "attention_bias of 3 heads": RefusalCase(
        _edit(
            GqaConfig(),
            lambda m: _set_input(m, 10, "attention_bias", TensorProto.FLOAT, [1, 3, "sequence", "total_sequence"]),
        ),
        "dimension 1 (3) must be 1 or num_heads",
        "dimension 1 must be equal to the num heads or 1",
    ),
    "attention_bias of another type": RefusalCase(
        _edit(
            GqaConfig(),
            lambda m: _set_input(m, 10, "attention_bias", TensorProto.FLOAT16, [1, 1, "sequence", "total_sequence"]),
        ),
        "attention_bias type FLOAT16 differs",
        "Type Error",
    ),
    "head_sink of 3 heads": RefusalCase(
        _edit(GqaConfig(head_sink=True), lambda m: _set_dims(m, "head_sink", [3])),
        "head_sink must have shape (4,)",
        "head_sink dimension 0 must be equal to the num heads",
    ),
    "head_sink 2-D": RefusalCase(
        _edit(GqaConfig(head_sink=True), lambda m: _set_dims(m, "head_sink", [1, 4])),
        "head_sink must have shape (4,)",
        "head_sink must be a 1D tensor",
    ),
    "causal 2": RefusalCase(_plain(GqaConfig(causal=2)), "causal must be 0 or 1", "causal must be 0 or 1"),
    "causal 0 with a window": RefusalCase(
        _plain(GqaConfig(causal=0, local_window_size=2)),
        "local_window_size must be -1 when causal is 0",
        "local_window_size must be -1 when causal is 0",
    ),
    "qk_output 3": RefusalCase(
        _plain(GqaConfig(extra_attributes=(("qk_output", 3),))),
        "qk_output must be 0, 1 or 2",
        "qk_output attribute received unsupported value",
    ),
    "qk_output without output_qk": RefusalCase(
        _edit(GqaConfig(qk_output=1), lambda m: (m.graph.node[0].output.pop(), m.graph.output.pop()) and None),
        "output_qk output is not provided",
        "qk_output attribute was configured but output buffer was not provided",
    ),
    "windowed cache, window 0": RefusalCase(
        _plain(GqaConfig(extra_attributes=_SLIDING)),
        "requires local_window_size > 0",
        "sliding_window_cache=1 requires local_window_size > 0",
    ),
    "windowed cache without past": RefusalCase(
        _plain(GqaConfig(past=False, local_window_size=2, extra_attributes=_SLIDING)),
        "requires past_key",
        "sliding_window_cache=1 requires past_key and past_value to be present",
    ),
    "windowed cache with empty key/value": RefusalCase(
        _plain(GqaConfig(kv_empty=True, local_window_size=2, extra_attributes=_SLIDING)),
        "shared KV",
        "sliding_window_cache=1 is not supported when kv_sequence_length == 0",
    ),
    "windowed cache with qk_output": RefusalCase(
        _plain(GqaConfig(qk_output=1, local_window_size=2, extra_attributes=_SLIDING)),
        "qk_output is not implemented",
        "qk_output is not implemented with sliding_window_cache=1",
    ),
    "windowed cache smaller than the window": RefusalCase(
        _plain(GqaConfig(static_dims=True, local_window_size=9, extra_attributes=_SLIDING)),
        "capacity 8",
        "KV cache capacity (8) must be at least local_window_size (9)",
    ),
    "windowed 4-bit cache, head size 16": RefusalCase(
        _plain(GqaConfig(kv_quant="PER_TENSOR", kv_bits=4, local_window_size=2, extra_attributes=_SLIDING)),
        "head_size % 32",
        "must be a multiple of 32 for a 4-bit KV cache",
    ),
    "q_norm_weight of the wrong size": RefusalCase(
        _edit(GqaConfig(qk_norm="q", qk_norm_constant=False), lambda m: _set_dims(m, "q_norm_weight", [8])),
        "q_norm_weight must have shape (16,)",
        "q_norm_weight / k_norm_weight inputs are not supported",
    ),
    "present_key without present_value": RefusalCase(
        _edit(GqaConfig(), lambda m: (m.graph.node[0].output.__setitem__(2, ""), m.graph.output.pop(2)) and None),
        "both provided or both omitted",
        "present_key and present_value must both be provided or both omitted",
    ),
}


def feeds_for(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Inputs a decode step of a growing cache would get, shaped by the declared dims."""
    rng = np.random.default_rng(0)
    feeds = {}
    for value in model.graph.input:
        tensor_type = value.type.tensor_type
        shape = tuple(
            d.dim_value if d.HasField("dim_value") else SIZES.get(d.dim_param, 1) for d in tensor_type.shape.dim
        )
        np_type = _NP_TYPES[tensor_type.elem_type]
        if value.name == "seqlens_k":
            feeds[value.name] = np.full(shape, SIZES["total_sequence"] - 1, np_type)
        elif value.name == "total_sequence_length":
            feeds[value.name] = np.full(shape, SIZES["total_sequence"], np_type)
        elif np.issubdtype(np_type, np.integer):
            feeds[value.name] = np.zeros(shape, np_type)
        else:
            feeds[value.name] = (0.05 * rng.standard_normal(shape)).astype(np_type)
    return feeds


def ort_message(model: onnx.ModelProto) -> str | None:
    """ORT CPU's first error line for ``model`` (loading it, then running one decode step); None if it runs."""
    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        session.run(None, feeds_for(model))
    except Exception as error:  # every ORT failure, at load or run time
        return str(error).strip().splitlines()[0]
    return None
