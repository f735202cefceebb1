"""Speed of the rewritten attention against ONNX Runtime's fused GroupQueryAttention kernel (CPU).

One process, one single-layer model per head shape, decomposed with the tool
itself in every cache form it emits (with --fast-paths unless --no-fast-paths). For each case (head shape x phase x
length) every variant gets a warm-up, then the variants run in interleaved
rounds (the order rotates from round to round), so all of them see the same
machine state. Reported: the median time of each variant, and each variant's
ratio to the fused kernel as the median of the per-round ratios (robust
against other work on the machine).

Variants (all driven through IOBinding):

    fused          fused GQA node, separate past and present (past has T - S rows)
    fused-shared   fused GQA node, past is a max-length buffer and present is bound
                   to the same buffer (ORT's share-buffer mode; seqlens_k gives lengths)
    any            rewrite with --kv-cache any (the default), separate buffers
    any-shared     rewrite with --kv-cache any, max-length buffer, present bound to past
    growing        rewrite with --kv-cache growing, separate buffers (present = Concat)
    static         rewrite with --kv-cache static, max-length buffer, present bound to past
    static-steps   the same with a buffer grown in 256-row steps (T < rows <= T + 256), as
                   a runtime that grows its shared buffer would; attention then reads
                   the whole buffer instead of copying the rows it sees

Phases: decode (S = 1 after T - 1 tokens, T = 256, 1024, 4096) and prefill
(a first prompt of S = 128, 512, 2048 tokens), batch 1, packed QKV with rotary,
fp32. Head shapes: llama (32 heads, 8 KV heads, head size 128) and small
(8, 2, 64). Phase ``rewrite`` times the CLI on a 32-layer Llama-shaped model
with sparse external weights: the rewrite alone (``--check --no-verify``) and
the rewrite with verification of every node (``--check``); ``--write`` also
writes the decomposed model with its own weights (disk-bound).

    python scripts/bench.py [--quick] [--threads 1] [--shape llama] [--phase decode]
                            [--rounds 15] [--max-length 4096] [--json FILE]
                            [--target attention] [--dtype float16 [--native-precision]]

``--target attention`` builds the layers at opset 24 and rewrites them into one
standard Attention op each (ONNX Runtime's own CPU Attention kernel);
``--dtype float16`` times fp16 layers (computed in fp32 unless
``--native-precision``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))

from gqa_models import GqaConfig, make_gqa_model  # noqa: E402

import gqa_decompose  # noqa: E402

SHAPES = {
    "llama": GqaConfig(num_heads=32, kv_num_heads=8, head_size=128, packed=True, rotary="half", positions=8192),
    "small": GqaConfig(num_heads=8, kv_num_heads=2, head_size=64, packed=True, rotary="half", positions=8192),
}
LENGTHS = {"decode": (256, 1024, 4096), "prefill": (128, 512, 2048)}
# (name, tool options, the cache is a max-length buffer bound to present)
REWRITES = (
    ("any", {}, False),
    ("any-shared", {}, True),
    ("growing", {"growing_kv_cache": True}, False),
    ("static", {"static_kv_cache": True}, True),
    ("static-steps", {"static_kv_cache": True}, True),
)
# static-steps: the shared buffer grows in steps of this many rows instead of being max-length.
BUFFER_STEP = 256
VARIANTS = ("fused", "fused-shared", *(name for name, _, _ in REWRITES))


class Runner:
    """One variant of one case: a session and its bound inputs and outputs."""

    def __init__(self, model: onnx.ModelProto, feeds: dict[str, np.ndarray], shared_buffer: bool, threads: int):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        self.binding = self.session.io_binding()
        self.values = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in feeds.items()}
        for name, value in self.values.items():
            self.binding.bind_ortvalue_input(name, value)
        for output in self.session.get_outputs():
            if shared_buffer and output.name.startswith("present_"):
                # present_key -> past_key: the runtime keeps one buffer and the step writes into it.
                self.binding.bind_ortvalue_output(output.name, self.values[output.name.replace("present_", "past_")])
            else:
                self.binding.bind_output(output.name)

    def run(self, times: int) -> float:
        """Mean seconds of ``times`` runs."""
        start = time.perf_counter()
        for _ in range(times):
            self.session.run_with_iobinding(self.binding)
        return (time.perf_counter() - start) / times


def _feeds(config: GqaConfig, phase: str, length: int, past_rows: int) -> dict[str, np.ndarray]:
    """Inputs of one step: decode (S = 1, T = length) or a first prompt (S = T = length)."""
    rng = np.random.default_rng(0)
    dtype = np.float16 if config.dtype == "float16" else np.float32
    query_length = 1 if phase == "decode" else length
    hidden = (config.num_heads + 2 * config.kv_num_heads) * config.head_size
    past_shape = (1, config.kv_num_heads, past_rows, config.head_size)
    return {
        "query": rng.standard_normal((1, query_length, hidden)).astype(dtype),
        "past_key": rng.standard_normal(past_shape).astype(dtype),
        "past_value": rng.standard_normal(past_shape).astype(dtype),
        "seqlens_k": np.array([length - 1], np.int32),
        "total_sequence_length": np.array(length, np.int32),
    }


def bench_case(shape: str, phase: str, length: int, args) -> dict:
    config = dataclasses.replace(SHAPES[shape], dtype=args.dtype)
    if args.target == "attention":
        config = dataclasses.replace(config, opset=24)  # the Attention op needs opset 23+
    fused = make_gqa_model(config)
    separate_past = length - 1 if phase == "decode" else 0
    max_length = max(args.max_length, length)
    runners: dict[str, Runner] = {
        "fused": Runner(fused, _feeds(config, phase, length, separate_past), False, args.threads),
        "fused-shared": Runner(fused, _feeds(config, phase, length, max_length), True, args.threads),
    }
    for name, options, shared_buffer in REWRITES:
        if args.variant and name not in args.variant:
            continue
        rewritten = gqa_decompose.decompose(
            fused,
            fast_paths=not args.no_fast_paths,
            target=args.target,
            native_precision=args.native_precision,
            **options,
        )
        past_rows = max_length if shared_buffer else separate_past
        if name == "static-steps":
            past_rows = (length // BUFFER_STEP + 1) * BUFFER_STEP
        runners[name] = Runner(rewritten, _feeds(config, phase, length, past_rows), shared_buffer, args.threads)

    # Warm-up, then as many runs per round as fill about --round-ms.
    repeats = {}
    for name, runner in runners.items():
        runner.run(2)
        single = runner.run(1)
        repeats[name] = max(1, int(args.round_ms / 1e3 / max(single, 1e-6)))
    times: dict[str, list[float]] = {name: [] for name in runners}
    order = list(runners)
    for round_index in range(args.rounds):
        rotated = order[round_index % len(order) :] + order[: round_index % len(order)]
        for name in rotated:
            times[name].append(runners[name].run(repeats[name]))

    def ratio(name: str, base: str) -> float:
        return statistics.median(a / b for a, b in zip(times[name], times[base]))

    return {
        "shape": shape,
        "phase": phase,
        "length": length,
        "median_ms": {name: statistics.median(values) * 1e3 for name, values in times.items()},
        "vs_fused": {name: ratio(name, "fused") for name in runners},
        "vs_fused_shared": {name: ratio(name, "fused-shared") for name in runners},
    }


def print_cases(cases: list[dict]) -> None:
    names = [name for name in VARIANTS if any(name in case["median_ms"] for case in cases)]
    header = f"{'case':22s}" + "".join(f"{name:>14s}" for name in names)
    print("\nmedian ms")
    print(header)
    for case in cases:
        label = f"{case['shape']} {case['phase']} {'T' if case['phase'] == 'decode' else 'S'}={case['length']}"
        print(f"{label:22s}" + "".join(f"{case['median_ms'].get(name, float('nan')):14.3f}" for name in names))
    for key, title in (("vs_fused", "ratio to fused (separate buffers)"), ("vs_fused_shared", "ratio to fused-shared")):
        print(f"\n{title}, median of per-round ratios")
        print(header)
        for case in cases:
            label = f"{case['shape']} {case['phase']} {'T' if case['phase'] == 'decode' else 'S'}={case['length']}"
            print(f"{label:22s}" + "".join(f"{case[key].get(name, float('nan')):14.2f}" for name in names))


# The 32-layer rewrite -----------------------------------------------------------------------


def _run_cli(arguments: list[str]) -> tuple[float, float, int]:
    """Wall seconds, peak RSS (MB, the largest child so far) and exit code of one CLI run."""
    start = time.perf_counter()
    child = subprocess.run([sys.executable, "-m", "gqa_decompose", *arguments], capture_output=True, text=True)
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return time.perf_counter() - start, peak_mb, child.returncode


def bench_rewrite(args) -> dict:
    folder = pathlib.Path(tempfile.mkdtemp(prefix="gqa-bench-"))
    try:
        import make_tiny_llama as tiny

        model_path = tiny.write_sparse_model(
            folder, layers=args.layers, hidden=3072, heads=24, kv_heads=8, intermediate=8192, vocab=32000
        )
        weights_gb = (folder / "model.onnx.data").stat().st_size / 1e9
        print(f"\n{args.layers}-layer model, {weights_gb:.1f} GB of weights (sparse file)")
        result = {"layers": args.layers, "weights_gb": weights_gb}
        runs = [("rewrite", ["--check", "--no-verify"]), ("rewrite + verify", ["--check"])]
        if args.write:
            runs.append(("rewrite + write", ["--no-verify", "-o", str(folder / "out" / "model.onnx")]))
        for label, options in runs:
            seconds, peak_mb, code = _run_cli([str(model_path), "-q", *options])
            print(f"  {label:18s} {seconds:6.1f} s, peak RSS {peak_mb:5.0f} MB, exit code {code}")
            result[label] = {"seconds": seconds, "peak_rss_mb": peak_mb, "exit_code": code}
        return result
    finally:
        for path in sorted(folder.rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        folder.rmdir()


def machine() -> dict:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor(),
    )
    return {"cpu": cpu, "nproc": os.cpu_count(), "onnxruntime": ort.__version__, "python": platform.python_version()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds and the middle lengths only")
    parser.add_argument("--threads", type=int, default=1, help="ORT intra-op threads (default 1)")
    parser.add_argument("--shape", action="append", choices=sorted(SHAPES), help="repeatable; default all")
    parser.add_argument("--phase", action="append", choices=["decode", "prefill", "rewrite"], help="repeatable")
    parser.add_argument("--length", action="append", type=int, help="only these T (decode) / S (prefill)")
    parser.add_argument(
        "--variant",
        action="append",
        choices=[name for name, _, _ in REWRITES],
        help="only these rewrites (the fused variants always run)",
    )
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 15, --quick 5)")
    parser.add_argument("--round-ms", type=float, help="time per variant per round (default 30, --quick 10)")
    parser.add_argument(
        "--no-fast-paths", action="store_true", help="time the default (straight-line) rewrite instead of --fast-paths"
    )
    parser.add_argument(
        "--target",
        choices=["primitives", "attention"],
        default="primitives",
        help="rewrite target; 'attention' builds opset-24 layers rewritten into Attention ops",
    )
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="model type")
    parser.add_argument("--native-precision", action="store_true", help="fp16: compute in fp16, not fp32")
    parser.add_argument("--max-length", type=int, default=4096, help="rows of the shared buffers")
    parser.add_argument("--layers", type=int, default=32, help="layers of the rewrite benchmark's model")
    parser.add_argument("--write", action="store_true", help="rewrite phase: also write the model (disk-bound)")
    parser.add_argument("--json", type=pathlib.Path, help="write all results to this file")
    args = parser.parse_args()
    args.rounds = args.rounds or (5 if args.quick else 15)
    args.round_ms = args.round_ms or (10.0 if args.quick else 30.0)
    shapes = args.shape or list(SHAPES)
    phases = args.phase or ["decode", "prefill", "rewrite"]

    info = machine()
    print(
        f"{info['cpu']}, {info['nproc']} cores, onnxruntime {info['onnxruntime']}, "
        f"{args.threads} thread(s), {args.rounds} rounds, shared buffers of {args.max_length} rows, "
        f"{args.dtype}, target {args.target}, "
        f"rewrites {'without' if args.no_fast_paths else 'with'} --fast-paths"
    )
    # First, while this process is small: a child's peak RSS counts the parent's pages at fork.
    rewrite = bench_rewrite(args) if "rewrite" in phases else None
    cases = []
    for phase in (p for p in ("decode", "prefill") if p in phases):
        lengths = LENGTHS[phase][1:2] if args.quick and not args.length else LENGTHS[phase]
        for shape in shapes:
            for length in lengths:
                if args.length and length not in args.length:
                    continue
                cases.append(bench_case(shape, phase, length, args))
                print(f"  done: {shape} {phase} {length}", file=sys.stderr)
    if cases:
        print_cases(cases)
    if args.json:
        report = {
            "machine": info,
            "threads": args.threads,
            "rounds": args.rounds,
            "fast_paths": not args.no_fast_paths,
            "target": args.target,
            "dtype": args.dtype,
            "native_precision": args.native_precision,
            "max_length": args.max_length,
            "cases": cases,
            "rewrite": rewrite,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
