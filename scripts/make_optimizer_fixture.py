"""Make the real-producer fixture ``models/optimizer-tiny-bert/``: ONNX Runtime's transformers optimizer
(``onnxruntime.transformers.optimizer.optimize_model``) on a tiny random-weight BERT exported by the TorchScript
exporter (``torch.onnx.export(..., dynamo=False)``), the graphs that optimizer's fusions are written for.

The optimizer fuses the BERT into ``EmbedLayerNormalization`` (word + position + token-type embeddings and their
norm, with the mask's row sums as ``mask_index``), contrib ``Attention`` (packed QKV weights, a 1-D ``mask_index``,
``mask_filter_value`` = float min), ``SkipLayerNormalization``, ``BiasGelu`` and, at opset 14, a default-domain
``LayerNormalization`` (ORT's own schema: the standard one is opset 17). The script checks those ops are there,
runs the fused model with ONNX Runtime against the torch model (a batch of two, the second row right-padded),
saves the torch logits as ``reference.npz`` and writes ``PROVENANCE.md``. Nothing is downloaded.

Why BERT and not GPT-2: the optimizer's GPT-2 attention fusion (``FusionGptAttention``) matches the attention
transformers wrote before its attention-interface rewrite; on transformers 4.57's GPT-2 (exported with past, the
way ``onnxruntime.transformers.models.gpt2`` wraps it) it fuses no Attention, only FastGelu, SkipLayerNormalization
and LayerNormalization. (Its TorchScript export also needs ``transformers.masking_utils.sdpa_mask`` replaced by
``sdpa_mask_older_torch``: the vmap-built causal mask fails under tracing, ``RuntimeError: unordered_map::at``.)

Run it with a venv holding torch, transformers 4.57 and ONNX Runtime 1.31 (the dynamo fixtures' one)::

    /work/venv-dynamo/bin/python scripts/make_optimizer_fixture.py

HF's init leaves every bias at 0 and every LayerNorm weight at 1, which the optimizer folds onto shared
initializers and which would hide a dropped bias or weight in a rewrite: they are redrawn (see ``redraw``).
"""

from __future__ import annotations

import collections
import importlib.metadata as md
import json
import platform
from pathlib import Path

from fixture_io import write_model  # scripts/fixture_io.py (the script's folder is on sys.path)

REPO = Path(__file__).resolve().parent.parent
DEST = REPO / "models" / "optimizer-tiny-bert"

SEED = 0
OPSET = 14  # below 17: the final LayerNormalization stays ORT's own (contrib) default-domain op
TORCH_ATOL = 1e-4
PARAMETER_STD = 0.2  # biases ~ N(0, std), LayerNorm weights ~ 1 + N(0, std)

CONFIG = {
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "intermediate_size": 32,  # narrow: the file stays under 300 KB
    "vocab_size": 96,
    "max_position_embeddings": 64,
    "type_vocab_size": 2,
    "initializer_range": 0.2,  # HF's 0.02 gives a near-uniform softmax that would hide mask mistakes
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "pad_token_id": 0,
}
# The ORT-only ops the fused graph must hold.
EXPECTED = {
    "com.microsoft::EmbedLayerNormalization": 1,
    "com.microsoft::Attention": 2,
    "com.microsoft::SkipLayerNormalization": 4,
    "com.microsoft::BiasGelu": 3,
    "LayerNormalization": 1,
}
# reference.npz: the builder-tiny-llama prompt's ids, twice; the second row right-padded by 3, with token types.
PROMPT_IDS = [1, 30, 33, 17, 48, 79, 36, 45, 76, 68, 26]
PADDING = 3
INPUT_NAMES = ["input_ids", "attention_mask", "token_type_ids"]


def make_model():
    import torch
    import transformers

    config = transformers.BertConfig(**CONFIG)
    torch.manual_seed(SEED)
    model = transformers.BertForMaskedLM._from_config(config, attn_implementation="eager")
    redraw(model)
    return model.eval()


def redraw(model) -> None:
    """Biases N(0, std), LayerNorm weights 1 + N(0, std) (HF initializes them to 0 and 1)."""
    import torch

    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".bias"):
                parameter.copy_(PARAMETER_STD * torch.randn(parameter.shape))
            elif name.endswith("LayerNorm.weight"):
                parameter.copy_(1.0 + PARAMETER_STD * torch.randn(parameter.shape))


def example_inputs():
    import torch

    length = len(PROMPT_IDS)
    input_ids = torch.tensor([PROMPT_IDS, PROMPT_IDS[::-1]])
    attention_mask = torch.ones(2, length, dtype=torch.int64)
    attention_mask[1, length - PADDING :] = 0
    token_type_ids = torch.zeros(2, length, dtype=torch.int64)
    token_type_ids[1, length // 2 :] = 1
    return input_ids, attention_mask, token_type_ids


def export(model, path: Path) -> None:
    import torch

    axes = {name: {0: "batch_size", 1: "sequence_length"} for name in [*INPUT_NAMES, "logits"]}
    with torch.no_grad():
        torch.onnx.export(
            model,
            example_inputs(),
            str(path),
            input_names=INPUT_NAMES,
            output_names=["logits"],
            dynamic_axes=axes,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )


def optimize(raw: Path):
    from onnxruntime.transformers.optimizer import optimize_model

    optimized = optimize_model(
        str(raw), model_type="bert", num_heads=CONFIG["num_attention_heads"], hidden_size=CONFIG["hidden_size"]
    )
    return optimized


def ort_only_ops(model) -> dict[str, int]:
    import onnx

    counts = collections.Counter()
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            counts[f"{node.domain}::{node.op_type}"] += 1
        elif not onnx.defs.has(node.op_type, max_inclusive_version=OPSET, domain=""):
            counts[node.op_type] += 1
    return dict(counts)


def save(proto) -> dict:
    stale = ("model.onnx", "reference.npz")
    return write_model(proto, DEST, stale=stale, ir_key="written_ir_version", max_bytes=300 << 10, limit="300 KB")


def check_against_torch(model) -> float:
    """ORT on the saved fixture vs the torch model on the example batch; saves reference.npz."""
    import numpy as np
    import onnxruntime as ort
    import torch

    inputs = example_inputs()
    with torch.no_grad():
        expected = model(*inputs).logits.numpy()
    feeds = {name: tensor.numpy() for name, tensor in zip(INPUT_NAMES, inputs)}
    session = ort.InferenceSession(str(DEST / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], feeds)[0]
    diff = float(np.abs(got - expected).max())
    print(f"max |ORT - torch| logits: {diff:.2e}")
    if diff > TORCH_ATOL:
        raise SystemExit(f"the optimized model does not match the torch model: {diff}")
    np.savez(DEST / "reference.npz", **feeds, prefill_logits=expected.astype(np.float32))
    return diff


def versions() -> dict:
    out = {"Python": platform.python_version()}
    for dist in ("torch", "transformers", "onnx", "onnxruntime"):
        out[dist] = md.version(dist)
    return out


def attention_summary(proto) -> list[str]:
    from onnx import helper

    lines = []
    for node in proto.graph.node:
        if node.op_type in ("Attention", "EmbedLayerNormalization"):
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            lines.append(f"- `{node.name}` ({node.op_type}): attributes {attrs}; inputs {list(node.input)}")
    return lines


def write_provenance(model, exported_ops, statistics, proto, notes, diff) -> None:
    config = model.config.to_diff_dict()
    config.pop("transformers_version", None)
    fused = {k: v for k, v in statistics.items() if v}
    lines = [
        "# optimizer-tiny-bert",
        "",
        "A real-producer fixture from a *third* producer: ONNX Runtime's transformers optimizer",
        '(`onnxruntime.transformers.optimizer.optimize_model`, `model_type="bert"`) on a tiny **random-weight**',
        "BERT (`BertForMaskedLM`) exported by the TorchScript exporter. The logits mean nothing. It has no",
        "GroupQueryAttention; what it exercises: **`EmbedLayerNormalization`** (word + position + token-type",
        "embeddings, their norm, and `mask_index` = the row sums of `attention_mask`), contrib **`Attention`** with",
        "packed QKV weights and bias, a **1-D `mask_index`** (end positions) and `mask_filter_value` = float min,",
        "**`SkipLayerNormalization`** (with bias), **`BiasGelu`** and a default-domain **`LayerNormalization`** at",
        f"opset {OPSET} (ORT's own schema). No KV cache: the model is an encoder.",
        "",
        "Made by `scripts/make_optimizer_fixture.py` (run it with the venv below to regenerate).",
        "",
        "## Versions",
        "",
        *[f"- {k} {v}" for k, v in versions().items()],
        "",
        "## Model",
        "",
        f"`BertConfig(**CONFIG)` with the script's `CONFIG`, `torch.manual_seed({SEED})`, then",
        '`BertForMaskedLM._from_config(config, attn_implementation="eager")`, float32, eval mode; then every',
        f"bias is redrawn as N(0, {PARAMETER_STD}) and every LayerNorm weight as 1 + N(0, {PARAMETER_STD})"
        " (HF's 0 and 1",
        "would be folded onto shared initializers and hide a dropped bias). The config as `to_diff_dict()` gives it:",
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
        '/work/venv-dynamo/bin/pip install "transformers==4.57.*" onnx "onnxruntime>=1.31,<1.32"',
        "/work/venv-dynamo/bin/python scripts/make_optimizer_fixture.py",
        "```",
        "",
        "Inside the script:",
        "",
        "```python",
        "torch.onnx.export(model, (input_ids, attention_mask, token_type_ids), raw_path,",
        '                  input_names=["input_ids", "attention_mask", "token_type_ids"], output_names=["logits"],',
        '                  dynamic_axes={name: {0: "batch_size", 1: "sequence_length"}'
        ' for name in (*inputs, "logits")},',
        f"                  opset_version={OPSET}, do_constant_folding=True, dynamo=False)",
        'optimized = onnxruntime.transformers.optimizer.optimize_model(raw_path, model_type="bert",',
        f"                                                              num_heads={CONFIG['num_attention_heads']},"
        f" hidden_size={CONFIG['hidden_size']})",
        "```",
        "",
        '(the optimizer\'s defaults otherwise: `opt_level` None, `use_gpu=False`, `FusionOptions("bert")`).',
        "",
        "## What the optimizer did",
        "",
        f"- Exported graph ops: {dict(sorted(exported_ops.items()))}",
        f"- Fused (non-zero `get_fused_operator_statistics()`): {fused}",
        f"- ORT-only ops of the fused graph: {ort_only_ops(proto)}",
        *attention_summary(proto),
        "",
        "## Post-processing by the script",
        "",
        "- `optimized.model` saved with `onnx.save_model(..., save_as_external_data=False)`: one self-contained file",
        f"  ({notes['size']} bytes).",
        f"- IR version written by the optimizer: {notes['written_ir_version']}"
        + (f" (patched to {notes['ir_patched_to']})" if "ir_patched_to" in notes else " (kept as is)"),
        f"- Opsets (the optimizer imports every domain it knows): {json.dumps(notes['opsets'])}",
        "",
        "## reference.npz",
        "",
        f"The torch model's logits for a batch of two: `input_ids` [2, {len(PROMPT_IDS)}] (the builder-tiny-llama",
        f"prompt's ids {PROMPT_IDS}, then reversed), `attention_mask` (the second row's last {PADDING} columns 0),",
        "`token_type_ids` (the second row's second half 1) and `prefill_logits` [2, S, vocab]. The script checked the",
        f"optimized model with ORT CPU against them: max |diff| {diff:.2e}.",
        "",
    ]
    (DEST / "PROVENANCE.md").write_text("\n".join(lines))


def main() -> None:
    import tempfile

    import onnx

    model = make_model()
    with tempfile.TemporaryDirectory() as folder:
        raw = Path(folder) / "raw.onnx"
        export(model, raw)
        exported_ops = collections.Counter(node.op_type for node in onnx.load(str(raw)).graph.node)
        optimized = optimize(raw)
    statistics = optimized.get_fused_operator_statistics()
    proto = optimized.model
    found = ort_only_ops(proto)
    if found != EXPECTED:
        raise SystemExit(f"the optimizer made {found}, expected {EXPECTED}")
    notes = save(proto)
    diff = check_against_torch(model)
    write_provenance(model, exported_ops, statistics, proto, notes, diff)
    print(f"wrote {DEST}")


if __name__ == "__main__":
    main()
