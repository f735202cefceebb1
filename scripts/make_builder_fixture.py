"""Make the real-producer fixture ``models/builder-tiny-llama/``.

A tiny random-weight Hugging Face Llama checkpoint (with a tiny tokenizer trained here on a few strings) is fed to
onnxruntime-genai's model builder (fp32, CPU EP), and its ``model.onnx`` and ``genai_config.json`` are copied into the
repository. The script then runs the ONNX model with ONNX Runtime (prefill + one decode step) against the torch model
and saves the torch logits as ``reference.npz``, and writes ``PROVENANCE.md``. Nothing is downloaded: the config,
weights and tokenizer are all made locally. Output is deterministic (same model.onnx bytes on every run).

Run it with a separate venv that has the builder and its torch / transformers (see PROVENANCE.md next to the model):

    python3 -m venv /work/venv-builder
    /work/venv-builder/bin/pip install torch==2.13.0          # CPU build; never plain `torch`
    /work/venv-builder/bin/pip install "transformers==5.23.*" onnxruntime-genai==0.18.0 onnx onnx-ir "onnxruntime>=1.31,<1.32"
    /work/venv-builder/bin/python scripts/make_builder_fixture.py

The builder always saves weights as external data (``model.onnx.data``, threshold 0, no option to turn that off); this
script loads that back and saves one self-contained ``model.onnx`` instead. The builder writes IR version 10; the
script lowers it only if a future builder writes something newer than ORT 1.31 reads.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "models" / "builder-tiny-llama"

SEED = 0
MAX_IR_VERSION = 10  # ORT 1.31 reads newer ones too, but 10 is what the builder writes and every ORT >= 1.16 reads

# A few strings to train the tiny tokenizer on. BPE over whitespace-split words keeps it tiny.
TRAINING_TEXT = [
    "the quick brown fox jumps over the lazy dog",
    "hello world this is a tiny llama model",
    "group query attention shares keys and values between heads",
    "onnx runtime genai builds models for the cpu",
    "a small test sentence with some words in it",
]
# The builder takes every nn.Linear whose out_features == vocab_size for the LM head, so the vocab must differ from
# every projection width (hidden 64, kv 32, intermediate 128); otherwise q/o/down_proj are each also built as one.
TOKENIZER_VOCAB_SIZE = 96
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
PROMPT = "hello world the quick fox"

CONFIG = dict(
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=128,
    num_hidden_layers=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    hidden_act="silu",
    tie_word_embeddings=False,
    attention_bias=False,
    mlp_bias=False,
    # HF's default 0.02 makes attention scores ~0.03 (near-uniform softmax), which would hide rotary / mask / KV
    # mistakes in a rewrite. 0.2 gives scores of std ~2.5 (RMS-normed input, head_dim 16, scale 1/4).
    initializer_range=0.2,
)

BUILDER_ARGS = ["-p", "fp32", "-e", "cpu"]


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


def make_checkpoint(hf_dir: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = make_tokenizer()
    vocab_size = len(tokenizer)
    if vocab_size < 32:
        raise SystemExit(f"tiny tokenizer has only {vocab_size} tokens; add training text")
    widths = {CONFIG["hidden_size"], CONFIG["intermediate_size"], CONFIG["num_key_value_heads"] * CONFIG["head_dim"],
              CONFIG["num_attention_heads"] * CONFIG["head_dim"]}
    if vocab_size in widths:
        raise SystemExit(f"vocab_size {vocab_size} equals a projection width {sorted(widths)}; the builder would "
                         "mistake that projection for the LM head")

    cfg_kwargs = dict(CONFIG)
    cfg_kwargs.update(
        vocab_size=vocab_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlamaConfig(**cfg_kwargs)

    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    model.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    return json.loads((hf_dir / "config.json").read_text())


def run_builder(hf_dir: Path, out_dir: Path, cache_dir: Path) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "onnxruntime_genai.models.builder",
        "-i",
        str(hf_dir),
        "-o",
        str(out_dir),
        *BUILDER_ARGS,
        "-c",
        str(cache_dir),
    ]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return cmd


def copy_outputs(out_dir: Path, dest: Path) -> dict:
    import onnx

    dest.mkdir(parents=True, exist_ok=True)
    for stale in ("model.onnx", "model.onnx.data", "reference.npz"):
        (dest / stale).unlink(missing_ok=True)

    # Loads model.onnx.data too (it sits beside model.onnx); saving without external data inlines every weight.
    model = onnx.load(str(out_dir / "model.onnx"), load_external_data=True)
    notes = {"builder_ir_version": model.ir_version}
    if model.ir_version > MAX_IR_VERSION:
        model.ir_version = MAX_IR_VERSION
        notes["ir_patched_to"] = MAX_IR_VERSION
    onnx.save_model(model, str(dest / "model.onnx"), save_as_external_data=False)
    # onnx.checker rejects the builder's SimplifiedLayerNormalization (an ORT-only op in the default domain), so
    # check that ONNX Runtime loads the saved file instead.
    import onnxruntime as ort

    ort.InferenceSession(str(dest / "model.onnx"), providers=["CPUExecutionProvider"])

    with open(out_dir / "genai_config.json") as f:
        genai = json.load(f)
    with open(dest / "genai_config.json", "w") as f:
        json.dump(genai, f, indent=4)
        f.write("\n")
    notes["opsets"] = {imp.domain or "ai.onnx": imp.version for imp in model.opset_import}
    return notes


def check_against_torch(hf_dir: Path, dest: Path) -> dict:
    """Run the fixture with ORT (prefill, then one decode step feeding present back as past) and compare its logits
    with the Hugging Face torch model's. Saves the prompt and the torch logits as ``reference.npz``."""
    import numpy as np
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(hf_dir)
    ids = [tokenizer.bos_token_id] + tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        prefill = model(torch.tensor([ids])).logits[0, -len(ids):].numpy()
        next_id = int(prefill[-1].argmax())
        full = model(torch.tensor([ids + [next_id]])).logits[0].numpy()
    decode = full[-1:]

    sess = ort.InferenceSession(str(dest / "model.onnx"), providers=["CPUExecutionProvider"])
    n_layers, kv_heads, head_dim = CONFIG["num_hidden_layers"], CONFIG["num_key_value_heads"], CONFIG["head_dim"]
    feeds = {
        "input_ids": np.array([ids], dtype=np.int64),
        "attention_mask": np.ones((1, len(ids)), dtype=np.int64),
    }
    for i in range(n_layers):
        for kv in ("key", "value"):
            feeds[f"past_key_values.{i}.{kv}"] = np.zeros((1, kv_heads, 0, head_dim), dtype=np.float32)
    out_names = [o.name for o in sess.get_outputs()]
    outs = dict(zip(out_names, sess.run(None, feeds)))
    ort_prefill = outs["logits"][0]
    feeds = {
        "input_ids": np.array([[next_id]], dtype=np.int64),
        "attention_mask": np.ones((1, len(ids) + 1), dtype=np.int64),
    }
    for i in range(n_layers):
        for kv in ("key", "value"):
            feeds[f"past_key_values.{i}.{kv}"] = outs[f"present.{i}.{kv}"]
    ort_decode = sess.run(["logits"], feeds)[0][0]

    diffs = {
        "prefill": float(np.abs(ort_prefill - prefill).max()),
        "decode": float(np.abs(ort_decode - decode).max()),
    }
    print(f"max |ORT - torch| logits: {diffs}")
    if max(diffs.values()) > 1e-4:
        raise SystemExit(f"builder model does not match the torch model: {diffs}")
    np.savez(
        dest / "reference.npz",
        input_ids=np.array([ids], dtype=np.int64),
        next_id=np.array([[next_id]], dtype=np.int64),
        prefill_logits=prefill[None].astype(np.float32),
        decode_logits=decode[None].astype(np.float32),
    )
    return {"ids": ids, "next_id": next_id, "diffs": diffs}


def write_provenance(dest: Path, cfg: dict, cmd: list[str], notes: dict, check: dict) -> None:
    versions = {
        name: md.version(name)
        for name in ("torch", "transformers", "tokenizers", "onnxruntime-genai", "onnxruntime", "onnx", "onnx-ir")
    }
    shown_cmd = ["python", "-m", "onnxruntime_genai.models.builder", "-i", "HF_DIR", "-o", "OUT", *BUILDER_ARGS,
                 "-c", "CACHE_DIR"]
    ir_line = f"- IR version written by the builder: {notes['builder_ir_version']}"
    if "ir_patched_to" in notes:
        ir_line += f"; patched down to {notes['ir_patched_to']} by the script"
    else:
        ir_line += " (kept as is)"
    lines = [
        "# builder-tiny-llama",
        "",
        "A real-producer GroupQueryAttention fixture: a tiny **random-weight** Llama made locally and converted by",
        "onnxruntime-genai's model builder (fp32, CPU EP). The logits mean nothing; the graph is what the builder",
        "writes for a Llama-family model on the CPU EP: packed QKV into GroupQueryAttention with `do_rotary=1`,",
        "`SimplifiedLayerNormalization` / `SkipSimplifiedLayerNormalization`, and `past_present_share_buffer: true`.",
        "",
        "Made by `scripts/make_builder_fixture.py` (run it with the builder venv below to regenerate).",
        "",
        "## Versions",
        "",
        f"- Python {sys.version.split()[0]}",
        *[f"- {k} {v}" for k, v in versions.items()],
        "",
        "## Hugging Face config",
        "",
        "The checkpoint's `config.json` as `save_pretrained` wrote it (`LlamaConfig` with the values in the script's",
        "`CONFIG`, `vocab_size` = the tiny tokenizer's size, and its bos/eos/pad ids):",
        "",
        "```json",
        json.dumps(cfg, indent=2, sort_keys=True),
        "```",
        "",
        f"Weights: `torch.manual_seed({SEED})` then `AutoModelForCausalLM.from_config(config)`, float32, with",
        f"`initializer_range={CONFIG['initializer_range']}` (not HF's 0.02) so attention is far from uniform.",
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
        "## Post-processing by the script",
        "",
        "- The builder always writes weights to `model.onnx.data`; the script reloads them and saves a single",
        "  self-contained `model.onnx` (`onnx.save_model(..., save_as_external_data=False)`). Graph unchanged.",
        ir_line,
        f"- Opsets: {json.dumps(notes['opsets'])}",
        "- `genai_config.json` is copied unchanged (re-indented); the tokenizer files are not kept, so",
        "  `onnxruntime_genai.Model` can load the folder but `og.Tokenizer` cannot: feed token ids directly.",
        "",
        "## reference.npz",
        "",
        f"The Hugging Face torch model's logits for the prompt `<s> {PROMPT}` (token ids {check['ids']}):",
        "`input_ids` [1, S], `prefill_logits` [1, S, vocab]; then greedy `next_id` [1, 1] and `decode_logits` [1, 1, vocab]",
        "(logits of the next step, from the torch model run on the whole S+1 tokens). The script checked the ONNX model",
        "against them with ORT CPU (prefill with empty past `[1, kv_heads, 0, head_dim]`, then one decode step with",
        f"present fed back as past): max |diff| prefill {check['diffs']['prefill']:.2e},"
        f" decode {check['diffs']['decode']:.2e}.",
        "",
    ]
    (dest / "PROVENANCE.md").write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="destination folder (default: %(default)s)")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temporary checkpoint and builder output")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="builder-tiny-llama-"))
    try:
        hf_dir, out_dir, cache_dir = tmp / "hf", tmp / "out", tmp / "cache"
        cfg = make_checkpoint(hf_dir)
        cmd = run_builder(hf_dir, out_dir, cache_dir)
        notes = copy_outputs(out_dir, args.out)
        check = check_against_torch(hf_dir, args.out)
        write_provenance(args.out, cfg, cmd, notes, check)
        for p in sorted(args.out.iterdir()):
            print(f"{p.relative_to(REPO) if p.is_relative_to(REPO) else p}: {p.stat().st_size} bytes")
    finally:
        if args.keep_tmp:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    main()
