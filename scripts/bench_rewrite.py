"""Time and memory of rewriting a multi-GB model with external data.

Builds a Llama-shaped model (the graph of scripts/make_tiny_llama.py at a
larger size: by default 32 layers, hidden 3072, 24 heads / 8 KV heads,
intermediate 8192, vocab 32000: about 9 GB of fp32 weights) whose weights live
in a *sparse* external-data file, so making it costs no disk. Then runs
``gqa-decompose --no-verify`` and ``--check`` on it in a child process and
prints wall time, the child's peak RSS, and the size of the data file written.

    python scripts/bench_rewrite.py [--layers 32] [--hidden 3072] [--keep DIR]
"""

from __future__ import annotations

import argparse
import pathlib
import resource
import subprocess
import sys
import tempfile
import time


sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import make_tiny_llama as tiny  # noqa: E402


def build_sparse_model(folder: pathlib.Path, args) -> pathlib.Path:
    return tiny.write_sparse_model(
        folder,
        layers=args.layers,
        hidden=args.hidden,
        heads=args.heads,
        kv_heads=args.kv_heads,
        intermediate=args.intermediate,
        vocab=args.vocab,
    )


def run(command: list[str]) -> tuple[float, float]:
    start = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    subprocess.run(command, check=True)
    elapsed = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return elapsed, max(peak_kib, before) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=3072)
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--keep", type=pathlib.Path, help="build in this folder and keep it")
    args = parser.parse_args()
    folder = args.keep or pathlib.Path(tempfile.mkdtemp(prefix="gqa-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    model_path = build_sparse_model(folder, args)
    weights_gb = (folder / "model.onnx.data").stat().st_size / 1e9
    print(f"model: {args.layers} layers, {weights_gb:.2f} GB of weights (sparse file), graph "
          f"{model_path.stat().st_size / 1e6:.2f} MB")
    cli = [sys.executable, "-m", "gqa_decompose", str(model_path), "-q"]
    seconds, peak_mb = run([*cli, "--check", "--no-verify"])
    print(f"--check --no-verify: {seconds:6.1f} s, peak RSS {peak_mb:7.0f} MB")
    output = folder / "out" / "model.onnx"
    seconds, peak_mb = run([*cli, "--no-verify", "-o", str(output)])
    written = (output.parent / "model.onnx.data").stat().st_size / 1e9
    print(f"decompose --no-verify: {seconds:6.1f} s, peak RSS {peak_mb:7.0f} MB, wrote {written:.2f} GB of weights")
    seconds, peak_mb = run([*cli, "--check"])
    print(f"--check (verify {args.layers} nodes): {seconds:6.1f} s, peak RSS {peak_mb:7.0f} MB")
    if args.keep is None:
        for path in sorted(folder.rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        folder.rmdir()


if __name__ == "__main__":
    main()
