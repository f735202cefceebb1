"""Run a builder fixture and its decomposition through onnxruntime-genai's generator.

onnxruntime-genai binds present to past in one buffer (``past_present_share_buffer``)
and drives the model step by step, which is how the builder's models are deployed.
This script decomposes each ``models/builder-*`` fixture (with the project's
environment), then, in an environment that has onnxruntime-genai, greedily
generates from the same prompt with the original and the decomposed folder and
compares the tokens and the logits of every step.

    python scripts/check_genai.py --genai-python /work/venv-builder/bin/python

(onnxruntime-genai pulls in torch-free wheels, but its version must match the
onnxruntime it loads; see models/builder-tiny-llama/PROVENANCE.md.)
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import subprocess
import sys
import tempfile

import gqa_decompose

REPO = pathlib.Path(__file__).resolve().parent.parent

_GENERATE = r"""
import json, sys
import numpy as np
import onnxruntime_genai as og

folder, steps = sys.argv[1], int(sys.argv[2])
model = og.Model(folder)
params = og.GeneratorParams(model)
params.set_search_options(do_sample=False, max_length=64)
generator = og.Generator(model, params)
generator.append_tokens([[1, 30, 33, 17, 48, 79, 36, 45, 76, 68, 26]])
tokens, logits = [], []
for _ in range(steps):
    logits.append(np.asarray(generator.get_output("logits"))[:, -1].tolist())
    generator.generate_next_token()
    tokens.append(int(generator.get_next_tokens()[0]))
print(json.dumps({"tokens": tokens, "logits": logits}))
"""


def generate(python: str, folder: pathlib.Path, steps: int) -> dict:
    result = subprocess.run(
        [python, "-c", _GENERATE, str(folder), str(steps)], capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--genai-python", required=True, help="a Python with onnxruntime_genai")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("fixtures", nargs="*", help="fixture folder names (default: every models/builder-*)")
    args = parser.parse_args()
    worst_overall = 0.0
    sources = sorted((REPO / "models").glob("builder-*/model.onnx"))
    if args.fixtures:
        sources = [REPO / "models" / name / "model.onnx" for name in args.fixtures]
    for source in sources:
        folder = pathlib.Path(tempfile.mkdtemp(prefix="gqa-genai-"))
        config = json.loads((source.parent / "genai_config.json").read_text())
        config["model"]["decoder"]["session_options"]["provider_options"] = []  # CPU
        try:
            shutil.copy(source, folder / "model.onnx")
            (folder / "genai_config.json").write_text(json.dumps(config))
            original = generate(args.genai_python, folder, args.steps)
            for kv_cache in ("any", "static"):
                options = gqa_decompose.DecomposeOptions(static_kv_cache=kv_cache == "static")
                gqa_decompose.decompose_file(source, folder / f"{kv_cache}.onnx", options=options)
                config["model"]["decoder"]["filename"] = f"{kv_cache}.onnx"
                (folder / "genai_config.json").write_text(json.dumps(config))
                decomposed = generate(args.genai_python, folder, args.steps)
                worst = max(
                    abs(a - b)
                    for step_a, step_b in zip(original["logits"], decomposed["logits"])
                    for row_a, row_b in zip(step_a, step_b)
                    for a, b in zip(row_a, row_b)
                )
                worst_overall = max(worst_overall, worst)
                same = original["tokens"] == decomposed["tokens"]
                print(
                    f"{source.parent.name} (--kv-cache {kv_cache}): {args.steps} greedy tokens "
                    f"{'identical' if same else 'DIFFER'}, max logit difference {worst:.2g}"
                )
        except subprocess.CalledProcessError as error:
            print(f"{source.parent.name}: onnxruntime-genai failed: {error.stderr.strip().splitlines()[-1]}")
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    print(f"max logit difference over all fixtures: {worst_overall:.2g}")


if __name__ == "__main__":
    sys.exit(main())
