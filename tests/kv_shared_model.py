"""A Gemma 4-style decoder with KV-shared layers, built in memory, in the form ONNX Runtime's KV-sharing work
describes (microsoft/onnxruntime PRs 28242 and 28501, and onnxruntime/mobius's Gemma 4 builder): later layers' GQA
gets empty key/value (``[batch, 0, kv_heads * head_size]`` from ``ConstantOfShape``) and an earlier layer's present
as its past, and declares no present outputs.

onnxruntime-genai's builder cannot make this form (``num_kv_shared_layers`` fails: shared layers have no
``k_proj``), hence a builder here. Layers alternate sliding (head size 256, ``local_window_size``) and full (head
size 512), as Gemma 4's do; the last ``shared`` layers reuse the cache of the last earlier layer of their kind.
Rotary is GQA's own (``do_rotary=1``; only Q is rotated in a shared layer), the full layers' table with Gemma 4's
proportional partial rotary (zero-frequency columns past a quarter of the head). Default-domain opset 24 (the
norms are the standard ``RMSNormalization``), IR 12.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 12  # what onnx writes for opset 24; ONNX Runtime 1.31 reads IR <= 13


@dataclasses.dataclass(frozen=True)
class KvSharedConfig:
    layers: int = 4
    shared: int = 2  # the last `shared` layers read an earlier layer's cache
    hidden: int = 64
    num_heads: int = 2
    kv_num_heads: int = 1
    sliding_head_size: int = 256
    full_head_size: int = 512
    window: int = 4  # local_window_size of the sliding layers
    vocab: int = 32
    positions: int = 64  # cos/sin rows
    dtype: str = "float32"  # or "float16"
    weight_std: float = 0.2  # attention scores of std ~2.5: far from uniform
    opset: int = 24
    seed: int = 0

    def is_sliding(self, layer: int) -> bool:
        return layer % 2 == 0

    def head_size(self, layer: int) -> int:
        return self.sliding_head_size if self.is_sliding(layer) else self.full_head_size

    def source(self, layer: int) -> int | None:
        """The layer whose cache ``layer`` reads, or None when it has its own."""
        first_shared = self.layers - self.shared
        if layer < first_shared:
            return None
        return max(i for i in range(first_shared) if self.is_sliding(i) == self.is_sliding(layer))


def _rotary_tables(head_size: int, positions: int, theta: float, partial: float) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [positions, head_size / 2]; the columns past ``partial`` of the angles have frequency 0."""
    rotated = int(partial * head_size // 2)
    inv_freq = 1.0 / theta ** (np.arange(0, 2 * rotated, 2, dtype=np.float64) / head_size)
    inv_freq = np.concatenate([inv_freq, np.zeros(head_size // 2 - rotated)])
    angles = np.outer(np.arange(positions, dtype=np.float64), inv_freq)
    return np.cos(angles), np.sin(angles)


def make_kv_shared_model(config: KvSharedConfig = KvSharedConfig()) -> onnx.ModelProto:
    """The decoder: ``input_ids`` [batch, sequence_length], ``attention_mask`` [batch, total_sequence_length] and
    ``past_key_values.{i}.key/value`` [batch, kv_heads, past_sequence_length, head_size] for the layers with a
    cache; ``logits`` and their ``present.{i}.key/value`` out."""
    rng = np.random.default_rng(config.seed)
    np_type = {"float32": np.float32, "float16": np.float16}[config.dtype]
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(np_type))
    nodes, initializers, inputs, outputs = [], [], [], []

    def weight(name: str, shape, std: float | None = None, value: np.ndarray | None = None) -> str:
        array = value if value is not None else rng.normal(0.0, std or config.weight_std, shape)
        initializers.append(numpy_helper.from_array(np.asarray(array, np_type), name))
        return name

    def const_i64(name: str, values) -> str:
        initializers.append(numpy_helper.from_array(np.asarray(values, np.int64), name))
        return name

    def node(op: str, ins, outs, name: str, domain: str = "", **attrs) -> None:
        nodes.append(helper.make_node(op, ins, outs, name=name, domain=domain, **attrs))

    inputs += [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total_sequence_length"]),
    ]
    # Lengths as onnxruntime-genai's builder derives them from the mask.
    node("ReduceSum", ["attention_mask", const_i64("one_axis", [1])], ["mask_sum"], "lengths/ReduceSum")
    node("Sub", ["mask_sum", const_i64("one", [1])], ["seqlens_i64"], "lengths/Sub")
    node("Cast", ["seqlens_i64"], ["seqlens_k"], "lengths/seqlens_k", to=TensorProto.INT32)
    node("Shape", ["attention_mask"], ["mask_shape"], "lengths/Shape")
    node("Gather", ["mask_shape", const_i64("index_1", 1)], ["total_i64"], "lengths/Gather", axis=0)
    node("Cast", ["total_i64"], ["total_sequence_length"], "lengths/total", to=TensorProto.INT32)

    for kind, size, theta, partial in (
        ("sliding", config.sliding_head_size, 1e4, 1.0),
        ("full", config.full_head_size, 1e6, 0.25),
    ):
        cos, sin = _rotary_tables(size, config.positions, theta, partial)
        weight(f"cos_cache_{kind}", None, value=cos)
        weight(f"sin_cache_{kind}", None, value=sin)

    node("Gather", [weight("embed_tokens", (config.vocab, config.hidden), std=1.0), "input_ids"], ["h0"], "embed")
    hidden = "h0"
    for layer in range(config.layers):
        prefix = f"/model/layers.{layer}"
        size, source = config.head_size(layer), config.source(layer)
        kind = "sliding" if config.is_sliding(layer) else "full"
        q_width, kv_width = config.num_heads * size, config.kv_num_heads * size
        norm_weight = weight(f"layers.{layer}.input_norm", None, value=np.ones(config.hidden))
        node("RMSNormalization", [hidden, norm_weight], [f"{prefix}/norm"], f"{prefix}/input_norm", epsilon=1e-6)
        node(
            "MatMul",
            [f"{prefix}/norm", weight(f"layers.{layer}.q_proj", (config.hidden, q_width))],
            [f"{prefix}/q"],
            f"{prefix}/attn/q_proj",
        )
        if source is None:
            for proj in ("k", "v"):
                node(
                    "MatMul",
                    [f"{prefix}/norm", weight(f"layers.{layer}.{proj}_proj", (config.hidden, kv_width))],
                    [f"{prefix}/{proj}"],
                    f"{prefix}/attn/{proj}_proj",
                )
            key, value = f"{prefix}/k", f"{prefix}/v"
            past = [f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"]
            present = [f"present.{layer}.key", f"present.{layer}.value"]
            cache_dims = ["batch", config.kv_num_heads, "past_sequence_length", size]
            inputs += [helper.make_tensor_value_info(name, elem, cache_dims) for name in past]
            outputs += [
                helper.make_tensor_value_info(
                    name, elem, ["batch", config.kv_num_heads, "present_sequence_length", size]
                )
                for name in present
            ]
        else:
            # Empty key/value [batch, 0, kv_width], as mobius writes them; the source layer's present as past.
            node("Shape", [f"{prefix}/q"], [f"{prefix}/batch"], f"{prefix}/attn/batch", start=0, end=1)
            node(
                "Concat",
                [f"{prefix}/batch", const_i64(f"{prefix}/empty_tail", [0, kv_width])],
                [f"{prefix}/empty_shape"],
                f"{prefix}/attn/empty_shape",
                axis=0,
            )
            node(
                "ConstantOfShape",
                [f"{prefix}/empty_shape"],
                [f"{prefix}/empty_kv"],
                f"{prefix}/attn/empty_kv",
                value=helper.make_tensor("zero", elem, [1], [0]),
            )
            key = value = f"{prefix}/empty_kv"
            past = [f"present.{source}.key", f"present.{source}.value"]
            present = []  # a shared layer keeps no cache of its own
        attributes = {"num_heads": config.num_heads, "kv_num_heads": config.kv_num_heads, "do_rotary": 1}
        if config.is_sliding(layer):
            attributes["local_window_size"] = config.window
        node(
            "GroupQueryAttention",
            [
                f"{prefix}/q",
                key,
                value,
                *past,
                "seqlens_k",
                "total_sequence_length",
                f"cos_cache_{kind}",
                f"sin_cache_{kind}",
            ],
            [f"{prefix}/attn_out", *present],
            f"{prefix}/attn/GroupQueryAttention",
            domain="com.microsoft",
            **attributes,
        )
        node(
            "MatMul",
            [f"{prefix}/attn_out", weight(f"layers.{layer}.o_proj", (q_width, config.hidden))],
            [f"{prefix}/o"],
            f"{prefix}/attn/o_proj",
        )
        node("Add", [hidden, f"{prefix}/o"], [f"{prefix}/out"], f"{prefix}/residual")
        hidden = f"{prefix}/out"

    node(
        "RMSNormalization",
        [hidden, weight("final_norm", None, value=np.ones(config.hidden))],
        ["final"],
        "/model/final_norm",
        epsilon=1e-6,
    )
    node("MatMul", ["final", weight("lm_head", (config.hidden, config.vocab))], ["logits"], "/model/lm_head")
    outputs.insert(0, helper.make_tensor_value_info("logits", elem, ["batch", "sequence_length", config.vocab]))
    graph = helper.make_graph(nodes, "kv_shared_decoder", inputs, outputs, initializers)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", config.opset), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = IR_VERSION
    return model
