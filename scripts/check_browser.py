"""Run your model, decomposed, in Chromium through onnxruntime-web (wasm and WebNN, strict), a prompt and a
decode step, against the original on ONNX Runtime CPU: what tests/test_browser.py does for the fixtures.

    npm ci --prefix tests/browser       # once: onnxruntime-web, puppeteer-core, @sparticuz/chromium
    python scripts/check_browser.py MODEL.onnx [--kv-cache static] [--buffer 16] [--runtime webnn]... \
        [--runtime-profile webnn]       # the forms for WebNN: its empty-past prompt runs there too

Batch 1, a prompt of 4 tokens with empty past, then one decode step fed ORT's presents (so each phase is
judged alone). ``--kv-cache static`` decomposes with the static-buffer promise and feeds a max-length buffer
of ``--buffer`` rows; ``--static-buffer`` feeds that buffer to the default rewrite. Past inputs are paired
with present outputs by name (``past_key_values.*`` / ``past.*`` -> ``present.*``). Exit 1 if any run fails.
See docs/browser.md.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np
import onnx
import onnx_ir as ir

import gqa_decompose
from gqa_decompose import runtimes
from gqa_decompose.errors import GqaDecomposeError
from gqa_decompose.runtime_check import PROMPT_LENGTH, _cache_dims, synthesize_prompt_feeds
from gqa_decompose.spec import RUNTIME_PROFILES, DecomposeOptions

TOLERANCE = 1e-4


def _present_name(past: str, outputs: list[str]) -> str:
    for candidate in (past.replace("past_key_values", "present"), past.replace("past", "present")):
        if candidate in outputs:
            return candidate
    raise GqaDecomposeError(f"no present output for past input {past} (expected present.* names)")


def _padded(value: np.ndarray, rows: int) -> np.ndarray:
    padded = np.zeros((*value.shape[:2], rows, *value.shape[3:]), value.dtype)
    padded[:, :, : value.shape[2]] = value
    return padded


def phases(original: onnx.ModelProto, options: DecomposeOptions, buffer: int | None) -> dict[str, tuple[dict, dict]]:
    """{phase: (feeds, ORT CPU's outputs of the original)} for the prompt and one decode step."""
    oracle = runtimes.get_runtime("onnxruntime").load(original)
    known = _cache_dims(ir.serde.deserialize_model(original), options)
    prompt = synthesize_prompt_feeds(original, known_dims=known, past_rows=buffer or 0)
    prompt_out = oracle.run(prompt)
    outputs = [o.name for o in original.graph.output]
    decode = {}
    for name, value in prompt.items():
        lowered = name.lower()
        if "past" in lowered and value.ndim == 4:
            present = prompt_out[_present_name(name, outputs)]
            decode[name] = _padded(present, buffer) if buffer else present
        elif "mask" in lowered and value.ndim == 2:
            decode[name] = np.ones((value.shape[0], PROMPT_LENGTH + 1), value.dtype)
        elif "position" in lowered:
            decode[name] = np.full((*value.shape[:-1], 1), PROMPT_LENGTH, value.dtype)
        elif value.ndim == 2 and value.shape[1] == PROMPT_LENGTH:  # token ids
            decode[name] = value[:, :1].copy()
        else:
            raise GqaDecomposeError(f"cannot make a decode step's {name} (shape {value.shape}): extend this script")
    return {"prompt": (prompt, prompt_out), "decode": (decode, oracle.run(decode))}


def max_error(want: dict, got: dict, total: int) -> float:
    """Over what ORT defines: present rows from ``total`` (the sequence so far) on are left out."""
    worst = 0.0
    for name, expected in want.items():
        have = got[name]
        if "present" in name and expected.ndim == 4:
            expected, have = expected[:, :, :total], have[:, :, :total]
        if have.shape != expected.shape:
            raise RuntimeError(f"output {name}: shape {have.shape} != {expected.shape}")
        worst = max(worst, float(np.abs(expected.astype(np.float64) - have.astype(np.float64)).max(initial=0)))
    return worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=pathlib.Path)
    parser.add_argument("--runtime", action="append", choices=["wasm", "webnn"], help="default: both")
    parser.add_argument("--kv-cache", choices=["any", "static", "growing"], default="any")
    parser.add_argument("--static-buffer", action="store_true", help="feed a max-length buffer (default rewrite)")
    parser.add_argument("--buffer", type=int, default=2 * PROMPT_LENGTH, help="rows of the static buffer")
    parser.add_argument("--runtime-profile", choices=RUNTIME_PROFILES, default="portable", help="as the CLI's")
    args = parser.parse_args()
    options = DecomposeOptions(
        static_kv_cache=args.kv_cache == "static",
        growing_kv_cache=args.kv_cache == "growing",
        runtime_profile=args.runtime_profile,
    )
    buffer = args.buffer if args.kv_cache == "static" or args.static_buffer else None
    original = onnx.load(args.model)
    decomposed = gqa_decompose.decompose(original, options=options)
    cases = phases(original, options, buffer)
    failed = False
    for name in args.runtime or ["wasm", "webnn"]:
        runtime = runtimes.get_runtime(name)
        session = runtime.load(decomposed)
        for phase, (feeds, want) in cases.items():
            try:
                total = PROMPT_LENGTH + (phase == "decode")
                error = max_error(want, session.run(feeds), total)
                verdict = f"{'pass' if error < TOLERANCE else 'FAILS'}, max error {error:.2g}"
                failed |= error >= TOLERANCE
            except RuntimeError as failure:
                verdict, failed = f"FAILS: {failure}", True
            print(f"{name} ({runtime.version()}) {phase}: {verdict}")
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except GqaDecomposeError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
