"""Make the real-producer fixtures ``models/builder-<name>/``.

A tiny random-weight Hugging Face checkpoint (with a tiny tokenizer trained here on a few strings) is fed to
onnxruntime-genai's model builder, and its ``model.onnx`` and ``genai_config.json`` are copied into the repository.
The script then runs the ONNX model with ONNX Runtime (prefill + one decode step) against the torch model and saves
the torch logits as ``reference.npz``, and writes ``PROVENANCE.md``. Nothing is downloaded: the config, weights and
tokenizer are all made locally. Output is deterministic (same model.onnx bytes on every run).

One fixture per GQA form (``--arch``, default ``llama``; ``--arch all`` makes every one; README "Sample models"
has the table of forms):

    llama          builder-tiny-llama       plain Llama, fp32, CPU EP (packed QKV, do_rotary=1)
    qwen2          builder-qwen2            Qwen2: QKV bias
    phi3           builder-phi3             Phi-3: Hkv = H, partial rotary (factor 0.5), LongRoPE (If node)
    qwen2-sliding  builder-qwen2-sliding    Qwen2, layer 1 sliding_attention with window 4 -> local_window_size=4
                                            (built with windowed_kv_cache=false: max-length caches)
    qwen2-ring     builder-qwen2-ring       the same checkpoint with the builder's default windowed KV cache
                                            (sliding_window_cache=1, a window-sized past for the sliding layer)
    gemma2         builder-gemma2           Gemma 2: attention softcap, query_pre_attn_scalar scale, sliding window
    llama-fp16     builder-llama-fp16       the tiny Llama built with ``-p fp16 -e cuda`` (fp16 GQA; runs on ORT CPU)
    llama-int4     builder-llama-int4       ``-p int4 -e cpu``: MatMulNBits weights, fp32 GQA (no torch reference)
    llama-int4-zp  builder-llama-int4-zp    the same with is_symmetric=false, block size 16: MatMulNBits zero points
    llama-dml      builder-llama-dml        ``-p fp16 -e dml``: separate Q/K/V, contrib RotaryEmbedding, position_ids
    llama-cpu-fp16 builder-llama-cpu-fp16   ``-p fp16 -e cpu``: no GQA; RotaryEmbedding + MultiHeadAttention, repeated KV
    mistral        builder-mistral          Mistral, window 4 on both layers: ring caches everywhere
    mistral-fp16   builder-mistral-fp16     the same, ``-p fp16 -e cuda``: fp16 ring caches
    mistral-webgpu builder-mistral-webgpu   ``-p fp16 -e webgpu`` with enable_webgpu_graph: ReduceMax total length
    gpt-oss        builder-gpt-oss          gpt-oss: head sink, sliding/full with a ring cache, YaRN, MoE
    gpt-oss-fp16   builder-gpt-oss-fp16     the same, ``-p fp16 -e cuda``: head sink with an fp16 ring cache
    gemma3         builder-gemma3           Gemma 3 (builder 0.11.4, see below): explicit q/k norm, local/global rotary
    qwen3          builder-qwen3            Qwen3: explicit q/k norm, separate Q/K/V into GQA
    qwen3-webgpu   builder-qwen3-webgpu     ``-p fp16 -e webgpu``: fused q/k norm inputs (no ORT CPU kernel)
    gemma4         builder-gemma4           dense Gemma 4: q/k/v norm, RotaryEmbedding before GQA, head size 16 / 32
                                            per layer, a ring cache on the sliding layer (opset 22)
    gemma4-webgpu  builder-gemma4-webgpu-fp16  the same, ``-p fp16 -e webgpu``: fp16, max-length caches

Run it with a separate venv that has the builder and its torch / transformers (see PROVENANCE.md next to a model):

    python3 -m venv /work/venv-builder
    /work/venv-builder/bin/pip install torch==2.13.0          # CPU build; never plain `torch`
    /work/venv-builder/bin/pip install "transformers==5.23.*" onnxruntime-genai==0.18.0 onnx onnx-ir "onnxruntime>=1.31,<1.32"
    /work/venv-builder/bin/python scripts/make_builder_fixture.py --arch all   # all made with 0.18

Builder 0.18 cannot read a transformers-5 Gemma 3 config (``KeyError: 'rope_type'``), so ``--arch gemma3`` runs
with builder 0.11.4 under transformers 4.57 (``--arch all`` skips it):

    python3 -m venv /work/venv-builder011                 # or reuse a venv with torch 2.13 + transformers 4.57
    /work/venv-builder011/bin/pip install torch==2.13.0 "transformers==4.57.*" onnx "onnxruntime>=1.31,<1.32"
    /work/venv-builder011/bin/pip install --no-deps onnxruntime-genai==0.11.4
    /work/venv-builder011/bin/python scripts/make_builder_fixture.py --arch gemma3

The builder always saves weights as external data (``model.onnx.data``, threshold 0, no option to turn that off); this
script loads that back and saves one self-contained ``model.onnx`` instead. The builder writes IR version 10; the
script lowers it only if a future builder writes something newer than ORT 1.31 reads.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from fixture_io import write_model  # scripts/fixture_io.py (the script's folder is on sys.path)

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models"

SEED = 0

# A few strings to train the tiny tokenizer on. BPE over whitespace-split words keeps it tiny.
TRAINING_TEXT = [
    "the quick brown fox jumps over the lazy dog",
    "hello world this is a tiny llama model",
    "group query attention shares keys and values between heads",
    "onnx runtime genai builds models for the cpu",
    "a small test sentence with some words in it",
]
# The builder takes every nn.Linear whose out_features == vocab_size for the LM head, so the vocab must differ from
# every projection width (hidden 64, kv 32, intermediate 128, and the packed qkv / gate_up widths);
# otherwise those projections are each also built as one. make_checkpoint checks every nn.Linear of the model.
TOKENIZER_VOCAB_SIZE = 96
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
PROMPT = "hello world the quick fox"

CONFIG = {
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    # HF's default 0.02 makes attention scores ~0.03 (near-uniform softmax), which would hide rotary / mask / KV
    # mistakes in a rewrite. 0.2 gives scores of std ~2.5 (RMS-normed input, head_dim 16, scale 1/4).
    "initializer_range": 0.2,
}


LLAMA_INTRO = [
    "A real-producer GroupQueryAttention fixture: a tiny **random-weight** Llama made locally and converted by",
    "onnxruntime-genai's model builder (fp32, CPU EP). The logits mean nothing; the graph is what the builder",
    "writes for a Llama-family model on the CPU EP: packed QKV into GroupQueryAttention with `do_rotary=1`,",
    "`SimplifiedLayerNormalization` / `SkipSimplifiedLayerNormalization`, and `past_present_share_buffer: true`.",
]
# PROVENANCE.md's note for fp16 models, checked against the fp32 torch reference at torch_atol=5e-2.
_FP16_AGAINST_FP32 = ("", "The torch reference is float32; the script accepts the fp16 model within 5e-2 of it.")

_COMMON_TAIL = [
    "The rest is what the builder writes on the CPU EP: packed QKV into GroupQueryAttention with `do_rotary=1`,",
    "`SimplifiedLayerNormalization` / `SkipSimplifiedLayerNormalization`, and `past_present_share_buffer: true`.",
]
# Qwen2 always has q/k/v biases and no attention_bias / mlp_bias switches.
QWEN2_CONFIG = {k: v for k, v in CONFIG.items() if k not in ("attention_bias", "mlp_bias")}
QWEN2_SLIDING_CONFIG = dict(
    QWEN2_CONFIG,
    use_sliding_window=True,
    sliding_window=4,
    max_window_layers=1,  # layer_types = [full_attention, sliding_attention]: one node of each kind
)

# Mistral slides on every layer in Hugging Face; builder 0.18 reads the window per layer from `layer_types` only
# (absent, every layer is full), so give it. transformers warns ("Detected Mistral model with layer_types") but keeps
# the all-sliding behaviour.
MISTRAL_CONFIG = dict(
    {k: v for k, v in CONFIG.items() if k not in ("attention_bias", "mlp_bias")},
    sliding_window=4,
    layer_types=["sliding_attention", "sliding_attention"],
)
# Gemma 3 text in transformers 4.57's terms (builder 0.11.4 needs transformers 4.x): rope_theta for full layers,
# rope_local_base_freq for sliding ones. Builder 0.11.4 ignores layer_types and hard-codes Gemma 3's pattern (five
# sliding layers, then a full one), so the model needs six layers to have a full one; HF's default layer_types for
# six layers is the same pattern. intermediate_size 64 keeps six layers small.
GEMMA3_CONFIG = {
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 64,
    "num_hidden_layers": 6,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-6,
    "hidden_activation": "gelu_pytorch_tanh",
    "query_pre_attn_scalar": 32,
    "sliding_window": 4,
    "rope_theta": 10000.0,
    "rope_local_base_freq": 1000.0,
    "tie_word_embeddings": True,
    "initializer_range": 0.2,
}
QWEN3_CONFIG = dict(QWEN2_CONFIG)  # head_dim 16: q_norm / k_norm over 16 values
# Gemma 4 (dense, `Gemma4UnifiedForConditionalGeneration`): the text config of the multimodal wrapper. Sliding layers
# have head_dim 16, the full one global_head_dim 32 (Gemma 4 has 256 / 512), same kv heads (attention_k_eq_v off);
# rope_parameters default to HF's: sliding theta 1e4, full "proportional" theta 1e6 with partial_rotary_factor 0.25,
# which the builder bakes into the global cos/sin table as zero-frequency columns. intermediate 64 (not 128: the
# global q_proj is 4 x 32 = 128 wide, and widths must differ from the vocab anyway).
GEMMA4_TEXT_CONFIG = {
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "global_head_dim": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "layer_types": ["sliding_attention", "full_attention"],
    "sliding_window": 4,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-6,
    "hidden_activation": "gelu_pytorch_tanh",
    "use_bidirectional_attention": None,  # text only: plain causal attention
    "tie_word_embeddings": True,
    "initializer_range": 0.2,
}
# Builder 0.18 reads these from the top level of config.json, where transformers 5's Gemma4UnifiedConfig does not
# keep them: global_head_dim and num_global_key_value_heads are consumed by the text config's per-layer overrides,
# and the text config hides its per-layer attributes (head_dim) from the builder's collapse of text_config unless
# allow_global_per_layer_attribute_access is set on it as well.
GEMMA4_CONFIG_JSON = {
    "": {"global_head_dim": 32, "num_global_key_value_heads": 2, "allow_global_per_layer_attribute_access": True},
    "text_config": {"allow_global_per_layer_attribute_access": True},
}
_GEMMA4_FORM = [
    "What it exercises: the builder's Gemma 4 form (opset 22): the packed q/k/v MatMul is split, Q and K go through",
    "Reshape → SimplifiedLayerNormalization (q/k norm) → Reshape → contrib `RotaryEmbedding` (`position_ids` input),",
    "V through a scaleless v_norm, and GroupQueryAttention gets separate Q/K/V with `do_rotary=0` and `scale=1.0`.",
    "Head sizes differ per layer: the sliding layer 0 has head size 16 (`local_window_size=4`), the full layer 1",
    "head size 32 (partial rotary baked into its cos/sin table as zero-frequency columns), so past/present shapes",
    "differ per layer (genai_config.json's `head_size` is the sliding one).",
]
GPT_OSS_CONFIG = {
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 64,
    "num_hidden_layers": 2,  # layer_types default: [sliding_attention, full_attention]
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5,
    "sliding_window": 4,
    "attention_bias": True,
    "tie_word_embeddings": False,
    "initializer_range": 0.2,
    # YaRN as in gpt-oss, scaled down: the builder asserts 0 < low < high < head_dim/2 - 1 for the ramp, which
    # with head_dim 16 needs beta_fast * 2 pi below original_max_position_embeddings (gpt-oss has 32 and 4096).
    "rope_parameters": {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "beta_fast": 4.0,
        "beta_slow": 1.0,
        "original_max_position_embeddings": 32,
        "truncate": False,
    },
}


@dataclasses.dataclass(frozen=True)
class Arch:
    """One fixture: a Hugging Face config class and values, and the builder options."""

    folder: str
    config_class: str
    config: dict
    intro: list[str]
    builder_args: tuple[str, ...] = ("-p", "fp32", "-e", "cpu")
    extra_options: tuple[str, ...] = ()  # KEY=VALUE for --extra_options
    # max |ORT - torch| on logits the script accepts; None: the torch model is no reference (int4 weights), so the
    # script reports the difference and saves no reference.npz
    torch_atol: float | None = 1e-4
    # Run the ONNX side of the torch check through onnxruntime-genai's generator instead of a plain ORT session
    # (for graphs whose caches need the runtime's buffer management, e.g. the windowed KV cache).
    check_with_genai: bool = False
    # False when ORT CPU cannot run the builder's graph (e.g. fused q/k norm in GroupQueryAttention): the script then
    # saves the torch logits without comparing the ONNX model with them.
    runs_on_ort_cpu: bool = True
    # (parameter-name suffix, std): parameters drawn again from N(0, std) after HF's init, for features HF initializes
    # too small to see (gpt-oss's attention sinks).
    reinit: tuple[tuple[str, float], ...] = ()
    notes: tuple[str, ...] = ()  # extra PROVENANCE lines
    builder_version: str = "0.18.0"  # the onnxruntime-genai version the fixture is made with (--arch all skips others)
    # Per-layer (k, v) scales of a quantized KV cache: the script writes them as the builder's kv_cache_scale_file
    # (calibration needs the model; a fixed scale per layer is enough for a fixture).
    kv_cache_scales: tuple[tuple[float, float], ...] = ()
    # True: ``config_class`` is a multimodal wrapper and ``config`` its ``text_config`` (no vision / audio towers).
    text_config: bool = False
    # Keys written into the saved config.json after ``save_pretrained`` ({"": top level, "text_config": ...}).
    config_json: dict = dataclasses.field(default_factory=dict)
    # True where the builder's ``value_info`` (intermediate values' declared shapes) is wrong and ORT fails the
    # model with it: the script drops those declarations, and changes nothing else in the builder's graph.
    drop_value_info: bool = False


ARCHS = {
    "llama": Arch("builder-tiny-llama", "LlamaConfig", CONFIG, LLAMA_INTRO),
    "qwen2": Arch(
        "builder-qwen2",
        "Qwen2Config",
        QWEN2_CONFIG,
        [
            "A real-producer GroupQueryAttention fixture: a tiny **random-weight** Qwen2 made locally and converted by",
            "onnxruntime-genai's model builder (fp32, CPU EP). The logits mean nothing. What it exercises: Qwen2's",
            "q/k/v projection biases, which the builder packs into one bias Add before GroupQueryAttention.",
            *_COMMON_TAIL,
        ],
    ),
    "phi3": Arch(
        "builder-phi3",
        "Phi3Config",
        {
            "hidden_size": 64,
            # Head size 32: ORT's GQA wants the cos/sin cache width (rotary_dim / 2) to be a multiple of 8, so
            # partial rotary with factor 0.5 needs rotary_dim 16 of a head of 32.
            "num_attention_heads": 2,
            "num_key_value_heads": 2,  # Hkv = H, as in Phi-3 mini
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "max_position_embeddings": 128,
            "original_max_position_embeddings": 64,  # != max_position_embeddings: the builder's LongRoPE model
            "rms_norm_eps": 1e-5,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "initializer_range": 0.2,
            "rope_parameters": {
                "rope_type": "longrope",
                "type": "longrope",  # builder 0.18 reads rope_parameters["type"] for the mscale policy
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,  # rotary on 16 of the 32 head dims (Phi-4-mini uses 0.75)
                "short_factor": [1.0, 1.1, 1.2, 1.3, 1.5, 1.7, 2.0, 2.5],  # rotary_dim / 2 entries
                "long_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0],
            },
        },
        [
            "A real-producer GroupQueryAttention fixture: a tiny **random-weight** Phi-3 made locally and converted by",
            "onnxruntime-genai's model builder (fp32, CPU EP). The logits mean nothing. What it exercises:",
            "`kv_num_heads == num_heads`, partial rotary (`partial_rotary_factor=0.5`: cos/sin caches of width 8 for a",
            "head size of 32) and LongRoPE (`max_position_embeddings != original_max_position_embeddings`), for which",
            "the builder picks the short- or long-factor cos/sin cache with an `If` node, so the GQA node's cos/sin",
            "inputs come out of an `If`.",
            *_COMMON_TAIL,
        ],
    ),
    "qwen2-sliding": Arch(
        "builder-qwen2-sliding",
        "Qwen2Config",
        QWEN2_SLIDING_CONFIG,
        [
            "A real-producer GroupQueryAttention fixture: a tiny **random-weight** Qwen2 with sliding-window attention",
            "made locally and converted by onnxruntime-genai's model builder (fp32, CPU EP). The logits mean nothing.",
            "What it exercises: `local_window_size=4` on layer 1 (`sliding_attention`) and `-1` on layer 0",
            "(`full_attention`), with q/k/v biases. Built with `windowed_kv_cache=false`, so both layers have",
            "max-length caches (the builder's default window-sized cache is `builder-qwen2-ring`).",
            *_COMMON_TAIL,
        ],
        extra_options=("windowed_kv_cache=false",),
    ),
    "qwen2-ring": Arch(
        "builder-qwen2-ring",
        "Qwen2Config",
        QWEN2_SLIDING_CONFIG,
        [
            "A real-producer GroupQueryAttention fixture: the same tiny **random-weight** sliding-window Qwen2 as",
            "`builder-qwen2-sliding`, converted with the builder's defaults (fp32, CPU EP). The logits mean nothing.",
            "What it exercises: the builder's windowed KV cache, on by default for sliding layers on the CPU EP:",
            "layer 1's GroupQueryAttention has `sliding_window_cache=1` and `local_window_size=4`, and its past/present",
            "are window-sized ring buffers (genai_config.json has a `sliding_window` section).",
            *_COMMON_TAIL,
        ],
        check_with_genai=True,
        notes=(
            "",
            "The windowed cache needs onnxruntime-genai's buffer management (a plain ORT session with an empty past",
            "fails: `KV cache capacity (0) must be at least local_window_size (4)`), so for this fixture the script",
            "ran the ONNX side of the check through `onnxruntime_genai.Generator` (`append_tokens` for the prompt,",
            "then the next token) on the saved folder instead.",
        ),
    ),
    "gemma2": Arch(
        "builder-gemma2",
        "Gemma2Config",
        {
            "hidden_size": 64,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "max_position_embeddings": 128,
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0,
            "hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": 32,  # scale 32**-0.5, not head_dim**-0.5
            "attn_logit_softcapping": 5.0,  # small enough to bend scores of std ~2.5
            "final_logit_softcapping": 30.0,
            "sliding_window": 4,  # layer_types default: [sliding_attention, full_attention]
            "initializer_range": 0.2,
        },
        [
            "A real-producer GroupQueryAttention fixture: a tiny **random-weight** Gemma 2 made locally and converted",
            "by onnxruntime-genai's model builder (fp32, CPU EP). The logits mean nothing. What it exercises:",
            "`softcap` (attn_logit_softcapping), a custom `scale` (query_pre_attn_scalar**-0.5) and `local_window_size`",
            "on the sliding layer (built with `windowed_kv_cache=false`: max-length caches).",
            *_COMMON_TAIL,
        ],
        extra_options=("windowed_kv_cache=false",),
    ),
    "llama-fp16": Arch(
        "builder-llama-fp16",
        "LlamaConfig",
        CONFIG,
        [
            "A real-producer GroupQueryAttention fixture: the tiny **random-weight** Llama of `builder-tiny-llama`",
            "converted by onnxruntime-genai's model builder with `-p fp16 -e cuda`. The logits mean nothing. What it",
            "exercises: float16 GroupQueryAttention (float16 weights, activations, logits and KV cache). The builder",
            "makes GroupQueryAttention for fp16 only on GPU EPs: `-p fp16 -e cpu` gives contrib `RotaryEmbedding` +",
            "`MultiHeadAttention` (with repeat_kv) instead. The cuda graph uses no CUDA-only op and runs on ORT CPU;",
            "its genai_config.json names the cuda provider, so `onnxruntime_genai.Model` wants CUDA for the folder.",
            "Otherwise it is what the builder writes for Llama on the CPU EP: packed QKV into GroupQueryAttention",
            "with `do_rotary=1`, `SimplifiedLayerNormalization` / `SkipSimplifiedLayerNormalization`, and",
            "`past_present_share_buffer: true`.",
        ],
        builder_args=("-p", "fp16", "-e", "cuda"),
        torch_atol=5e-2,
        notes=_FP16_AGAINST_FP32,
    ),
    "llama-int4": Arch(
        "builder-llama-int4",
        "LlamaConfig",
        CONFIG,
        [
            "A real-producer GroupQueryAttention fixture: the tiny **random-weight** Llama of `builder-tiny-llama`",
            "converted by onnxruntime-genai's model builder with `-p int4 -e cpu`. The logits mean nothing. What it",
            "exercises: int4 weight-only quantization: every projection is a contrib `MatMulNBits` (block size 32),",
            "so the packed QKV input of GroupQueryAttention comes out of `MatMulNBits`; activations, GQA and the KV",
            "cache stay float32 on the CPU EP. `MatMulNBits` is an ORT-only op and remains after the rewrite (the",
            "`--check` gate lists it as non-standard).",
            *_COMMON_TAIL,
        ],
        builder_args=("-p", "int4", "-e", "cpu"),
        torch_atol=None,
    ),
    "llama-int4-zp": Arch(
        "builder-llama-int4-zp",
        "LlamaConfig",
        CONFIG,
        [
            "A real-producer GroupQueryAttention fixture: the tiny **random-weight** Llama of `builder-tiny-llama`",
            "converted by onnxruntime-genai's model builder with asymmetric int4 weights (`-p int4 -e cpu",
            "--extra_options is_symmetric=false block_size=16`). The logits mean nothing. What it exercises:",
            "`MatMulNBits` with packed uint4 zero points and block size 16 (the symmetric fixture `builder-llama-int4`",
            "has none, block size 32), and the int4 `GatherBlockQuantized` / lm_head forms the builder writes with them.",
            *_COMMON_TAIL,
        ],
        builder_args=("-p", "int4", "-e", "cpu"),
        extra_options=("is_symmetric=false", "block_size=16"),
        torch_atol=None,
    ),
    "llama-int8kv": Arch(
        "builder-llama-int8kv",
        "LlamaConfig",
        CONFIG,
        [
            "A real-producer GroupQueryAttention fixture: the tiny **random-weight** Llama of `builder-tiny-llama`",
            "converted by onnxruntime-genai's model builder with an int8 KV cache (`-p fp32 -e cpu --extra_options",
            "kv_cache_quant_scheme=int8_per_tensor`). The logits mean nothing. What it exercises: int8 past/present",
            "caches with per-tensor `k_scale` / `v_scale` initializers (`kv_cache_bit_width=8`,",
            "`k_quant_type=v_quant_type=PER_TENSOR`); present rows past each sequence's length are undefined.",
            *_COMMON_TAIL,
        ],
        extra_options=("kv_cache_quant_scheme=int8_per_tensor",),
        kv_cache_scales=((0.05, 0.05), (0.05, 0.05)),
        torch_atol=None,
    ),
    "llama-dml": Arch(
        "builder-llama-dml",
        "LlamaConfig",
        CONFIG,
        [
            "A real-producer GroupQueryAttention fixture: the tiny **random-weight** Llama of `builder-tiny-llama`",
            "converted by onnxruntime-genai's model builder with `-p fp16 -e dml` (DirectML). The logits mean nothing.",
            "What it exercises: the DirectML form of GroupQueryAttention: three separate Q/K/V `MatMul`s, a contrib",
            "`RotaryEmbedding` on Q and on K before the node (`do_rotary=0`, no cos/sin inputs on GQA), a",
            "`position_ids` graph input, float16 throughout, `past_present_share_buffer: true`. (The builder makes",
            "GroupQueryAttention on DML only for fp16; `-p fp32 -e dml` gives contrib `Attention` instead.) The graph",
            "uses no DML-only op and runs on ORT CPU; its genai_config.json names the dml provider.",
        ],
        builder_args=("-p", "fp16", "-e", "dml"),
        torch_atol=5e-2,
        notes=_FP16_AGAINST_FP32,
    ),
    "llama-cpu-fp16": Arch(
        "builder-llama-cpu-fp16",
        "LlamaConfig",
        CONFIG,
        [
            "A real-producer companion-op fixture: the tiny **random-weight** Llama of `builder-tiny-llama` converted",
            "by onnxruntime-genai's model builder with `-p fp16 -e cpu`. The logits mean nothing. What it exercises:",
            "no GroupQueryAttention at all: the builder writes contrib `RotaryEmbedding` on Q and K and",
            "`MultiHeadAttention` with the KV heads repeated in the graph (Expand + Reshape of present), a 4-D",
            "additive mask, `position_ids`, float16 throughout, growing caches (`past_present_share_buffer: false`).",
            "The builder's `value_info` is wrong in 28 of its 132 entries: the repeated keys and values",
            "(`.../repeat_kv/...`) are declared `sequence_length` rows long though they hold the whole cache, and",
            "1-D constants are declared scalars. ORT trusts the first and fails the first decode step (`Shape",
            "mismatch attempting to re-use buffer. {1,1,64} != {1,12,64}`); the second stops ONNX shape inference.",
            "The script drops the graph's `value_info` (`drop_value_info`), and nothing else: graph inputs and",
            "outputs keep their declarations, and ORT then runs every step.",
        ],
        builder_args=("-p", "fp16", "-e", "cpu"),
        drop_value_info=True,
        torch_atol=5e-2,
        notes=_FP16_AGAINST_FP32,
    ),
    "mistral": Arch(
        "builder-mistral",
        "MistralConfig",
        MISTRAL_CONFIG,
        [
            "A real-producer GroupQueryAttention fixture: a tiny **random-weight** Mistral (sliding window 4 on every",
            "layer) made locally and converted by onnxruntime-genai's model builder (fp32, CPU EP) with its defaults.",
            "The logits mean nothing. What it exercises: an all-local model: both GroupQueryAttention nodes have",
            "`local_window_size=4` and `sliding_window_cache=1`, so every past/present is a window-sized ring buffer",
            "(genai_config.json's `sliding_window.layers` = [0, 1]) and no layer has a max-length cache.",
            "`layer_types` is given as `sliding_attention` on both layers: without it builder 0.18 treats every layer",
            "as full attention (`local_window_size=-1`) although Hugging Face's Mistral slides on all of them.",
            *_COMMON_TAIL,
        ],
        check_with_genai=True,
        notes=(
            "",
            "Its windowed caches need onnxruntime-genai's buffer management, so the script ran the ONNX side of",
            "the check through `onnxruntime_genai.Generator` (see builder-qwen2-ring).",
        ),
    ),
    "mistral-webgpu": Arch(
        "builder-mistral-webgpu",
        "MistralConfig",
        MISTRAL_CONFIG,
        [
            "A real-producer GroupQueryAttention fixture: the tiny **random-weight** Mistral of `builder-mistral`",
            "converted by onnxruntime-genai's model builder with `-p fp16 -e webgpu --extra_options",
            "enable_webgpu_graph=true`. The logits mean nothing. What it exercises: the WebGPU graph-capture form of",
            "the lengths: `attention_mask` → Cast(int32) → ReduceSum → Sub(1) = `seqlens_k` and ReduceMax(ReduceSum)",
            "= `total_sequence_length` (no Shape op), float16, and `local_window_size=4` on both layers with",
            "max-length caches (the builder makes windowed caches only for cpu/cuda). The plain webgpu fp16 graph is",
            "the cuda one (`builder-llama-fp16`) and webgpu fp32 (`use_webgpu_fp32=true`) the cpu one, so neither is",
            "kept. The graph runs on ORT CPU; its genai_config.json names the webgpu provider.",
        ],
        builder_args=("-p", "fp16", "-e", "webgpu"),
        extra_options=("enable_webgpu_graph=true",),
        torch_atol=5e-2,
        notes=_FP16_AGAINST_FP32,
    ),
    "mistral-fp16": Arch(
        "builder-mistral-fp16",
        "MistralConfig",
        MISTRAL_CONFIG,
        [
            "A real-producer GroupQueryAttention fixture: the tiny **random-weight** Mistral of `builder-mistral`",
            "converted by onnxruntime-genai's model builder with `-p fp16 -e cuda`. The logits mean nothing. What it",
            "exercises: float16 windowed (ring) KV caches: both GroupQueryAttention nodes have `local_window_size=4`",
            "and `sliding_window_cache=1` in float16 (the builder makes window-sized caches on cpu and cuda only).",
            "The graph uses no CUDA-only op and runs on ORT CPU; its genai_config.json names the cuda provider.",
        ],
        builder_args=("-p", "fp16", "-e", "cuda"),
        torch_atol=5e-2,
        check_with_genai=True,
        notes=(
            "",
            "The torch reference is float32; the script accepts the fp16 model within 5e-2 of it. The ONNX",
            "side of the check ran through `onnxruntime_genai.Generator` on a copy of the folder whose",
            "genai_config.json asks for the CPU provider.",
        ),
    ),
    "gpt-oss": Arch(
        "builder-gpt-oss",
        "GptOssConfig",
        GPT_OSS_CONFIG,
        [
            "A real-producer GroupQueryAttention fixture: a tiny **random-weight** gpt-oss (4 experts, 2 per token)",
            "made locally and converted by onnxruntime-genai's model builder (fp32, CPU EP) with its defaults. The",
            "logits mean nothing. What it exercises: attention sinks (GQA's `head_sink` input, one value per head),",
            "sliding/full alternation (layer 0 `local_window_size=4` with `sliding_window_cache=1`, a window-sized",
            "ring cache; layer 1 full with a max-length cache), q/k/v biases and YaRN cos/sin caches. Its MLP is a",
            "contrib `MoE` (ORT-only; it remains after the rewrite).",
            *_COMMON_TAIL,
        ],
        check_with_genai=True,
        reinit=(("self_attn.sinks", 2.0),),
        notes=(
            "",
            "HF initializes the sinks with std `initializer_range`; the script redraws them with std 2 so that",
            "the sink takes a visible share of the softmax.",
            "",
            "Its windowed cache needs onnxruntime-genai's buffer management, so the script ran the ONNX side",
            "of the check through `onnxruntime_genai.Generator` (see builder-qwen2-ring).",
        ),
    ),
    "gpt-oss-fp16": Arch(
        "builder-gpt-oss-fp16",
        "GptOssConfig",
        GPT_OSS_CONFIG,
        [
            "A real-producer GroupQueryAttention fixture: the tiny **random-weight** gpt-oss of `builder-gpt-oss`",
            "converted by onnxruntime-genai's model builder with `-p fp16 -e cuda`. The logits mean nothing. What it",
            "exercises: attention sinks with a float16 windowed (ring) cache: layer 0 `local_window_size=4`,",
            "`sliding_window_cache=1` and `head_sink`, layer 1 full with `head_sink`, all float16. The graph (with the",
            "contrib `MoE` in float16) runs on ORT CPU; its genai_config.json names the cuda provider.",
        ],
        builder_args=("-p", "fp16", "-e", "cuda"),
        torch_atol=5e-2,
        check_with_genai=True,
        reinit=(("self_attn.sinks", 2.0),),
        notes=(
            "",
            "The torch reference is float32; the script accepts the fp16 model within 5e-2 of it. Sinks redrawn",
            "with std 2 as in builder-gpt-oss. The ONNX side of the check ran through",
            "`onnxruntime_genai.Generator` on a copy of the folder whose genai_config.json asks for the CPU",
            "provider.",
        ),
    ),
    "gemma3": Arch(
        "builder-gemma3",
        "Gemma3TextConfig",
        GEMMA3_CONFIG,
        [
            "A real-producer GroupQueryAttention fixture: a tiny **random-weight** Gemma 3 (text) made locally and",
            "converted by onnxruntime-genai's model builder **0.11.4 under transformers 4.57** (fp32, CPU EP): builder",
            "0.18 cannot read a transformers-5 Gemma 3 config (`KeyError: 'rope_type'`, the per-layer-type",
            "`rope_parameters`). The logits mean nothing. What it exercises: explicit q/k RMS norm before",
            "GroupQueryAttention (separate Q/K/V, `do_rotary=1`), a custom `scale` (query_pre_attn_scalar**-0.5),",
            "sliding/full alternation with a different rotary base per kind (layers 0-4 `local_window_size=4` with",
            "`cos_cache_local`/`sin_cache_local`, theta 1000; layer 5 full with the global caches, theta 10000).",
            "Builder 0.11.4 has no windowed KV cache, so every layer has a max-length cache",
            "(`past_present_share_buffer: true`); `SimplifiedLayerNormalization` / `SkipSimplifiedLayerNormalization`",
            "as on every CPU build.",
        ],
        builder_version="0.11.4",
        notes=(
            "",
            "Run with the second venv: `/work/venv-builder011/bin/python scripts/make_builder_fixture.py --arch",
            "gemma3` (torch 2.13 CPU, transformers 4.57, onnxruntime-genai 0.11.4).",
        ),
    ),
    "qwen3": Arch(
        "builder-qwen3",
        "Qwen3Config",
        QWEN3_CONFIG,
        [
            "A real-producer GroupQueryAttention fixture: a tiny **random-weight** Qwen3 made locally and converted by",
            "onnxruntime-genai's model builder (fp32, CPU EP). The logits mean nothing. What it exercises: Qwen3's",
            "q/k RMS norm as the builder writes it for the CPU EP: the packed QKV MatMul is split, Q and K each go",
            "through Reshape → SimplifiedLayerNormalization → Reshape, and GroupQueryAttention gets separate Q/K/V",
            "with `do_rotary=1` (rotary after the norm, inside the node).",
            "`SkipSimplifiedLayerNormalization` and `past_present_share_buffer: true` as on every CPU build.",
        ],
    ),
    "qwen3-webgpu": Arch(
        "builder-qwen3-webgpu",
        "Qwen3Config",
        QWEN3_CONFIG,
        [
            "A real-producer GroupQueryAttention fixture: the tiny **random-weight** Qwen3 of `builder-qwen3`",
            "converted by onnxruntime-genai's model builder with `-p fp16 -e webgpu`. The logits mean nothing. What it",
            "exercises: fused q/k norm: GroupQueryAttention gets packed QKV, `do_rotary=1`, the `q_norm_weight` /",
            "`k_norm_weight` inputs and a `qk_norm_epsilon` attribute (the builder fuses them on cuda and webgpu).",
            "ONNX Runtime CPU has no kernel for that form, so the model does not run on ORT CPU: the script saved",
            "the torch logits without an ONNX check.",
        ],
        builder_args=("-p", "fp16", "-e", "webgpu"),
        runs_on_ort_cpu=False,
    ),
    "gemma4": Arch(
        "builder-gemma4",
        "Gemma4UnifiedConfig",
        GEMMA4_TEXT_CONFIG,
        [
            "A real-producer GroupQueryAttention fixture: a tiny **random-weight** dense Gemma 4",
            "(`Gemma4UnifiedForConditionalGeneration`, text only) made locally and converted by onnxruntime-genai's",
            "model builder (fp32, CPU EP). The logits mean nothing.",
            *_GEMMA4_FORM,
            "On the CPU EP layer 0 has the builder's windowed KV cache (`sliding_window_cache=1`, a 4-row ring past);",
            "layer 1 a max-length cache (`past_present_share_buffer: true`).",
        ],
        check_with_genai=True,
        text_config=True,
        config_json=GEMMA4_CONFIG_JSON,
        notes=(
            "",
            "Its windowed cache needs onnxruntime-genai's buffer management, so the script ran the ONNX side of",
            "the check through `onnxruntime_genai.Generator` (see builder-qwen2-ring).",
            "",
            "config.json: the script adds `global_head_dim`, `num_global_key_value_heads` and",
            "`allow_global_per_layer_attribute_access` at the top level and the last in `text_config` too",
            "(see `GEMMA4_CONFIG_JSON` in the script: builder 0.18 cannot read the saved config otherwise).",
        ),
    ),
    "gemma4-webgpu": Arch(
        "builder-gemma4-webgpu-fp16",
        "Gemma4UnifiedConfig",
        GEMMA4_TEXT_CONFIG,
        [
            "A real-producer GroupQueryAttention fixture: the tiny **random-weight** Gemma 4 of `builder-gemma4`",
            "converted by onnxruntime-genai's model builder with `-p fp16 -e webgpu`. The logits mean nothing.",
            *_GEMMA4_FORM,
            "On webgpu both layers have max-length float16 caches (no windowed cache; layer 0 keeps",
            "`local_window_size=4`). The graph runs on ORT CPU; its genai_config.json names the webgpu provider.",
        ],
        builder_args=("-p", "fp16", "-e", "webgpu"),
        torch_atol=5e-2,
        text_config=True,
        config_json=GEMMA4_CONFIG_JSON,
        notes=(*_FP16_AGAINST_FP32, "", "config.json: patched as for builder-gemma4 (`GEMMA4_CONFIG_JSON`)."),
    ),
}


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.BPEDecoder()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False)
    tok.train_from_iterator(TRAINING_TEXT, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="</s>",
    )


def make_checkpoint(arch: Arch, hf_dir: Path) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    tokenizer = make_tokenizer()
    vocab_size = len(tokenizer)
    if vocab_size < 32:
        raise SystemExit(f"tiny tokenizer has only {vocab_size} tokens; add training text")

    cfg_kwargs = dict(arch.config)
    cfg_kwargs.update(
        vocab_size=vocab_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if arch.text_config:
        config = getattr(transformers, arch.config_class)(
            text_config=cfg_kwargs,
            vision_config=None,
            audio_config=None,
            tie_word_embeddings=cfg_kwargs.get("tie_word_embeddings", True),
        )
    else:
        config = getattr(transformers, arch.config_class)(**cfg_kwargs)

    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    # HF initializes Linear biases to zero, and the builder drops an all-zero bias (Qwen2's q/k/v biases would
    # vanish), so give every bias random values like the weights'. Llama has none: its weights are unchanged.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0.0, arch.config["initializer_range"])
        for name, parameter in model.named_parameters():
            for suffix, std in arch.reinit:
                if name.endswith(suffix):
                    parameter.normal_(0.0, std)
    widths = {
        m.out_features
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head")
    }
    if vocab_size in widths:
        raise SystemExit(
            f"vocab_size {vocab_size} equals a projection width {sorted(widths)}; the builder would "
            "mistake that projection for the LM head"
        )
    model.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    saved = json.loads((hf_dir / "config.json").read_text())
    for section, values in arch.config_json.items():
        (saved[section] if section else saved).update(values)
    if arch.config_json:
        (hf_dir / "config.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    return saved


def builder_options(arch: Arch) -> list[str]:
    options = list(arch.builder_args)
    if arch.extra_options:
        options += ["--extra_options", *arch.extra_options]
    return options


def run_builder(arch: Arch, hf_dir: Path, out_dir: Path, cache_dir: Path) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "onnxruntime_genai.models.builder",
        "-i",
        str(hf_dir),
        "-o",
        str(out_dir),
        *arch.builder_args,
        "-c",
        str(cache_dir),
    ]
    if arch.extra_options:
        cmd += ["--extra_options", *arch.extra_options, *_scale_file_option(arch, cache_dir.parent)]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return cmd


def _scale_file_option(arch: Arch, folder: Path | None) -> list[str]:
    """``kv_cache_scale_file=PATH`` for an arch with a quantized KV cache (the file written into ``folder``;
    without a folder, the name shown in PROVENANCE.md)."""
    if not arch.kv_cache_scales:
        return []
    if folder is None:
        return ["kv_cache_scale_file=kv_scales.json"]
    path = folder / "kv_scales.json"
    path.write_text(_scale_json(arch))
    return [f"kv_cache_scale_file={path}"]


def _scale_json(arch: Arch) -> str:
    scales = {"k_scales": [k for k, _ in arch.kv_cache_scales], "v_scales": [v for _, v in arch.kv_cache_scales]}
    return json.dumps({"scales": scales})


def copy_outputs(arch: Arch, out_dir: Path, dest: Path) -> dict:
    import onnx

    # Loads model.onnx.data too (it sits beside model.onnx); saving without external data inlines every weight.
    model = onnx.load(str(out_dir / "model.onnx"), load_external_data=True)
    if arch.drop_value_info:
        _drop_value_info(model)
    stale = ("model.onnx", "model.onnx.data", "reference.npz")
    notes = write_model(model, dest, stale=stale, ir_key="builder_ir_version")
    with open(out_dir / "genai_config.json") as f:
        genai = json.load(f)
    with open(dest / "genai_config.json", "w") as f:
        json.dump(genai, f, indent=4)
        f.write("\n")
    return notes


def _drop_value_info(model) -> None:
    """Remove the declared shapes of the graph's intermediate values (graph inputs and outputs keep theirs)."""
    print(f"dropped the builder's {len(model.graph.value_info)} value_info entries")
    del model.graph.value_info[:]


def _past_feed(inp, config: dict):
    """An empty past for one graph input: [1, kv_heads, 0, head_size], read from the input's shape (dims that are
    symbolic there come from the HF config)."""
    import numpy as np

    dims = inp.shape
    kv_heads = dims[1] if isinstance(dims[1], int) else config["num_key_value_heads"]
    head_size = (
        dims[3]
        if isinstance(dims[3], int)
        else config.get("head_dim") or (config["hidden_size"] // config["num_attention_heads"])
    )
    dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int8)": np.int8}[inp.type]
    return np.zeros((1, kv_heads, 0, head_size), dtype=dtype)


def check_against_torch(arch: Arch, hf_dir: Path, dest: Path, config: dict) -> dict:
    """Run the fixture with ORT (prefill, then one decode step feeding present back as past) and compare its logits
    with the Hugging Face torch model's. Saves the prompt and the torch logits as ``reference.npz``."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(hf_dir)
    ids = [tokenizer.bos_token_id] + tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        prefill = model(torch.tensor([ids])).logits[0, -len(ids) :].numpy()
        next_id = int(prefill[-1].argmax())
        full = model(torch.tensor([ids + [next_id]])).logits[0].numpy()
    decode = full[-1:]

    if not arch.runs_on_ort_cpu:
        diffs = None
    else:
        if arch.check_with_genai:
            ort_prefill, ort_decode = _run_genai(dest, ids, next_id)
        else:
            ort_prefill, ort_decode = _run_ort(dest, ids, next_id, config)
        diffs = {
            "prefill": float(np.abs(ort_prefill - prefill).max()),
            "decode": float(np.abs(ort_decode - decode).max()),
        }
        print(f"max |ORT - torch| logits: {diffs}")
        if arch.torch_atol is not None and max(diffs.values()) > arch.torch_atol:
            raise SystemExit(f"builder model does not match the torch model: {diffs}")
    if arch.torch_atol is None:
        return {"ids": ids, "next_id": next_id, "diffs": diffs, "reference": False}
    np.savez(
        dest / "reference.npz",
        input_ids=np.array([ids], dtype=np.int64),
        next_id=np.array([[next_id]], dtype=np.int64),
        prefill_logits=prefill[None].astype(np.float32),
        decode_logits=decode[None].astype(np.float32),
    )
    return {"ids": ids, "next_id": next_id, "diffs": diffs, "reference": True}


def _run_genai(dest: Path, ids: list[int], next_id: int):
    """Prefill and one decode step through onnxruntime-genai (which allocates and binds the KV buffers)."""
    import numpy as np
    import onnxruntime_genai as og

    # A copy whose genai_config.json asks for the CPU provider (the fixture's may name cuda, dml or webgpu).
    folder = Path(tempfile.mkdtemp(prefix="genai-check-"))
    shutil.copy(dest / "model.onnx", folder / "model.onnx")
    genai = json.loads((dest / "genai_config.json").read_text())
    genai["model"]["decoder"]["session_options"]["provider_options"] = []
    (folder / "genai_config.json").write_text(json.dumps(genai))
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 8)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([ids], dtype=np.int32))
    prefill = np.array(generator.get_output("logits"))[0].astype(np.float32)
    generator.append_tokens(np.array([[next_id]], dtype=np.int32))
    decode = np.array(generator.get_output("logits"))[0].astype(np.float32)
    del generator, model
    shutil.rmtree(folder, ignore_errors=True)
    return prefill, decode


def _run_ort(dest: Path, ids: list[int], next_id: int, config: dict):
    """Prefill with an empty past, then one decode step with present fed back as past, on a plain ORT session."""
    import numpy as np
    import onnxruntime as ort

    sess = ort.InferenceSession(str(dest / "model.onnx"), providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in sess.get_inputs()}
    past_names = [name for name in inputs if name.startswith("past_key_values.")]

    def feeds_for(step_ids, total, past):
        feeds = {
            "input_ids": np.array([step_ids], dtype=np.int64),
            "attention_mask": np.ones((1, total), dtype=np.int64),
            **past,
        }
        if "position_ids" in inputs:
            feeds["position_ids"] = np.arange(total - len(step_ids), total, dtype=np.int64)[None]
        return feeds

    out_names = [o.name for o in sess.get_outputs()]
    past = {name: _past_feed(inputs[name], config) for name in past_names}
    outs = dict(zip(out_names, sess.run(None, feeds_for(ids, len(ids), past))))
    ort_prefill = outs["logits"][0].astype(np.float32)
    past = {name: outs[name.replace("past_key_values", "present")] for name in past_names}
    ort_decode = sess.run(["logits"], feeds_for([next_id], len(ids) + 1, past))[0][0].astype(np.float32)
    return ort_prefill, ort_decode


def gqa_attributes(dest: Path) -> list[str]:
    """One line per GroupQueryAttention node: its non-default-looking attributes."""
    import onnx

    model = onnx.load(str(dest / "model.onnx"))
    lines = []
    for node in model.graph.node:
        if node.op_type == "GroupQueryAttention":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            shown = ", ".join(f"{k}={round(v, 6) if isinstance(v, float) else v}" for k, v in sorted(attrs.items()))
            lines.append(f"- `{node.name}`: {shown}")
    return lines


def write_provenance(arch: Arch, dest: Path, cfg: dict, cmd: list[str], notes: dict, check: dict) -> None:
    versions = {
        name: md.version(name)
        for name in ("torch", "transformers", "tokenizers", "onnxruntime-genai", "onnxruntime", "onnx", "onnx-ir")
    }
    shown_cmd = [
        "python",
        "-m",
        "onnxruntime_genai.models.builder",
        "-i",
        "HF_DIR",
        "-o",
        "OUT",
        *arch.builder_args,
        "-c",
        "CACHE_DIR",
    ]
    if arch.extra_options:
        shown_cmd += ["--extra_options", *arch.extra_options, *_scale_file_option(arch, None)]
    scale_lines = []
    if arch.kv_cache_scales:
        scale_lines = [
            "`kv_scales.json`, written by the script (one fixed scale per layer, no calibration):",
            "",
            "```json",
            _scale_json(arch),
            "```",
            "",
        ]
    ir_line = f"- IR version written by the builder: {notes['builder_ir_version']}"
    if "ir_patched_to" in notes:
        ir_line += f"; patched down to {notes['ir_patched_to']} by the script"
    else:
        ir_line += " (kept as is)"
    if arch.folder == ARCHS["llama"].folder:
        config_source = [
            f"The checkpoint's `config.json` as `save_pretrained` wrote it (`{arch.config_class}` with the values in the script's",
            "`CONFIG`, `vocab_size` = the tiny tokenizer's size, and its bos/eos/pad ids):",
        ]
        regenerate = "Made by `scripts/make_builder_fixture.py` (run it with the builder venv below to regenerate)."
        gqa_section = []
    else:
        name = next(k for k, v in ARCHS.items() if v is arch)
        config_source = [
            f"The checkpoint's `config.json` as `save_pretrained` wrote it (`{arch.config_class}` with the values in the",
            f"script's `ARCHS[{name!r}].config`, `vocab_size` = the tiny tokenizer's size, and its bos/eos/pad ids):",
        ]
        regenerate = (
            f"Made by `scripts/make_builder_fixture.py --arch {name}` (run it with the builder venv below to"
            " regenerate)."
        )
        gqa_lines = gqa_attributes(dest)
        gqa_section = ["## GroupQueryAttention nodes", "", *gqa_lines, ""] if gqa_lines else []
    lines = [
        f"# {arch.folder}",
        "",
        *arch.intro,
        "",
        regenerate,
        "",
        "## Versions",
        "",
        f"- Python {sys.version.split()[0]}",
        *[f"- {k} {v}" for k, v in versions.items()],
        "",
        "## Hugging Face config",
        "",
        *config_source,
        "",
        "```json",
        json.dumps(cfg, indent=2, sort_keys=True),
        "```",
        "",
        f"Weights: `torch.manual_seed({SEED})` then `AutoModelForCausalLM.from_config(config)`, float32, with",
        f"`initializer_range={arch.config['initializer_range']}` (not HF's 0.02) so attention is far from uniform.",
        f"Tokenizer: `tokenizers` BPE (vocab_size={TOKENIZER_VOCAB_SIZE}, whitespace pre-tokenizer, specials"
        f" {', '.join(SPECIAL_TOKENS)}) trained on {len(TRAINING_TEXT)} short strings, wrapped in"
        " `PreTrainedTokenizerFast` and saved beside the weights (the builder needs one; its files are not kept here).",
        "",
        "## Command",
        "",
        "```",
        " ".join(shown_cmd),
        "```",
        "",
        *scale_lines,
        *gqa_section,
        "## Post-processing by the script",
        "",
        "- The builder always writes weights to `model.onnx.data`; the script reloads them and saves a single",
        "  self-contained `model.onnx` (`onnx.save_model(..., save_as_external_data=False)`). Graph unchanged.",
        ir_line,
        f"- Opsets: {json.dumps(notes['opsets'])}",
        "- `genai_config.json` is copied unchanged (re-indented); the tokenizer files are not kept, so",
        "  `onnxruntime_genai.Model` can load the folder but `og.Tokenizer` cannot: feed token ids directly.",
        "",
        *_reference_lines(arch, check),
        *arch.notes,
        "",
    ]
    (dest / "PROVENANCE.md").write_text("\n".join(lines))


def _reference_lines(arch: Arch, check: dict) -> list[str]:
    if not check["reference"]:
        return [
            "## No reference.npz",
            "",
            (
                "The int8 KV cache rounds every cached key and value"
                if arch.kv_cache_scales
                else "The int4 weights are not the checkpoint's"
            )
            + ", so the float32 torch model is no reference: on the prompt",
            f"`<s> {PROMPT}` the ONNX model's logits are {check['diffs']['prefill']:.2g} (prefill) and"
            f" {check['diffs']['decode']:.2g} (decode) away from it. The tests compare the rewrite with the original",
            "ONNX model only.",
        ]
    return [
        "## reference.npz",
        "",
        f"The Hugging Face torch model's logits for the prompt `<s> {PROMPT}` (token ids {check['ids']}):",
        "`input_ids` [1, S], `prefill_logits` [1, S, vocab]; then greedy `next_id` [1, 1] and `decode_logits`",
        "[1, 1, vocab] (logits of the next step, from the torch model run on the whole S+1 tokens).",
        *_check_lines(arch, check),
    ]


def _check_lines(arch: Arch, check: dict) -> list[str]:
    if check["diffs"] is None:
        return ["ORT CPU cannot run this graph, so the script did not compare the ONNX model with them."]
    runner = (
        "onnxruntime-genai's generator on CPU (prompt, then one token)"
        if arch.check_with_genai
        else "ORT CPU (prefill with empty past `[1, kv_heads, 0, head_dim]`, then one decode step with present fed"
        " back as past)"
    )
    return [
        f"The script checked the ONNX model against them with {runner}: max |diff| prefill"
        f" {check['diffs']['prefill']:.2e}, decode {check['diffs']['decode']:.2e}."
    ]


def make_fixture(arch: Arch, out: Path, keep_tmp: bool) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f"{arch.folder}-"))
    try:
        hf_dir, out_dir, cache_dir = tmp / "hf", tmp / "out", tmp / "cache"
        cfg = make_checkpoint(arch, hf_dir)
        cmd = run_builder(arch, hf_dir, out_dir, cache_dir)
        notes = copy_outputs(arch, out_dir, out)
        check = check_against_torch(arch, hf_dir, out, cfg)
        write_provenance(arch, out, cfg, cmd, notes, check)
        for p in sorted(out.iterdir()):
            print(f"{p.relative_to(REPO) if p.is_relative_to(REPO) else p}: {p.stat().st_size} bytes")
    finally:
        if keep_tmp:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--arch", default="llama", choices=[*ARCHS, "all"], help="which fixture to make (default: %(default)s)"
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="destination folder (default: models/<the arch's folder>; not with --arch all)",
    )
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temporary checkpoint and builder output")
    args = ap.parse_args()
    if args.arch == "all":
        if args.out is not None:
            ap.error("--out cannot be used with --arch all")
        for arch in ARCHS.values():
            if md.version("onnxruntime-genai") == arch.builder_version:
                make_fixture(arch, MODELS / arch.folder, args.keep_tmp)
            else:
                print(f"skipping {arch.folder}: it needs onnxruntime-genai {arch.builder_version}")
    else:
        arch = ARCHS[args.arch]
        make_fixture(arch, args.out or MODELS / arch.folder, args.keep_tmp)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    main()
