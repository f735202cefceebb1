"""Hash the graphs the rewrite emits, to show a refactoring leaves them byte-identical.

Decomposes every fixture under ``models/`` and a set of one-node models built by
``tests/gqa_models.py`` (the feature and grid configurations, plus a few options),
and prints one ``sha256  name`` line per rewrite. Save the output before a
refactoring and diff it after::

    python scripts/emitted_hashes.py > /tmp/before.txt
    ... refactor ...
    python scripts/emitted_hashes.py > /tmp/after.txt && diff /tmp/before.txt /tmp/after.txt
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import pathlib
import sys

import onnx
import onnx_ir as ir

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import gqa_decompose  # noqa: E402
from gqa_decompose.errors import GqaDecomposeError  # noqa: E402

OPTION_SETS = {
    "default": {},
    "fast": {"fast_paths": True},
    "openvino": {"runtime_profile": "openvino"},
    "static": {"static_kv_cache": True},
    "growing": {"growing_kv_cache": True},
    "native": {"native_precision": True},
    "attention": {"target": "attention", "raise_opset": True},
}


def _configs():
    from gqa_models import GqaConfig
    from test_features import FEATURES

    for name, config in FEATURES.items():
        for dtype in ("float32", "float16"):
            yield f"feature:{name}:{dtype}", dataclasses.replace(config, dtype=dtype)
    for ratio, head_size, packed, rotary, static_dims in itertools.product(
        [(4, 2), (4, 1)], [16, 64], [False, True], ["off", "half", "interleaved"], [False, True]
    ):
        config = GqaConfig(
            num_heads=ratio[0],
            kv_num_heads=ratio[1],
            head_size=head_size,
            packed=packed,
            rotary=rotary,
            static_dims=static_dims,
        )
        yield f"grid:{ratio}:{head_size}:{packed}:{rotary}:{static_dims}", config
    extras = {
        "no_past": GqaConfig(past=False, rotary="half"),
        "opset24": GqaConfig(opset=24, rotary="half"),
        "opset23_window": GqaConfig(opset=23, local_window_size=2),
        "quant8": GqaConfig(kv_quant="PER_TENSOR"),
        "quant4_channel": GqaConfig(kv_quant="PER_CHANNEL", kv_bits=4),
        "sliding": GqaConfig(local_window_size=3, extra_attributes=(("sliding_window_cache", 1),)),
        "qk_norm": GqaConfig(qk_norm="qk", rotary="half"),
        "qk_norm_packed": GqaConfig(qk_norm="qk", packed=True, rotary="half"),
        "bf16": GqaConfig(dtype="bfloat16", rotary="half"),
        "rotary_symbolic": GqaConfig(rotary="half", rotary_as_input="symbolic"),
        "seqlens_B1": GqaConfig(seqlens_shape="B1", total_shape="1"),
    }
    yield from ((f"extra:{name}", config) for name, config in extras.items())


def _digest(model: onnx.ModelProto) -> str:
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()


def _rewrite(label: str, load, options: dict) -> str:
    try:
        out = gqa_decompose.decompose(load(), check=False, **options)
    except GqaDecomposeError as error:
        return f"refused  {label}: {error}"
    if isinstance(out, ir.Model):
        out = ir.serde.serialize_model(out)
    return f"{_digest(out)}  {label}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-fixtures", action="store_true", help="only the built one-node models")
    args = parser.parse_args()
    from gqa_models import make_gqa_model

    for name, config in _configs():
        for option_name, options in OPTION_SETS.items():
            print(_rewrite(f"{name} [{option_name}]", lambda c=config: make_gqa_model(c), options), flush=True)
    if args.no_fixtures:
        return
    fixtures = sorted(ROOT.glob("models/**/*.onnx"))
    for path in fixtures:
        for option_name, options in OPTION_SETS.items():
            label = f"{path.relative_to(ROOT)} [{option_name}]"
            print(_rewrite(label, lambda p=path: ir.load(p), options), flush=True)


if __name__ == "__main__":
    main()
