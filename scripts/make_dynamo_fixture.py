"""Make the real-producer fixtures ``models/dynamo-tiny-llama/``, ``models/dynamo-qwen3/`` (``--arch qwen3``) and
``models/dynamo-llama-mha/`` (``--arch llama-mha``) from the second producer family:
``torch.onnx.export(..., dynamo=True)`` followed by onnxscript's ORT fusions
(``onnxscript.rewriter.ort_fusions.optimize_for_ort``).

A tiny random-weight Llama (``LlamaConfig`` below, ``torch.manual_seed(0)``) is exported with past/present KV
caches, fused, and saved as one self-contained ``model.onnx``. The script checks that the fused graph holds
``com.microsoft.GroupQueryAttention`` nodes, runs it with ONNX Runtime (prefill with an empty past, then one decode
step feeding present back as past) against the torch model, saves the torch logits as ``reference.npz``, and writes
``PROVENANCE.md``. Nothing is downloaded.

The fusion makes GroupQueryAttention only from transformers 4.x graphs (with transformers 5 it makes
MultiHeadAttention) and only when num_key_value_heads < num_attention_heads, so it needs its own venv:

    python3 -m venv /work/venv-dynamo
    /work/venv-dynamo/bin/pip install torch==2.13.0          # CPU build; never plain `torch`
    /work/venv-dynamo/bin/pip install "transformers==4.57.*" onnxscript onnx "onnxruntime>=1.31,<1.32" onnx-ir
    /work/venv-dynamo/bin/python scripts/make_dynamo_fixture.py               # dynamo-tiny-llama
    /work/venv-dynamo/bin/python scripts/make_dynamo_fixture.py --arch qwen3  # dynamo-qwen3
    /work/venv-dynamo/bin/python scripts/make_dynamo_fixture.py --arch llama-mha  # dynamo-llama-mha

``--arch qwen3`` exports a tiny Qwen3 (``Qwen3Config``): its q/k RMS norm comes out of the fusion as a
default-domain ``SimplifiedLayerNormalization`` on the heads before GroupQueryAttention, with no value_info for its
output (ORT's symbolic shape inference cannot type it). Its norm weights are redrawn around 1 (HF initializes them
to ones, which the optimizer folds onto one shared initializer and which would hide a dropped weight).

``--arch llama-mha`` exports the Llama with num_key_value_heads == num_attention_heads: the fusion then writes
``com.microsoft.MultiHeadAttention`` (BSD Q/K/V, a 4-D causal ``attention_bias``, past/present) after contrib
``RotaryEmbedding`` nodes whose cos/sin are computed in the graph, and no GroupQueryAttention at all. Its MLP is
narrower (``intermediate_size`` 32) to keep the file under 300 KB with the wider K/V, and its norm weights are
redrawn as for Qwen3.

How the caches are exported: the model is wrapped in a module whose inputs are ``input_ids``, ``attention_mask``,
``position_ids`` and one tensor per layer for ``past_key_values.{i}.key`` / ``.value``; its forward puts them into a
``transformers`` ``DynamicCache`` (``cache.update(k, v, layer)``) and calls the model with it, and returns the logits
and each layer's cache tensors as ``present.{i}.key`` / ``.value``. (Passing the ``DynamicCache`` itself as an export
input after ``transformers.integrations.executorch.register_dynamic_cache_export_support()`` fails in torch 2.13's
decomposition step: ``SpecViolationError: Constant tensor lifted_tensor_4 is not in the constants dictionary``.)
"""

from __future__ import annotations

import collections
import importlib.metadata as md
import json
import platform
import sys
from pathlib import Path

from fixture_io import write_model  # scripts/fixture_io.py (the script's folder is on sys.path)

REPO = Path(__file__).resolve().parent.parent
DEST = REPO / "models" / "dynamo-tiny-llama"  # the chosen arch's folder (main() sets it)

SEED = 0
ATTN_IMPLEMENTATION = "sdpa"  # transformers' default for Llama; the fusion's SDPA pattern matches its export

CONFIG = {
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # < heads: with Hkv = H the fusion makes MultiHeadAttention instead of GQA
    "head_dim": 16,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "vocab_size": 96,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    # HF's default 0.02 gives a near-uniform softmax that would hide rotary / mask / KV mistakes in a rewrite.
    "initializer_range": 0.2,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
}

# Example shapes for torch.export (all of batch, seq, past_seq and total are dynamic in the ONNX graph).
EXAMPLE_BATCH, EXAMPLE_SEQ, EXAMPLE_PAST = 2, 3, 4
# The prompt of reference.npz: the builder-tiny-llama fixture's token ids (there is no tokenizer here).
PROMPT_IDS = [1, 30, 33, 17, 48, 79, 36, 45, 76, 68, 26]
TORCH_ATOL = 1e-4

# Qwen3 as Llama's CONFIG (Qwen3 has no mlp_bias switch); head_dim 16: q_norm / k_norm over 16 values.
QWEN3_CONFIG = dict({k: v for k, v in CONFIG.items() if k != "mlp_bias"}, use_sliding_window=False)
NORM_STD = 0.2  # qwen3: every RMSNorm weight redrawn as 1 + N(0, NORM_STD)

# llama-mha: Hkv = H, so the fusion makes MultiHeadAttention; a narrower MLP keeps the file under 300 KB.
MHA_CONFIG = dict(CONFIG, num_key_value_heads=4, intermediate_size=32)
# The fused attention op each arch's export must hold.
EXPECTED_OP = {"llama": "GroupQueryAttention", "qwen3": "GroupQueryAttention", "llama-mha": "MultiHeadAttention"}
REDRAWN_NORMS = ("qwen3", "llama-mha")

ARCHS = {
    # --arch: (folder, transformers config class, model class, config)
    "llama": ("dynamo-tiny-llama", "LlamaConfig", "LlamaForCausalLM", CONFIG),
    "qwen3": ("dynamo-qwen3", "Qwen3Config", "Qwen3ForCausalLM", QWEN3_CONFIG),
    "llama-mha": ("dynamo-llama-mha", "LlamaConfig", "LlamaForCausalLM", MHA_CONFIG),
}
ARCH = "llama"  # main() sets it


def make_model():
    import torch
    import transformers

    _, config_class, model_class, values = ARCHS[ARCH]
    config = getattr(transformers, config_class)(**values)
    torch.manual_seed(SEED)
    model = getattr(transformers, model_class)._from_config(
        config, attn_implementation=ATTN_IMPLEMENTATION, dtype=torch.float32
    )
    if ARCH in REDRAWN_NORMS:
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name.endswith("norm.weight"):
                    parameter.copy_(1.0 + NORM_STD * torch.randn(parameter.shape))
    return model.eval()


def make_wrapper(model):
    import torch
    from transformers.cache_utils import DynamicCache

    layers = model.config.num_hidden_layers

    class WithFlatCache(torch.nn.Module):
        """The HF model with its DynamicCache flattened into named tensors (past in, present out)."""

        def __init__(self, inner):
            super().__init__()
            self.m = inner

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache()
            for i in range(layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.m(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            )
            presents = []
            for layer in out.past_key_values.layers:
                presents += [layer.keys, layer.values]
            return (out.logits, *presents)

    return WithFlatCache(model)


def io_names(layers: int):
    inputs = ["input_ids", "attention_mask", "position_ids"]
    outputs = ["logits"]
    for i in range(layers):
        inputs += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outputs += [f"present.{i}.key", f"present.{i}.value"]
    return inputs, outputs


def export(model):
    import torch

    cfg = model.config
    layers, kv_heads = cfg.num_hidden_layers, cfg.num_key_value_heads
    b, s, p = EXAMPLE_BATCH, EXAMPLE_SEQ, EXAMPLE_PAST
    gen = torch.Generator().manual_seed(SEED)
    input_ids = torch.randint(0, cfg.vocab_size, (b, s), generator=gen)
    attention_mask = torch.ones(b, p + s, dtype=torch.int64)
    position_ids = torch.arange(p, p + s).unsqueeze(0).expand(b, s).contiguous()
    past = [torch.randn(b, kv_heads, p, cfg.head_dim, generator=gen) for _ in range(2 * layers)]

    batch = torch.export.Dim("batch")
    seq = torch.export.Dim("seq")
    past_seq = torch.export.Dim("past_seq")
    total = torch.export.Dim("total")
    dynamic_shapes = {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total},
        "position_ids": {0: batch, 1: seq},
        "past": tuple({0: batch, 2: past_seq} for _ in range(2 * layers)),
    }
    input_names, output_names = io_names(layers)
    program = torch.onnx.export(
        make_wrapper(model),
        (input_ids, attention_mask, position_ids, *past),
        input_names=input_names,
        output_names=output_names,
        dynamic_shapes=dynamic_shapes,
        dynamo=True,
        optimize=True,
    )
    return program.model  # an onnx_ir.Model


def fuse(exported):
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    exported_ops = collections.Counter(node.op_type for node in exported.graph)
    # clear_metadata drops the exporter's per-node stack traces (local file paths, ~half the file size).
    fused, counts = optimize_for_ort(exported, clear_metadata=True)
    ops = collections.Counter(f"{node.domain}::{node.op_type}" if node.domain else node.op_type for node in fused.graph)
    wanted = EXPECTED_OP[ARCH]
    if not ops.get(f"com.microsoft::{wanted}"):
        raise SystemExit(f"optimize_for_ort made no {wanted}: fusions {counts}, ops {dict(ops)}")
    return fused, counts, exported_ops, ops


def save(fused) -> dict:
    import onnx_ir as ir

    proto = ir.serde.serialize_model(fused)
    stale = ("model.onnx", "reference.npz")
    return write_model(proto, DEST, stale=stale, ir_key="exported_ir_version", max_bytes=1 << 20, limit="1 MiB")


def gqa_summary(path: Path) -> list[str]:
    import onnx
    from onnx import helper

    model = onnx.load(str(path))
    lines = []
    for node in model.graph.node:
        if node.op_type == EXPECTED_OP[ARCH]:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            lines.append(f"- `{node.name}`: attributes {attrs}; inputs {list(node.input)}")
    return lines


def check_against_torch(model) -> dict:
    """ORT on the saved fixture vs the torch model: prefill with an empty past, then the greedy next token with
    present fed back as past. Saves reference.npz."""
    import numpy as np
    import onnxruntime as ort
    import torch

    cfg = model.config
    ids = PROMPT_IDS
    length = len(ids)
    with torch.no_grad():
        prefill = model(torch.tensor([ids])).logits[0].numpy()
        next_id = int(prefill[-1].argmax())
        decode = model(torch.tensor([ids + [next_id]])).logits[0, -1:].numpy()

    session = ort.InferenceSession(str(DEST / "model.onnx"), providers=["CPUExecutionProvider"])
    layers = cfg.num_hidden_layers
    empty = np.zeros((1, cfg.num_key_value_heads, 0, cfg.head_dim), np.float32)
    feeds = {
        "input_ids": np.array([ids], np.int64),
        "attention_mask": np.ones((1, length), np.int64),
        "position_ids": np.arange(length, dtype=np.int64)[None],
    }
    for i in range(layers):
        feeds[f"past_key_values.{i}.key"] = feeds[f"past_key_values.{i}.value"] = empty
    names = [o.name for o in session.get_outputs()]
    out = dict(zip(names, session.run(None, feeds)))
    decode_feeds = {
        "input_ids": np.array([[next_id]], np.int64),
        "attention_mask": np.ones((1, length + 1), np.int64),
        "position_ids": np.array([[length]], np.int64),
    }
    for i in range(layers):
        for kind in ("key", "value"):
            decode_feeds[f"past_key_values.{i}.{kind}"] = out[f"present.{i}.{kind}"]
    out2 = dict(zip(names, session.run(None, decode_feeds)))
    diffs = {
        "prefill": float(np.abs(out["logits"][0] - prefill).max()),
        "decode": float(np.abs(out2["logits"][0] - decode).max()),
    }
    print(f"max |ORT - torch| logits: {diffs}")
    if max(diffs.values()) > TORCH_ATOL:
        raise SystemExit(f"fused model does not match the torch model: {diffs}")
    np.savez(
        DEST / "reference.npz",
        input_ids=feeds["input_ids"],
        attention_mask=feeds["attention_mask"],
        position_ids=feeds["position_ids"],
        next_id=decode_feeds["input_ids"],
        prefill_logits=prefill[None].astype(np.float32),
        decode_logits=decode[None].astype(np.float32),
    )
    return {"next_id": next_id, "diffs": diffs}


def versions() -> dict:
    out = {"Python": platform.python_version()}
    for dist in ("torch", "transformers", "onnxscript", "onnx-ir", "onnx", "onnxruntime"):
        out[dist] = md.version(dist)
    return out


LLAMA_INTRO = [
    "A real-producer GroupQueryAttention fixture from the *second* producer family: a tiny **random-weight**",
    "Llama exported by `torch.onnx.export(..., dynamo=True)` and fused by onnxscript's",
    "`onnxscript.rewriter.ort_fusions.optimize_for_ort`. The logits mean nothing. What it exercises, unlike the",
    "builder fixtures: GroupQueryAttention with **separate Q/K/V** (three MatMul outputs), **no `scale`**",
    "attribute (default 1/sqrt(head_size)), `do_rotary=1` with **cos/sin caches computed in the graph**",
    "(`Cos`/`Sin` of `Range(0, max(position_ids) + 1)` x inv_freq, so their row count depends on the input), and",
    "**`seqlens_k` / `total_sequence_length` derived from `position_ids`** (`ReduceMax` over the sequence, cast",
    "to int32; total = max over the batch + 1). The `attention_mask` input is left **unused** by the fused graph",
    "(the fusion assumes a 0/1 mask that only marks the current tokens). Past and present caches are separate",
    "buffers (`[batch, 2, past_seq, 16]` in, `[batch, 2, past_seq + seq, 16]` out), not a shared max-length one.",
]
QWEN3_INTRO = [
    "A real-producer GroupQueryAttention fixture from the *second* producer family: a tiny **random-weight**",
    "Qwen3 exported by `torch.onnx.export(..., dynamo=True)` and fused by onnxscript's",
    "`onnxscript.rewriter.ort_fusions.optimize_for_ort`. The logits mean nothing. What it exercises beyond",
    "`dynamo-tiny-llama` (same GQA form otherwise: separate Q/K/V, no `scale`, `do_rotary=1` with cos/sin computed",
    "in the graph, lengths from `position_ids`, growing separate past/present): Qwen3's **q/k RMS norm** as the",
    "fusion writes it, a **default-domain `SimplifiedLayerNormalization`** on the heads of Q and of K before",
    "GroupQueryAttention, whose outputs have **no value_info** (ORT's symbolic shape inference crashes on it:",
    "`TypeError: object of type 'NoneType' has no len()`), so the GQA node's query type is unknown to a",
    "rewrite that relies on it.",
]

MHA_INTRO = [
    "A real-producer **MultiHeadAttention** fixture from the *second* producer family: a tiny **random-weight**",
    "Llama with num_key_value_heads == num_attention_heads (4), exported by `torch.onnx.export(..., dynamo=True)`",
    "and fused by onnxscript's `onnxscript.rewriter.ort_fusions.optimize_for_ort`, which then writes",
    "`com.microsoft.MultiHeadAttention` instead of GroupQueryAttention. The logits mean nothing. What it",
    "exercises: **no GroupQueryAttention at all**; MultiHeadAttention with BSD **Q/K/V from contrib",
    "`RotaryEmbedding`** nodes whose outputs have **no value_info**, rotary tables **computed in the graph**",
    "(`Cos`/`Sin` of a `Range` up to max(position_ids) + 1: a symbolic row count), a 4-D causal-and-padding",
    "**`attention_bias`** `[batch, 1, seq, past_seq + seq]` built from `attention_mask`, and **past/present**",
    "caches `[batch, 4, past_seq, 16]` that grow by concatenation.",
]


def write_provenance(model, counts, exported_ops, ops, notes, check) -> None:
    config = model.config.to_diff_dict()
    for volatile in ("transformers_version",):
        config.pop(volatile, None)
    fusions = {k: v for k, v in counts.items() if v}
    intro = {"qwen3": QWEN3_INTRO, "llama-mha": MHA_INTRO}.get(ARCH, LLAMA_INTRO)
    folder, config_class, model_class, _ = ARCHS[ARCH]
    config_name = {"qwen3": "QWEN3_CONFIG", "llama-mha": "MHA_CONFIG"}.get(ARCH, "CONFIG")
    lines = [
        f"# {folder}",
        "",
        *intro,
        "",
        "Made by `scripts/make_dynamo_fixture.py"
        + (f" --arch {ARCH}" if ARCH != "llama" else "")
        + "` (run it with the venv below to regenerate).",
        "",
        "## Versions",
        "",
        *[f"- {k} {v}" for k, v in versions().items()],
        "",
        "## Model",
        "",
        f"`{config_class}(**{config_name})` with the script's `{config_name}`, `torch.manual_seed({SEED})`, then",
        f'`{model_class}._from_config(config, attn_implementation="{ATTN_IMPLEMENTATION}")`, float32, eval mode.',
        *(
            [f"Then every RMSNorm weight (`*norm.weight`, q/k norm included) is redrawn as 1 + N(0, {NORM_STD})."]
            if ARCH in REDRAWN_NORMS
            else []
        ),
        f"The config as `to_diff_dict()` gives it (values that differ from `{config_class}()` defaults):",
        "",
        "```json",
        json.dumps(config, indent=2, sort_keys=True),
        "```",
        "",
        "## Commands",
        "",
        "```",
        "python3 -m venv /work/venv-dynamo",
        "/work/venv-dynamo/bin/pip install torch==2.13.0          # the local CPU wheel; never plain `torch`",
        '/work/venv-dynamo/bin/pip install "transformers==4.57.*" onnxscript onnx "onnxruntime>=1.31,<1.32" onnx-ir',
        "/work/venv-dynamo/bin/python scripts/make_dynamo_fixture.py" + (f" --arch {ARCH}" if ARCH != "llama" else ""),
        "```",
        "",
        "Inside the script:",
        "",
        "```python",
        "program = torch.onnx.export(WithFlatCache(model), (input_ids, attention_mask, position_ids, *past),",
        "                            input_names=[...], output_names=[...], dynamic_shapes={...},",
        "                            dynamo=True, optimize=True)",
        "fused, counts = onnxscript.rewriter.ort_fusions.optimize_for_ort(program.model, clear_metadata=True)",
        "```",
        "",
        "`WithFlatCache` takes `input_ids`, `attention_mask`, `position_ids` and `past_key_values.{i}.key/value`,",
        "fills a `transformers.cache_utils.DynamicCache` with the pasts (`cache.update(k, v, i)`), calls the model",
        "with it, and returns `logits` and `present.{i}.key/value` (the cache's tensors after the call). Example",
        f"shapes for torch.export: batch {EXAMPLE_BATCH}, seq {EXAMPLE_SEQ}, past {EXAMPLE_PAST}; batch, seq, past_seq and",
        "total (the mask length) are `torch.export.Dim`s. Exporting the model with the `DynamicCache` itself as an",
        "input (after `transformers.integrations.executorch.register_dynamic_cache_export_support()`) fails in torch",
        "2.13's decomposition step (`SpecViolationError: Constant tensor lifted_tensor_4 is not in the constants",
        "dictionary`), hence the wrapper.",
        "",
        "## What the fusion did",
        "",
        f"- Exported graph ops: {dict(sorted(exported_ops.items()))}",
        f"- Fusions applied (non-zero counts of `optimize_for_ort`): {fusions}",
        f"- Fused graph ops: {dict(sorted(ops.items()))}",
        f"- {EXPECTED_OP[ARCH]} nodes:",
        *["  " + line for line in gqa_summary(DEST / "model.onnx")],
        *(
            [
                "- The RMSNorm weights are all ones (HF's init), so the optimizer folded every norm onto one shared",
                "  initializer (`m.model.layers.0.input_layernorm.weight`).",
            ]
            if ARCH == "llama"
            else []
        ),
        "",
        "## Post-processing by the script",
        "",
        "- `onnx_ir` model serialized and saved with `onnx.save_model(..., save_as_external_data=False)`: one",
        f"  self-contained file ({notes['size']} bytes).",
        f"- IR version written by the exporter: {notes['exported_ir_version']}"
        + (f" (patched to {notes['ir_patched_to']})" if "ir_patched_to" in notes else " (kept as is)"),
        f"- Opsets: {json.dumps(notes['opsets'])}",
        "",
        "## reference.npz",
        "",
        f"The torch model's logits for the token ids {PROMPT_IDS} (the builder-tiny-llama prompt's ids):",
        "`input_ids` [1, S], with the feeds the ONNX model takes for it (`attention_mask` ones [1, S], `position_ids`",
        f"0..S-1 [1, S], empty pasts `[1, {model.config.num_key_value_heads}, 0, 16]`), `prefill_logits` [1, S, vocab];"
        " then the greedy `next_id` [1, 1]",
        "(fed with `attention_mask` ones [1, S+1], `position_ids` [[S]] and the presents as pasts) and",
        "`decode_logits` [1, 1, vocab] (the torch model run on all S+1 tokens). The script checked the fused ONNX",
        f"model with ORT CPU against them: max |diff| prefill {check['diffs']['prefill']:.2e},",
        f"decode {check['diffs']['decode']:.2e}.",
        "",
    ]
    (DEST / "PROVENANCE.md").write_text("\n".join(lines))


def main() -> None:
    import argparse

    import transformers

    global ARCH, DEST
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=ARCHS, default="llama", help="which fixture (default: %(default)s)")
    ARCH = parser.parse_args().arch
    DEST = REPO / "models" / ARCHS[ARCH][0]
    if int(transformers.__version__.split(".")[0]) >= 5:
        sys.exit(f"transformers {transformers.__version__}: the fusion makes GroupQueryAttention only from 4.x graphs")
    model = make_model()
    exported = export(model)
    fused, counts, exported_ops, ops = fuse(exported)
    print("fusions:", {k: v for k, v in counts.items() if v})
    print("ops:", dict(ops))
    notes = save(fused)
    check = check_against_torch(model)
    write_provenance(model, counts, exported_ops, ops, notes, check)
    print(f"wrote {DEST}")


if __name__ == "__main__":
    main()
