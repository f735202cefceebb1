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
from test_bfloat16 import CONFIGS as BFLOAT16  # noqa: E402
from test_features import FEATURES, WINDOWED_CACHE  # noqa: E402
from test_grid import GRID, HEAD_RATIOS  # noqa: E402
from test_quantized_cache import LAYOUTS, VARIANTS  # noqa: E402

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
    extra_groups = [
        (f"windowed cache/{name}", dataclasses.replace(base, dtype=dtype))
        for name, base in WINDOWED_CACHE.items()
        for dtype in ("float32", "float16")
    ]
    extra_groups += [
        (f"quantized int{bits} {layout.lower()}/{name}", dataclasses.replace(base, kv_quant=layout, kv_bits=bits))
        for name, base in VARIANTS.items()
        for bits, layout in LAYOUTS
    ]
    extra_groups += [(f"bfloat16/{name}", config) for name, config in BFLOAT16.items()]
    for key, config in extra_groups:
        result = _run(config)
        cells[key] += 1
        passed[key] += result.passed
        phases += len(result.results)
        worst[key] = max(worst[key], result.max_error or 0.0)
        group = f"all {key.split('/')[0].split(' ')[0]}/{config.dtype}"
        worst[group] = max(worst[group], result.max_error or 0.0)
    print(f"{'cell group':40s} {'cells':>5s} {'passed':>6s} {'max abs error':>14s}")
    for key in sorted(cells):
        print(f"{key:40s} {cells[key]:5d} {passed[key]:6d} {worst[key]:14.3g}")
    for key in sorted(k for k in worst if k.startswith("all ")):
        print(f"{key:40s} {'':5s} {'':6s} {worst[key]:14.3g}")
    print(f"total cells {sum(cells.values())}, passed {sum(passed.values())}, phases run {phases}")


if __name__ == "__main__":
    main()
