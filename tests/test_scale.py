"""External data at scale: a 64-layer model with 4.2 GB of weights is rewritten without reading them.

The model is scripts/make_tiny_llama.py's graph at hidden 1024 (16 heads, 4 KV heads, intermediate 4096,
vocab 32000) with every weight in a *sparse* data file (``write_sparse_model``: a hole that reads as zeros and
takes no disk), so building it costs nothing. Far beyond protobuf's 2 GB limit: only external data can hold it.

Choices, to stay near a minute on a loaded 2-core CI machine:

* The 4.2 GB rewrite uses ``--reuse-data`` (the output refers to the input's data file): the rewrite's memory
  is what is measured, and copying 4.2 GB of zeros is a disk benchmark (90-140 s here). The copy path's memory
  is tested on a 0.5 GB model instead, which already exceeds the memory bound, so a copy that held the
  weights would fail the bound.
* Peak RSS is the child's own VmHWM, reported as it exits: ru_maxrss (RUSAGE_CHILDREN or os.wait4) would
  include other tests' children, and even the forking worker's size (Linux carries it over at exec).
* The 4.2 GB output is loaded by ONNX Runtime (which maps external data instead of reading it) with graph
  optimizations off (constant folding would touch every weight) and runs one prompt step; the checker runs
  on the path (its large-model mode). Time: rewrite ~2 s CPU, ORT load ~5-19 s
  (the wall times of a loaded machine).

Marked ``scale``: it runs by default (CI included); ``-m "not scale"`` skips it locally.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

import onnx
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "scripts"))
from make_tiny_llama import write_sparse_model  # noqa: E402

pytestmark = pytest.mark.scale

RSS_LIMIT_MB = 300
LLAMA_1B_LAYER = {"hidden": 1024, "heads": 16, "kv_heads": 4, "intermediate": 4096, "vocab": 32000}

_RUN_ONE_STEP = r"""
import sys
import numpy as np
import onnxruntime as ort

options = ort.SessionOptions()
options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
feeds = {"input_ids": np.array([[1, 2, 3]], np.int64), "attention_mask": np.ones((1, 3), np.int64)}
for value in session.get_inputs():
    if value.name.startswith("past_key_values"):
        feeds[value.name] = np.zeros((1, 4, 0, 64), np.float32)
logits, present = session.run(["logits", "present.63.key"], feeds)
assert logits.shape == (1, 3, 32000) and present.shape == (1, 4, 3, 64), (logits.shape, present.shape)
print("ok")
"""


# The child reports its own peak RSS (VmHWM of its address space) as it exits. Not ru_maxrss: at exec,
# Linux carries the forked copy's high-water mark over, so a child of a big pytest worker "peaks" at the
# worker's size before it has done anything.
_PEAK_RSS_HOOK = """
import atexit, sys
def _report_peak():
    with open('/proc/self/status') as status:
        peak = next(line.split()[1] for line in status if line.startswith('VmHWM:'))
    sys.stderr.write(f'\\npeak-rss-kib {peak}\\n')
atexit.register(_report_peak)
"""


def _run_measured(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``python -m gqa_decompose ARGS`` (or ``-c CODE ARGS``) to completion; returns its result and its
    own peak RSS in MB."""
    if args[0] == "-m":
        code = f"import runpy\nrunpy.run_module({args[1]!r}, run_name='__main__')"
        rest = args[2:]
    else:
        code, rest = args[1], args[2:]
    result = subprocess.run([sys.executable, "-c", _PEAK_RSS_HOOK + code, *rest], capture_output=True, text=True)
    lines = result.stderr.splitlines()
    peak = next(int(line.split()[1]) for line in reversed(lines) if line.startswith("peak-rss-kib "))
    result.stderr = "\n".join(line for line in lines if not line.startswith("peak-rss-kib "))
    return result, peak / 1024


def _gqa_count(path: pathlib.Path) -> int:
    model = onnx.load(path, load_external_data=False)
    return sum(node.op_type == "GroupQueryAttention" for node in model.graph.node)


def test_a_64_layer_model_with_4_gb_of_weights_is_rewritten_in_under_300_mb_and_loads_in_ort(tmp_path):
    source = write_sparse_model(tmp_path, layers=64, **LLAMA_1B_LAYER)
    weights = (tmp_path / "model.onnx.data").stat().st_size
    assert weights > 4e9 > 2**31  # beyond the 2 GB protobuf limit
    output = tmp_path / "model.decomposed.onnx"

    result, peak_mb = _run_measured(
        "-m", "gqa_decompose", str(source), "-o", str(output), "--reuse-data", "--no-verify", "-q"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("decomposed (packed QKV") == 64
    assert peak_mb < RSS_LIMIT_MB, f"peak RSS {peak_mb:.0f} MB"
    print(f"\nrewrite of {weights / 1e9:.1f} GB: peak RSS {peak_mb:.0f} MB")

    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.decomposed.onnx", "model.onnx", "model.onnx.data"]
    assert output.stat().st_size < 16 << 20  # the graph only
    assert _gqa_count(output) == 0 and _gqa_count(source) == 64
    onnx.checker.check_model(str(output))  # by path: the checker's mode for models with large external data

    loaded, ort_peak_mb = _run_measured("-c", _RUN_ONE_STEP, str(output))
    assert loaded.returncode == 0 and loaded.stdout.strip() == "ok", loaded.stderr
    print(f"ONNX Runtime load + one step: peak RSS {ort_peak_mb:.0f} MB")


def test_copying_more_weights_than_the_memory_bound_streams_them(tmp_path):
    # 4 layers at the same width: 0.5 GB of weights, more than the bound, copied into the output's own file.
    source = write_sparse_model(tmp_path / "in", layers=4, **LLAMA_1B_LAYER)
    weights = (tmp_path / "in" / "model.onnx.data").stat().st_size
    assert weights > RSS_LIMIT_MB * 2**20 * 1.5
    output = tmp_path / "out" / "model.onnx"
    output.parent.mkdir()
    result, peak_mb = _run_measured("-m", "gqa_decompose", str(source), "-o", str(output), "--no-verify", "-q")
    assert result.returncode == 0, result.stderr
    assert peak_mb < RSS_LIMIT_MB, f"peak RSS {peak_mb:.0f} MB while copying {weights / 1e6:.0f} MB"
    assert (output.parent / "model.onnx.data").stat().st_size >= weights
    print(f"\ncopy of {weights / 1e6:.0f} MB: peak RSS {peak_mb:.0f} MB")
