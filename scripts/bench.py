"""Speed of the rewritten attention against each runtime's fused GroupQueryAttention (CPU).

One process, one single-layer model per head shape, decomposed with the tool
itself in every cache form, for each runtime profile asked (``--profile``,
default: portable, the default output, and onnxruntime). For each case (head
shape x phase x length) every variant gets a warm-up, then the variants run in
interleaved rounds (the order rotates from round to round), so all of them see
the same machine state. Reported: the median time of each variant, its ratio to
its runtime's fused node in the same cache form as the median of the per-round
ratios (robust against other work on the machine), and for decode the fraction
of the physical limit reached (the cache read once at the read bandwidth
measured at start).

ONNX Runtime variants (driven through IOBinding):

    fused          fused GQA node, separate past and present (past has T - S rows)
    fused-shared   fused GQA node, past is a max-length buffer and present is bound
                   to the same buffer (ORT's share-buffer mode; seqlens_k gives lengths)
    fused-ragged   fused GQA node, separate buffers, batch 2 with rows of T and T / 2
    any            rewrite with --kv-cache any (the default), separate buffers
    any-shared     rewrite with --kv-cache any, max-length buffer, present bound to past
    ragged         rewrite with --kv-cache any, the ragged batch of fused-ragged
    growing        rewrite with --kv-cache growing, separate buffers (present = Concat)
    static         rewrite with --kv-cache static, max-length buffer, present bound to past
    static-steps   the same with a buffer grown in 256-row steps (T < rows <= T + 256), as
                   a runtime that grows its shared buffer would

A rewrite's column carries its profile: ``any`` (portable), ``any:ort``
(onnxruntime, = --fast-paths), ``any:ov`` (openvino). With ``--runtime
openvino`` the same rewrites also run on OpenVINO's CPU plugin (fp32 hint):
``ov-fused`` and ``ov-fused-long`` are OpenVINO's own handling
of the fused node (its ONNX frontend), and ``ov any``, ``ov any-long`` (a
max-length buffer; OpenVINO cannot bind present to it, so present is a copy),
``ov ragged``, ``ov growing``, ``ov static`` (max-length buffer) the rewrites;
they are compared to OpenVINO's own node and to ORT's fused node in the same
cache form (``fused-shared`` for a max-length buffer). ``--runtime wasm`` and
``--runtime webnn`` do the same in headless Chromium through onnxruntime-web
(one thread; WebNN strict, no CPU fallback): ``wasm-fused``, ``wasm-fused-long``,
``wasm-fused-ragged`` (and ``webnn-...``) are its own GroupQueryAttention kernel,
``wasm any`` etc. the rewrites; each run is timed in the page, feeds sent once.

Phases: decode (S = 1 after T - 1 tokens, T = 256, 1024, 4096) and prefill
(a first prompt of S = 128, 512, 2048 tokens), batch 1, packed QKV with rotary,
fp32. Head shapes: llama (32 heads, 8 KV heads, head size 128) and small
(8, 2, 64). Phase ``rewrite`` times the CLI on a 32-layer Llama-shaped model
with sparse external weights: the rewrite alone (``--check --no-verify``) and
the rewrite with verification of every node (``--check``); ``--write`` also
writes the decomposed model with its own weights (disk-bound).

    python scripts/bench.py [--quick] [--threads 1] [--shape llama] [--phase decode]
                            [--profile portable] [--runtime openvino] [--variant any]
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

import onnx
import onnxruntime as ort

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))

import bench_runners as br  # noqa: E402
from gqa_models import GqaConfig, make_gqa_model  # noqa: E402

import gqa_decompose  # noqa: E402
from gqa_decompose.spec import RUNTIME_PROFILES  # noqa: E402

SHAPES = {
    "llama": GqaConfig(num_heads=32, kv_num_heads=8, head_size=128, packed=True, rotary="half", positions=8192),
    "small": GqaConfig(num_heads=8, kv_num_heads=2, head_size=64, packed=True, rotary="half", positions=8192),
}
LENGTHS = {"decode": (256, 1024, 4096), "prefill": (128, 512, 2048)}
# Column suffix of each runtime profile's rewrites (the default, portable, has none).
PROFILE_SUFFIX = {"portable": "", "onnxruntime": ":ort", "openvino": ":ov", "webnn": ":webnn", "litert": ":litert"}


def _fused_runners(fused, case: tuple, runtimes: list[str], args) -> dict:
    """Each runtime's fused node in each cache form its rewrites are compared in."""
    phase, length = case
    runners = {}
    for runtime, cache, name in _fused_variants(runtimes):
        inputs = br.feeds(fused.config, phase, length, cache, args.max_length)
        try:
            runners[name] = br.runner(runtime, fused.model, inputs, cache, args.threads)
        except Exception as error:  # noqa: BLE001 a runtime may refuse its own fused node: time the rest
            print(f"  {name}: {str(error).splitlines()[0][:100]}", file=sys.stderr)
    return runners


def _fused_variants(runtimes: list[str]) -> list[tuple[str, str, str]]:
    """(runtime, cache form, fused variant) of the runtimes timed; ORT's always (the others are compared to it)."""
    variants = [("onnxruntime", cache, name) for cache, name in br.ORT_FUSED.items() if cache != "steps"]
    for runtime in runtimes:
        if runtime != "onnxruntime":
            variants += [(runtime, cache, name) for cache, name in br.FUSED[runtime].items()]
    return variants


def _rewrite_runners(fused, case: tuple, runtimes: list[str], args) -> tuple[dict, dict]:
    """Runners of every rewrite (runtime x profile x form) and the cache form of each."""
    phase, length = case
    runners, caches = {}, {}
    for runtime in runtimes:
        for profile in args.profile:
            for form in br.FORMS[runtime]:
                if args.variant and form.name not in args.variant:
                    continue
                model = gqa_decompose.decompose(
                    fused.model,
                    runtime_profile=profile,
                    target=args.target,
                    native_precision=args.native_precision,
                    **form.options,
                )
                name = br.PREFIX[runtime] + form.name + PROFILE_SUFFIX[profile]
                inputs = br.feeds(fused.config, phase, length, form.cache, args.max_length)
                try:
                    runners[name] = br.runner(runtime, model, inputs, form.cache, args.threads)
                except Exception as error:  # noqa: BLE001 WebNN may refuse a form (strict): time the rest
                    print(f"  {name}: {str(error).splitlines()[0][:100]}", file=sys.stderr)
                    continue
                caches[name] = form.cache
    return runners, caches


def _interleaved(runners: dict, args) -> dict[str, list[float]]:
    """Seconds per run of each runner in each round, after a warm-up; the order rotates every round."""
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
    return times


def _baselines(name: str, cache: str | None) -> dict[str, str]:
    """(what, fused variant) a variant is compared to: its runtime's own GQA, and ORT's fused node."""
    if cache is None:
        return {}
    runtime = br.runtime_of(name)
    if runtime != "onnxruntime":
        return {"own": br.FUSED[runtime].get(cache, ""), "ort": br.ORT_FOR_OV[cache]}
    return {"own": br.ORT_FUSED[cache], "ort": br.ORT_FUSED[cache]}


@dataclasses.dataclass
class _Fused:
    model: onnx.ModelProto
    config: GqaConfig


def bench_case(shape: str, phase: str, length: int, args) -> dict:
    config = dataclasses.replace(SHAPES[shape], dtype=args.dtype)
    if args.target == "attention":
        config = dataclasses.replace(config, opset=24)  # the Attention op needs opset 23+
    fused = _Fused(make_gqa_model(config), config)
    case = (phase, length)
    runners = _fused_runners(fused, case, args.runtime, args)
    rewrites, caches = _rewrite_runners(fused, case, args.runtime, args)
    runners.update(rewrites)
    times = _interleaved(runners, args)

    def ratio(name: str, base: str) -> float:
        if base not in times:
            return float("nan")
        return statistics.median(a / b for a, b in zip(times[name], times[base]))

    median_ms = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    result = {
        "shape": shape,
        "phase": phase,
        "length": length,
        "cache": caches,
        "median_ms": median_ms,
        "vs_own_fused": {name: ratio(name, base["own"]) for name, base in _with_bases(caches).items()},
        "vs_ort_fused": {name: ratio(name, base["ort"]) for name, base in _with_bases(caches).items()},
    }
    if phase == "decode":
        # The physical limit: reading the cache once at the machine's read bandwidth.
        limit_ms = {
            name: br.cache_bytes(config, length, caches.get(name, _fused_cache(name))) / args.bandwidth * 1e3
            for name in median_ms
        }
        result["limit_fraction"] = {name: limit_ms[name] / median_ms[name] for name in median_ms}
    return result


def _with_bases(caches: dict) -> dict:
    return {name: _baselines(name, cache) for name, cache in caches.items()}


def _fused_cache(name: str) -> str:
    """The cache form of a fused variant."""
    for table in br.FUSED.values():
        for cache, fused in table.items():
            if fused == name:
                return cache
    return "separate"


def _label(case: dict) -> str:
    return f"{case['shape']} {case['phase']} {'T' if case['phase'] == 'decode' else 'S'}={case['length']}"


def _table(cases: list[dict], key: str, title: str, names: list[str], digits: int = 2) -> None:
    names = [name for name in names if any(name in case.get(key, {}) for case in cases)]
    if not names:
        return
    width = max(14, *(len(name) + 2 for name in names))
    print(f"\n{title}")
    print(f"{'case':22s}" + "".join(f"{name:>{width}s}" for name in names))
    for case in cases:
        values = case.get(key, {})
        print(f"{_label(case):22s}" + "".join(f"{values.get(name, float('nan')):{width}.{digits}f}" for name in names))


_TITLES = {"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO", "wasm": "onnxruntime-web wasm", "webnn": "WebNN"}


def print_cases(cases: list[dict], bandwidth: float) -> None:
    names = list(dict.fromkeys(name for case in cases for name in case["median_ms"]))
    by_runtime = {runtime: [name for name in names if br.runtime_of(name) == runtime] for runtime in _TITLES}
    for runtime, title in _TITLES.items():
        _table(cases, "median_ms", f"median ms, {title}", by_runtime[runtime], 3)
    _table(
        cases,
        "vs_own_fused",
        "ONNX Runtime: ratio to its fused node in the same cache form (separate: fused, shared/static: "
        "fused-shared, ragged: fused-ragged), median of per-round ratios",
        by_runtime["onnxruntime"],
    )
    for runtime, title in list(_TITLES.items())[1:]:
        own = f"{title}: ratio to its own GroupQueryAttention, same cache form"
        _table(cases, "vs_own_fused", own, by_runtime[runtime])
        ort_title = f"{title}: ratio to ONNX Runtime's fused node, same cache form"
        _table(cases, "vs_ort_fused", ort_title, by_runtime[runtime])
    decode = [case for case in cases if "limit_fraction" in case]
    _table(
        decode,
        "limit_fraction",
        f"decode: fraction of the physical limit (the cache read once at {bandwidth / 1e9:.1f} GB/s)",
        names,
    )


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
        choices=sorted({form.name for form in (*br.ORT_FORMS, *br.OV_FORMS)}),
        help="only these rewrites (the fused variants always run)",
    )
    parser.add_argument(
        "--profile",
        action="append",
        choices=RUNTIME_PROFILES,
        help="repeatable: the runtime profiles to rewrite with (default: portable and onnxruntime)",
    )
    parser.add_argument(
        "--runtime",
        action="append",
        choices=list(br.FORMS),
        help="repeatable: where the rewrites run (default onnxruntime; ORT's fused node always runs); "
        "wasm and webnn run in headless Chromium (npm ci --prefix tests/browser), one thread",
    )
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 15, --quick 5)")
    parser.add_argument("--round-ms", type=float, help="time per variant per round (default 30, --quick 10)")
    parser.add_argument("--no-fast-paths", action="store_true", help="the same as --profile portable")
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
    args.profile = args.profile or (["portable"] if args.no_fast_paths else ["portable", "onnxruntime"])
    args.runtime = args.runtime or ["onnxruntime"]
    shapes = args.shape or list(SHAPES)
    phases = args.phase or ["decode", "prefill", "rewrite"]

    info = machine()
    print(
        f"{info['cpu']}, {info['nproc']} cores, onnxruntime {info['onnxruntime']}, "
        f"{args.threads} thread(s), {args.rounds} rounds, shared buffers of {args.max_length} rows, "
        f"{args.dtype}, target {args.target}, profiles {', '.join(args.profile)}, runtimes {', '.join(args.runtime)}"
    )
    args.bandwidth = br.read_bandwidth()
    info["read_gb_s"] = args.bandwidth / 1e9
    print(f"read bandwidth {args.bandwidth / 1e9:.1f} GB/s (one core, a 256 MB reduction)")
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
                _write_json(args, info, cases, rewrite)  # after every case: a long run keeps what it measured
    if cases:
        print_cases(cases, args.bandwidth)
    _write_json(args, info, cases, rewrite)


def _write_json(args, info: dict, cases: list[dict], rewrite: dict | None) -> None:
    if not args.json:
        return
    report = {
        "machine": info,
        "threads": args.threads,
        "rounds": args.rounds,
        "profiles": args.profile,
        "runtimes": args.runtime,
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
