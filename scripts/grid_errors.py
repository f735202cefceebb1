"""Max error per dtype (and per feature) over the test grids, against ONNX Runtime CPU.

The tests assert each cell within tolerance; this prints how far inside the
tolerance the grid actually is.

    python scripts/grid_errors.py
"""

from __future__ import annotations

import collections
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from gqa_models import GqaConfig, gqa_node, make_gqa_model  # noqa: E402
from test_features import FEATURES  # noqa: E402
from test_grid import GRID, HEAD_RATIOS  # noqa: E402

from gqa_decompose.verify import verify_node_model  # noqa: E402


def _run(config: GqaConfig):
    model = make_gqa_model(config)
    _, node = gqa_node(model)
    return verify_node_model(node, config.opset, model.ir_version)


def main() -> None:
    worst: dict[str, float] = collections.defaultdict(float)
    cells: collections.Counter = collections.Counter()
    passed: collections.Counter = collections.Counter()
    phases = 0
    for ratio, head_size, packed, rotary, dtype, static_dims in GRID:
        heads, kv_heads = HEAD_RATIOS[ratio]
        config = GqaConfig(heads, kv_heads, head_size, packed=packed, rotary=rotary, dtype=dtype, static_dims=static_dims)
        result = _run(config)
        key = f"core/{dtype}"
        cells[key] += 1
        passed[key] += result.passed
        phases += len(result.results)
        worst[key] = max(worst[key], result.max_error or 0.0)
    for feature, base in FEATURES.items():
        for dtype in ("float32", "float16"):
            result = _run(dataclasses.replace(base, dtype=dtype))
            key = f"{feature}/{dtype}"
            cells[key] += 1
            passed[key] += result.passed
            phases += len(result.results)
            worst[key] = max(worst[key], result.max_error or 0.0)
            worst[f"all features/{dtype}"] = max(worst[f"all features/{dtype}"], result.max_error or 0.0)
    print(f"{'cell group':40s} {'cells':>5s} {'passed':>6s} {'max abs error':>14s}")
    for key in sorted(cells):
        print(f"{key:40s} {cells[key]:5d} {passed[key]:6d} {worst[key]:14.3g}")
    for dtype in ("float32", "float16"):
        key = f"all features/{dtype}"
        print(f"{key:40s} {'':5s} {'':6s} {worst[key]:14.3g}")
    print(f"total cells {sum(cells.values())}, passed {sum(passed.values())}, phases run {phases}")


if __name__ == "__main__":
    main()
