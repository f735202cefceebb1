"""Max error per dtype (and per feature) over the test grids, against ONNX Runtime CPU.

The tests assert each cell within tolerance; this prints how far inside the
tolerance the grid actually is.

    python scripts/grid_errors.py                      # every grid (minutes)
    python scripts/grid_errors.py --only quantized --only "qk norm"   # groups whose name starts so
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from gqa_models import GqaConfig, gqa_node, make_gqa_model  # noqa: E402
from test_bfloat16 import CONFIGS as BFLOAT16  # noqa: E402
from test_features import FEATURES, WINDOWED_CACHE  # noqa: E402
from test_grid import GRID, HEAD_RATIOS  # noqa: E402
from test_qk_norm import COMBINATIONS as QK_NORM_COMBINATIONS  # noqa: E402
from test_qk_norm import GRID as QK_NORM_GRID  # noqa: E402
from test_quantized_cache import LAYOUTS, VARIANTS  # noqa: E402

from gqa_decompose.verify import verify_node_model  # noqa: E402


def _run(config: GqaConfig):
    model = make_gqa_model(config)
    _, node = gqa_node(model)
    return verify_node_model(node, config.opset, model.ir_version)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", default=[], help="run only groups whose name starts so")
    only = parser.parse_args().only

    def wanted(key: str) -> bool:
        return not only or any(key.startswith(prefix) for prefix in only)

    worst: dict[str, float] = collections.defaultdict(float)
    cells: collections.Counter = collections.Counter()
    passed: collections.Counter = collections.Counter()
    phases = 0
    for ratio, head_size, packed, rotary, dtype, static_dims in GRID if wanted("core") else []:
        heads, kv_heads = HEAD_RATIOS[ratio]
        config = GqaConfig(
            heads, kv_heads, head_size, packed=packed, rotary=rotary, dtype=dtype, static_dims=static_dims
        )
        result = _run(config)
        key = f"core/{dtype}"
        cells[key] += 1
        passed[key] += result.passed
        phases += len(result.results)
        worst[key] = max(worst[key], result.max_error or 0.0)
    for feature, base in FEATURES.items() if wanted("features") else []:
        for dtype in ("float32", "float16"):
            result = _run(dataclasses.replace(base, dtype=dtype))
            key = f"features {feature}/{dtype}"
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
        (
            f"quantized int{bits} {layout.lower()}/{name}",
            dataclasses.replace(base, kv_quant=layout, kv_bits=bits, dtype=dtype),
        )
        for name, base in VARIANTS.items()
        for bits, layout in LAYOUTS
        for dtype in ("float32", "float16")
    ]
    extra_groups += [
        (
            f"qk norm grid/{norm} {rotary} {'packed' if packed else 'separate'} opset {opset}",
            GqaConfig(qk_norm=norm, rotary=rotary, packed=packed, dtype=dtype, opset=opset),
        )
        for norm, rotary, packed, dtype, opset in QK_NORM_GRID
    ]
    extra_groups += [(f"qk norm with/{name}", config) for name, config in QK_NORM_COMBINATIONS.items()]
    extra_groups += [(f"bfloat16/{name}", config) for name, config in BFLOAT16.items()]
    for key, config in extra_groups:
        if not wanted(key):
            continue
        result = _run(config)
        cells[key] += 1
        passed[key] += result.passed
        phases += len(result.results)
        worst[key] = max(worst[key], result.max_error or 0.0)
        group = f"all {' '.join(key.split('/')[0].split(' ')[:2])}/{config.dtype}"
        worst[group] = max(worst[group], result.max_error or 0.0)
    print(f"{'cell group':40s} {'cells':>5s} {'passed':>6s} {'max abs error':>14s}")
    for key in sorted(cells):
        print(f"{key:40s} {cells[key]:5d} {passed[key]:6d} {worst[key]:14.3g}")
    for key in sorted(k for k in worst if k.startswith("all ")):
        print(f"{key:40s} {'':5s} {'':6s} {worst[key]:14.3g}")
    print(f"total cells {sum(cells.values())}, passed {sum(passed.values())}, phases run {phases}")


if __name__ == "__main__":
    main()
