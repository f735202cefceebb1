"""Speed of the rewritten attention against the fused GQA kernel, on ONNX Runtime CPU.

Timings on a shared 2-core machine are noisy: the median ratio and the ratio
of the fastest runs are both printed; trust them when they agree.

Prints, for a few Llama-shaped layers and phases (growing cache and, with
``static_kv_cache``, a max-length buffer), the median time of the fused
com.microsoft.GroupQueryAttention node and of its decomposition, and the ratio
rewritten / fused, all measured in this one process, alternating runs so both
see the same machine state.

    python scripts/bench_attention.py [--repeats 50] [--threads 2] [--target attention]

With ``--target attention`` the layers are opset-24 models rewritten into one
standard Attention op each (ONNX Runtime's own CPU Attention kernel).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from gqa_models import GqaConfig, make_gqa_model  # noqa: E402

import gqa_decompose  # noqa: E402

LLAMA_8B = GqaConfig(num_heads=32, kv_num_heads=8, head_size=128, packed=True, rotary="half", positions=4096)
LLAMA_8B_FP16 = GqaConfig(
    num_heads=32, kv_num_heads=8, head_size=128, packed=True, rotary="half", positions=4096, dtype="float16"
)
SMALL = GqaConfig(num_heads=8, kv_num_heads=2, head_size=64, packed=True, rotary="half", positions=1024)

# name, config, batch, S, P, T; P >= T is a static (max-length) buffer, P = T - S a growing cache.
CASES = [
    ("8B decode, static buffer 2048, T=1024", LLAMA_8B, 1, 1, 2048, 1024),
    ("8B decode T=1024", LLAMA_8B, 1, 1, 1023, 1024),
    ("8B decode T=1024, --kv-cache growing", LLAMA_8B, 1, 1, 1023, 1024),
    ("8B decode T=4096", LLAMA_8B, 1, 1, 4095, 4096),
    ("8B decode T=4096, --kv-cache growing", LLAMA_8B, 1, 1, 4095, 4096),
    ("8B decode batch 4 T=1024", LLAMA_8B, 4, 1, 1023, 1024),
    ("8B prompt S=512", LLAMA_8B, 1, 512, 0, 512),
    ("small decode T=256 (N=8, Nkv=2, H=64)", SMALL, 1, 1, 255, 256),
    ("fp16 8B decode T=1024", LLAMA_8B_FP16, 1, 1, 1023, 1024),
    ("fp16 8B decode T=1024, --native-precision", LLAMA_8B_FP16, 1, 1, 1023, 1024),
]


def _feeds(config: GqaConfig, batch: int, query_length: int, past_length: int, total: int):
    rng = np.random.default_rng(0)
    dtype = np.float16 if config.dtype == "float16" else np.float32
    hidden = (config.num_heads + 2 * config.kv_num_heads) * config.head_size
    past_shape = (batch, config.kv_num_heads, past_length, config.head_size)
    return {
        "query": rng.standard_normal((batch, query_length, hidden)).astype(dtype),
        "past_key": rng.standard_normal(past_shape).astype(dtype),
        "past_value": rng.standard_normal(past_shape).astype(dtype),
        "seqlens_k": np.full((batch,), total - 1, np.int32),  # every row full
        "total_sequence_length": np.array(total, np.int32),
    }


def _session(model, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # TensorScatter warns on every run that it copies the cache
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--target", choices=["primitives", "attention"], default="primitives")
    parser.add_argument("--only", help="run only the cases whose name contains this text")
    args = parser.parse_args()
    print(f"onnxruntime {ort.__version__}, {args.threads} threads, median of {args.repeats} runs")
    print(f"{'case':42s} {'fused ms':>9s} {'rewritten ms':>13s} {'ratio':>6s} {'min ratio':>9s}")
    for name, config, batch, query_length, past_length, total in CASES:
        if args.only and args.only not in name:
            continue
        if args.target == "attention":
            config = dataclasses.replace(config, opset=24)
        fused_model = make_gqa_model(config)
        static = past_length >= total
        rewritten_model = gqa_decompose.decompose(
            fused_model,
            static_kv_cache=static,
            growing_kv_cache="--kv-cache growing" in name,
            native_precision="native-precision" in name,
            target=args.target,
        )
        feeds = _feeds(config, batch, query_length, past_length, total)
        sessions = {"fused": _session(fused_model, args.threads), "rewritten": _session(rewritten_model, args.threads)}
        times: dict[str, list[float]] = {key: [] for key in sessions}
        for session in sessions.values():  # warm up
            for _ in range(3):
                session.run(None, feeds)
        for _ in range(args.repeats):
            for key, session in sessions.items():
                start = time.perf_counter()
                session.run(None, feeds)
                times[key].append(time.perf_counter() - start)
        fused = statistics.median(times["fused"]) * 1e3
        rewritten = statistics.median(times["rewritten"]) * 1e3
        best_ratio = min(times["rewritten"]) / min(times["fused"])
        print(f"{name:42s} {fused:9.3f} {rewritten:13.3f} {rewritten / fused:6.2f} {best_ratio:9.2f}")


if __name__ == "__main__":
    main()
