"""Builders of small GroupQueryAttention models for the tests."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper

IR_VERSION = 10  # onnx 1.23 writes 14 by default; ONNX Runtime 1.31 reads up to 13

_ELEM = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}
_NP = {"float32": np.float32, "float16": np.float16}


@dataclasses.dataclass(frozen=True)
class GqaConfig:
    num_heads: int = 4
    kv_num_heads: int = 2
    head_size: int = 16
    packed: bool = False
    past: bool = True
    rotary: str = "off"  # off | half | interleaved
    rotary_dim: int | None = None  # R; None means the whole head
    dtype: str = "float32"
    static_dims: bool = False  # all dims static (B=2, S=5, P=8) instead of symbolic
    scale: float = 0.0
    local_window_size: int = -1
    softcap: float = 0.0
    smooth_softmax: int | None = None
    head_sink: bool = False
    attention_bias: str | None = (
        None  # None | "full" | "broadcast" (1, 1, S, T) | "heads" (1, N, ..) | "batch" (B, 1, ..)
    )
    position_ids: bool = False
    qk_output: int = 0
    causal: int | None = None
    kv_empty: bool = False
    present: bool = True
    positions: int = 64  # cos/sin cache rows
    extra_attributes: tuple[tuple[str, object], ...] = ()
    opset: int = 21
    kv_quant: str | None = None  # PER_TENSOR | PER_CHANNEL
    kv_bits: int = 8  # with kv_quant: 8 (int8 cache) or 4 (uint8, two values a byte)
    # (B, S, P, T) of the graph inputs, each an int (static) or None (symbolic); overrides static_dims
    sizes: tuple[int | None, int | None, int | None, int | None] | None = None
    seqlens_shape: str = "B"  # B | B1 | 1B: seqlens_k as (B,), (B, 1) or (1, B)
    total_shape: str = "scalar"  # scalar | 1: total_sequence_length as () or (1,)
    rotary_as_input: str | None = None  # None (initializers) | "static" | "symbolic": cos/sin as graph inputs
    qk_norm: str = ""  # "", "q", "k" or "qk": which of q_norm_weight / k_norm_weight are given
    qk_norm_constant: bool = True  # norm weights as initializers (as exporters emit) or graph inputs
    qk_norm_epsilon: float | None = None


def make_gqa_model(config: GqaConfig, name: str = "attn/GroupQueryAttention") -> onnx.ModelProto:
    """A model holding one GQA node whose inputs are graph inputs (cos/sin are initializers)."""
    n, nkv, h = config.num_heads, config.kv_num_heads, config.head_size
    elem = _ELEM[config.dtype]
    if config.sizes is not None:
        symbols = ("batch", "sequence", "past_sequence", "total_sequence")
        batch, seq, past, total = (symbol if size is None else size for size, symbol in zip(config.sizes, symbols))
    elif config.static_dims:
        batch, seq, past, total = 2, 5, 8, 5
    else:
        batch, seq, past, total = "batch", "sequence", "past_sequence", "total_sequence"
    inputs, initializers = [], []
    names = [""] * 16

    def add_input(index: int, label: str, elem_type: int, dims) -> None:
        inputs.append(helper.make_tensor_value_info(label, elem_type, dims))
        names[index] = label

    query_hidden = (n + 2 * nkv) * h if config.packed else n * h
    add_input(0, "query", elem, [batch, seq, query_hidden])
    if not config.packed:
        kv_length = 0 if config.kv_empty else seq
        add_input(1, "key", elem, [batch, kv_length, nkv * h])
        add_input(2, "value", elem, [batch, kv_length, nkv * h])
    cache_elem, cache_width = elem, h
    if config.kv_quant:
        cache_elem = TensorProto.INT8 if config.kv_bits == 8 else TensorProto.UINT8
        cache_width = h if config.kv_bits == 8 else h // 2
    if config.past:
        add_input(3, "past_key", cache_elem, [batch, nkv, past, cache_width])
        add_input(4, "past_value", cache_elem, [batch, nkv, past, cache_width])
    seqlens_dims = {"B": [batch], "B1": [batch, 1], "1B": [1, batch]}[config.seqlens_shape]
    add_input(5, "seqlens_k", TensorProto.INT32, seqlens_dims)
    add_input(6, "total_sequence_length", TensorProto.INT32, [] if config.total_shape == "scalar" else [1])
    if config.rotary != "off" and config.rotary_as_input:
        half = (config.rotary_dim or h) // 2
        dims = [config.positions, half] if config.rotary_as_input == "static" else ["positions", "rotary_half"]
        add_input(7, "cos_cache", elem, dims)
        add_input(8, "sin_cache", elem, dims)
    elif config.rotary != "off":
        half = (config.rotary_dim or h) // 2
        rng = np.random.default_rng(1)
        angles = rng.uniform(-np.pi, np.pi, (config.positions, half))
        np_type = _NP.get(config.dtype, np.float32)
        for index, label, table in ((7, "cos_cache", np.cos(angles)), (8, "sin_cache", np.sin(angles))):
            tensor = onnx.numpy_helper.from_array(table.astype(np_type), label)
            if config.dtype == "bfloat16":
                tensor = helper.make_tensor(label, elem, table.shape, table.astype(np.float32).ravel())
            initializers.append(tensor)
            names[index] = label
    if config.position_ids:
        add_input(9, "position_ids", TensorProto.INT64, [batch, seq])
    if config.attention_bias == "full":
        add_input(10, "attention_bias", elem, [batch, n, seq, total])
    elif config.attention_bias == "broadcast":
        add_input(10, "attention_bias", elem, [1, 1, seq, total])
    elif config.attention_bias == "heads":
        add_input(10, "attention_bias", elem, [1, n, seq, total])
    elif config.attention_bias == "batch":
        add_input(10, "attention_bias", elem, [batch, 1, seq, total])
    if config.head_sink:
        add_input(11, "head_sink", elem, [n])
    if config.kv_quant:
        scale_size = nkv * h if config.kv_quant == "PER_CHANNEL" else 1
        add_input(12, "k_scale", TensorProto.FLOAT, [scale_size])
        add_input(13, "v_scale", TensorProto.FLOAT, [scale_size])
    for index, which in ((14, "q"), (15, "k")):
        if which not in config.qk_norm:
            continue
        label = f"{which}_norm_weight"
        names[index] = label
        if not config.qk_norm_constant:
            add_input(index, label, elem, [h])
            continue
        weight = 1.0 + 0.5 * np.random.default_rng(index).standard_normal(h)
        if config.dtype == "bfloat16":
            initializers.append(helper.make_tensor(label, elem, [h], weight.astype(np.float32)))
        else:
            initializers.append(onnx.numpy_helper.from_array(weight.astype(_NP[config.dtype]), label))
    while names and names[-1] == "":
        names.pop()

    attributes = {"num_heads": n, "kv_num_heads": nkv}
    if config.scale:
        attributes["scale"] = config.scale
    if config.rotary != "off":
        attributes["do_rotary"] = 1
        attributes["rotary_interleaved"] = int(config.rotary == "interleaved")
    if config.local_window_size != -1:
        attributes["local_window_size"] = config.local_window_size
    if config.softcap:
        attributes["softcap"] = config.softcap
    if config.smooth_softmax is not None:
        attributes["smooth_softmax"] = config.smooth_softmax
    if config.qk_output:
        attributes["qk_output"] = config.qk_output
    if config.causal is not None:
        attributes["causal"] = config.causal
    if config.kv_quant:
        attributes.update(k_quant_type=config.kv_quant, v_quant_type=config.kv_quant, kv_cache_bit_width=config.kv_bits)
    if config.qk_norm_epsilon is not None:
        attributes["qk_norm_epsilon"] = config.qk_norm_epsilon
    attributes.update(dict(config.extra_attributes))

    outputs = [helper.make_tensor_value_info("output", elem, [batch, seq, n * h])]
    output_names = ["output"]
    if config.present:
        present_dims = [batch, nkv, None, cache_width]
        outputs += [
            helper.make_tensor_value_info("present_key", cache_elem, present_dims),
            helper.make_tensor_value_info("present_value", cache_elem, present_dims),
        ]
        output_names += ["present_key", "present_value"]
    if config.qk_output:
        if not config.present:
            output_names += ["", ""]
        outputs.append(helper.make_tensor_value_info("output_qk", elem, [batch, n, seq, total]))
        output_names.append("output_qk")
    node = helper.make_node("GroupQueryAttention", names, output_names, name=name, domain="com.microsoft", **attributes)
    graph = helper.make_graph([node], "gqa", inputs, outputs, initializers)
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", config.opset), helper.make_opsetid("com.microsoft", 1)],
        ir_version=IR_VERSION,
    )


def gqa_node(model: onnx.ModelProto) -> tuple[ir.Model, ir.Node]:
    ir_model = ir.serde.deserialize_model(model)
    node = next(n for n in ir_model.graph if n.op_type == "GroupQueryAttention")
    return ir_model, node


def all_nodes(graph: onnx.GraphProto):
    """Every node of ``graph`` and of the subgraphs (If/Loop bodies) nested in it, depth first."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from all_nodes(attribute.g)
            for subgraph in attribute.graphs:
                yield from all_nodes(subgraph)
