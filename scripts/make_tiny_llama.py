"""Build a tiny synthetic Llama-style decoder that uses com.microsoft.GroupQueryAttention.

Writes ``models/tiny-llama-gqa.onnx`` (relative to the repository root).

Provenance / why: this is a *synthetic* model, not a converted checkpoint. It
mimics the graph form that onnxruntime-genai's model builder
(``onnxruntime_genai.models.builder``) emits for the CPU execution provider, so
that gqa-decompose has a small, deterministic, realistic input to rewrite and
test against. The parts that matter are reproduced the way the builder does them:

* a single packed QKV MatMul per layer (weight ``[hidden, (num_heads + 2 *
  kv_num_heads) * head_size]``) whose output is fed as the GQA ``query`` input,
  with the ``key`` and ``value`` inputs left empty;
* ``com.microsoft.GroupQueryAttention`` with ``do_rotary=1``,
  ``rotary_interleaved=0`` and ``cos_cache`` / ``sin_cache`` initializers of
  shape ``[max_positions, head_size // 2]`` (rope theta 10000);
* ``seqlens_k = Cast(ReduceSum(attention_mask, axes=[1]) - 1, to=int32)`` and
  ``total_sequence_length = Cast(Gather(Shape(attention_mask), 1), to=int32)``,
  computed once and shared by every GQA node;
* builder-style names: ``input_ids``, ``attention_mask``,
  ``past_key_values.{i}.key/value``, ``logits``, ``present.{i}.key/value``,
  ``/model/layers.{i}/attn/GroupQueryAttention``.

Unlike the builder, RMSNorm is written with standard ONNX ops
(Pow/ReduceMean/Add/Sqrt/Div/Mul) instead of SimplifiedLayerNormalization, so
GroupQueryAttention is the only contrib op in the graph.

Sizes: vocab 64, hidden 64, 2 layers, num_heads 4, kv_num_heads 2,
head_size 16, intermediate 128, max positions 128. Weights are
``N(0, 1) * 0.05`` float32 from a fixed numpy seed, so the output is
deterministic. The model is saved with ``ir_version = 10`` (onnxruntime 1.31
rejects the newer IR version onnx 1.23 writes by default), opsets
``"" : 21`` and ``com.microsoft : 1``.

After writing, the script checks the model with ``onnx.checker`` and runs a
prompt step plus one decode step with onnxruntime on CPU.

Usage: python scripts/make_tiny_llama.py
"""

from __future__ import annotations

import pathlib

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SEED = 0
VOCAB = 64
HIDDEN = 64
NUM_LAYERS = 2
NUM_HEADS = 4
KV_NUM_HEADS = 2
HEAD_SIZE = 16
INTERMEDIATE = 128
MAX_POSITIONS = 128
ROPE_THETA = 10000.0
RMS_EPS = 1e-5
WEIGHT_SCALE = 0.05

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
OUTPUT_PATH = REPO_ROOT / "models" / "tiny-llama-gqa.onnx"


class GraphBuilder:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def add_init(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(array, name=name))
        return name

    def weight(self, name: str, shape: tuple[int, ...]) -> str:
        array = (self.rng.standard_normal(shape) * WEIGHT_SCALE).astype(np.float32)
        return self.add_init(name, array)

    def node(
        self, op_type: str, inputs: list[str], name: str, outputs: list[str] | None = None, domain: str = "", **attrs
    ) -> list[str]:
        if outputs is None:
            outputs = [f"{name}/output_0"]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, domain=domain, **attrs))
        return outputs

    def rms_norm(self, x: str, prefix: str, weight_name: str) -> str:
        """RMSNorm: x / sqrt(mean(x^2) + eps) * weight, standard ONNX ops only."""
        weight = self.add_init(weight_name, np.ones(HIDDEN, dtype=np.float32))
        (sq,) = self.node("Pow", [x, "/model/constants/FLOAT/2"], f"{prefix}/Pow")
        (mean,) = self.node("ReduceMean", [sq, "/model/constants/INT64/[-1]"], f"{prefix}/ReduceMean", keepdims=1)
        (add,) = self.node("Add", [mean, "/model/constants/FLOAT/eps"], f"{prefix}/Add")
        (root,) = self.node("Sqrt", [add], f"{prefix}/Sqrt")
        (inv,) = self.node("Div", ["/model/constants/FLOAT/1", root], f"{prefix}/Div")
        (normed,) = self.node("Mul", [x, inv], f"{prefix}/Mul")
        (out,) = self.node("Mul", [normed, weight], f"{prefix}/Mul_1")
        return out


def rope_caches() -> tuple[np.ndarray, np.ndarray]:
    """cos/sin caches [MAX_POSITIONS, HEAD_SIZE // 2] as the genai builder computes them."""
    inv_freq = 1.0 / (ROPE_THETA ** (np.arange(0, HEAD_SIZE, 2, dtype=np.int64).astype(np.float32) / HEAD_SIZE))
    t = np.arange(MAX_POSITIONS, dtype=np.int64).astype(np.float32)
    freqs = np.outer(t, inv_freq)
    return np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)


def build_model(g: GraphBuilder | None = None) -> onnx.ModelProto:
    g = g or GraphBuilder(SEED)

    # Shared constants.
    g.add_init("/model/constants/FLOAT/2", np.array(2.0, dtype=np.float32))
    g.add_init("/model/constants/FLOAT/1", np.array(1.0, dtype=np.float32))
    g.add_init("/model/constants/FLOAT/eps", np.array(RMS_EPS, dtype=np.float32))
    g.add_init("/model/constants/INT64/[-1]", np.array([-1], dtype=np.int64))
    g.add_init("/model/constants/INT64/[1]", np.array([1], dtype=np.int64))
    g.add_init("/model/constants/INT64/1", np.array(1, dtype=np.int64))
    cos_cache, sin_cache = rope_caches()
    g.add_init("cos_cache", cos_cache)
    g.add_init("sin_cache", sin_cache)

    # Attention-mask derived inputs for GQA, computed once (builder form).
    (mask_sum,) = g.node(
        "ReduceSum",
        ["attention_mask", "/model/constants/INT64/[1]"],
        "/model/attn_mask_reformat/attn_mask_subgraph/ReduceSum",
        keepdims=0,
    )
    (mask_sub,) = g.node(
        "Sub", [mask_sum, "/model/constants/INT64/1"], "/model/attn_mask_reformat/attn_mask_subgraph/Sub"
    )
    (seqlens_k,) = g.node(
        "Cast", [mask_sub], "/model/attn_mask_reformat/attn_mask_subgraph/Sub/Cast", to=TensorProto.INT32
    )
    (mask_shape,) = g.node("Shape", ["attention_mask"], "/model/attn_mask_reformat/attn_mask_subgraph/Shape")
    (total_len_i64,) = g.node(
        "Gather",
        [mask_shape, "/model/constants/INT64/1"],
        "/model/attn_mask_reformat/attn_mask_subgraph/Gather",
        axis=0,
    )
    (total_seq_len,) = g.node(
        "Cast", [total_len_i64], "/model/attn_mask_reformat/attn_mask_subgraph/Gather/Cast", to=TensorProto.INT32
    )

    # Embedding.
    g.weight("model.embed_tokens.weight", (VOCAB, HIDDEN))
    (hidden,) = g.node("Gather", ["model.embed_tokens.weight", "input_ids"], "/model/embed_tokens/Gather", axis=0)

    qkv_out = (NUM_HEADS + 2 * KV_NUM_HEADS) * HEAD_SIZE
    for i in range(NUM_LAYERS):
        p = f"/model/layers.{i}"
        normed = g.rms_norm(hidden, f"{p}/input_layernorm", f"model.layers.{i}.input_layernorm.weight")

        g.weight(f"model.layers.{i}.attn.qkv_proj.MatMul.weight", (HIDDEN, qkv_out))
        (qkv,) = g.node(
            "MatMul", [normed, f"model.layers.{i}.attn.qkv_proj.MatMul.weight"], f"{p}/attn/qkv_proj/MatMul"
        )
        (attn,) = g.node(
            "GroupQueryAttention",
            [
                qkv,
                "",
                "",
                f"past_key_values.{i}.key",
                f"past_key_values.{i}.value",
                seqlens_k,
                total_seq_len,
                "cos_cache",
                "sin_cache",
            ],
            f"{p}/attn/GroupQueryAttention",
            outputs=[f"{p}/attn/GroupQueryAttention/output_0", f"present.{i}.key", f"present.{i}.value"],
            domain="com.microsoft",
            num_heads=NUM_HEADS,
            kv_num_heads=KV_NUM_HEADS,
            do_rotary=1,
            rotary_interleaved=0,
            scale=0.0,
        )[:1]

        g.weight(f"model.layers.{i}.attn.o_proj.MatMul.weight", (NUM_HEADS * HEAD_SIZE, HIDDEN))
        (o,) = g.node("MatMul", [attn, f"model.layers.{i}.attn.o_proj.MatMul.weight"], f"{p}/attn/o_proj/MatMul")
        (hidden,) = g.node("Add", [hidden, o], f"{p}/attn/residual/Add")

        normed = g.rms_norm(
            hidden, f"{p}/post_attention_layernorm", f"model.layers.{i}.post_attention_layernorm.weight"
        )
        g.weight(f"model.layers.{i}.mlp.gate_proj.MatMul.weight", (HIDDEN, INTERMEDIATE))
        g.weight(f"model.layers.{i}.mlp.up_proj.MatMul.weight", (HIDDEN, INTERMEDIATE))
        g.weight(f"model.layers.{i}.mlp.down_proj.MatMul.weight", (INTERMEDIATE, HIDDEN))
        (gate,) = g.node(
            "MatMul", [normed, f"model.layers.{i}.mlp.gate_proj.MatMul.weight"], f"{p}/mlp/gate_proj/MatMul"
        )
        (sig,) = g.node("Sigmoid", [gate], f"{p}/mlp/act_fn/Sigmoid")
        (silu,) = g.node("Mul", [gate, sig], f"{p}/mlp/act_fn/Mul")
        (up,) = g.node("MatMul", [normed, f"model.layers.{i}.mlp.up_proj.MatMul.weight"], f"{p}/mlp/up_proj/MatMul")
        (prod,) = g.node("Mul", [silu, up], f"{p}/mlp/Mul")
        (down,) = g.node("MatMul", [prod, f"model.layers.{i}.mlp.down_proj.MatMul.weight"], f"{p}/mlp/down_proj/MatMul")
        (hidden,) = g.node("Add", [hidden, down], f"{p}/mlp/residual/Add")

    normed = g.rms_norm(hidden, "/model/layers.2/final_norm_layernorm", "model.norm.weight")
    g.weight("lm_head.MatMul.weight", (HIDDEN, VOCAB))
    g.node("MatMul", [normed, "lm_head.MatMul.weight"], "/lm_head/MatMul", outputs=["logits"])

    kv_shape = ["batch_size", KV_NUM_HEADS, "past_sequence_length", HEAD_SIZE]
    present_shape = ["batch_size", KV_NUM_HEADS, "total_sequence_length", HEAD_SIZE]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", VOCAB])]
    for i in range(NUM_LAYERS):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", TensorProto.FLOAT, kv_shape))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", TensorProto.FLOAT, present_shape))

    graph = helper.make_graph(g.nodes, "tiny_llama_gqa", inputs, outputs, initializer=g.initializers)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
        producer_name="gqa-decompose/scripts/make_tiny_llama.py",
    )
    model.ir_version = 10
    return model


class _SparseWeights(GraphBuilder):
    """Every weight an external tensor at the next offset of one data file; nothing is generated."""

    def __init__(self, data_name: str) -> None:
        super().__init__(SEED)
        self.data_name, self.offset = data_name, 0

    def weight(self, name: str, shape: tuple[int, ...]) -> str:
        tensor = onnx.TensorProto(name=name, dims=list(shape), data_type=TensorProto.FLOAT)
        length = int(np.prod(shape)) * 4
        for key, value in (("location", self.data_name), ("offset", self.offset), ("length", length)):
            tensor.external_data.add(key=key, value=str(value))
        tensor.data_location = TensorProto.EXTERNAL
        self.initializers.append(tensor)
        self.offset += length
        return name


def write_sparse_model(
    folder: pathlib.Path,
    *,
    layers: int,
    hidden: int,
    heads: int,
    kv_heads: int,
    intermediate: int,
    vocab: int,
    max_positions: int = 4096,
) -> pathlib.Path:
    """This graph at any size, its weights in a *sparse* ``model.onnx.data`` (reads as zeros, costs no disk).

    For tests and benchmarks of multi-GB models: writes ``folder/model.onnx`` (a few hundred KB of graph;
    RMSNorm weights and cos/sin tables stay inline) and returns its path.
    """
    global HIDDEN, NUM_LAYERS, NUM_HEADS, KV_NUM_HEADS, HEAD_SIZE, INTERMEDIATE, VOCAB, MAX_POSITIONS
    saved = HIDDEN, NUM_LAYERS, NUM_HEADS, KV_NUM_HEADS, HEAD_SIZE, INTERMEDIATE, VOCAB, MAX_POSITIONS
    HIDDEN, NUM_LAYERS, NUM_HEADS, KV_NUM_HEADS = hidden, layers, heads, kv_heads
    HEAD_SIZE, INTERMEDIATE, VOCAB, MAX_POSITIONS = hidden // heads, intermediate, vocab, max_positions
    try:
        builder = _SparseWeights("model.onnx.data")
        model = build_model(builder)
    finally:
        HIDDEN, NUM_LAYERS, NUM_HEADS, KV_NUM_HEADS, HEAD_SIZE, INTERMEDIATE, VOCAB, MAX_POSITIONS = saved
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save(model, path)
    with open(folder / builder.data_name, "wb") as data:
        data.truncate(builder.offset)  # a hole: no block is allocated
    return path


def check(model: onnx.ModelProto) -> None:
    # The checker skips ops from domains it has no schemas for (com.microsoft),
    # so the standard-op part of the graph is still validated.
    onnx.checker.check_model(model, full_check=False)
    print("onnx.checker.check_model: OK")


def run_with_ort(path: pathlib.Path) -> None:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch, seq = 2, 5
    rng = np.random.default_rng(SEED + 1)
    input_ids = rng.integers(0, VOCAB, size=(batch, seq), dtype=np.int64)
    attention_mask = np.ones((batch, seq), dtype=np.int64)
    attention_mask[1, -2:] = 0  # right padding on the second row
    feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
    for i in range(NUM_LAYERS):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = np.zeros((batch, KV_NUM_HEADS, 0, HEAD_SIZE), dtype=np.float32)

    output_names = [o.name for o in sess.get_outputs()]
    outs = dict(zip(output_names, sess.run(output_names, feeds)))
    print("prompt step:")
    for name, value in outs.items():
        print(f"  {name}: {list(value.shape)} {value.dtype}")
    assert outs["logits"].shape == (batch, seq, VOCAB)
    assert np.isfinite(outs["logits"]).all()

    next_ids = outs["logits"][:, -1, :].argmax(-1).astype(np.int64)[:, None]
    feeds = {
        "input_ids": next_ids,
        "attention_mask": np.concatenate([attention_mask, np.ones((batch, 1), dtype=np.int64)], axis=1),
    }
    for i in range(NUM_LAYERS):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = outs[f"present.{i}.{kind}"]
    outs = dict(zip(output_names, sess.run(output_names, feeds)))
    print("decode step:")
    for name, value in outs.items():
        print(f"  {name}: {list(value.shape)} {value.dtype}")
    assert outs["logits"].shape == (batch, 1, VOCAB)
    assert np.isfinite(outs["logits"]).all()


def main() -> None:
    model = build_model()
    OUTPUT_PATH.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(OUTPUT_PATH))
    print(f"wrote {OUTPUT_PATH} ({OUTPUT_PATH.stat().st_size} bytes)")
    check(onnx.load(str(OUTPUT_PATH)))
    run_with_ort(OUTPUT_PATH)


if __name__ == "__main__":
    main()
