"""Idempotence and stability.

* Running the tool twice on the same input gives byte-identical output (model and
  data file), in separate processes, so hash seeds differ between the runs.
* An already-decomposed model has no GQA node: the CLI says so, exits 0 and writes
  nothing; the API returns it unchanged (byte-identical).
"""

from __future__ import annotations

import hashlib
import pathlib
import shutil
import subprocess
import sys

import onnx
import pytest
from test_model_io import TINY_LLAMA, save_with_external_data

import gqa_decompose

REPO = pathlib.Path(__file__).resolve().parent.parent
BUILDER_MODEL = REPO / "models" / "builder-tiny-llama" / "model.onnx"


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gqa_decompose", "-q", *map(str, args)], capture_output=True, text=True, timeout=300
    )


def digest(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(params=["external data", "builder"])
def source(request, tmp_path) -> pathlib.Path:
    if request.param == "external data":
        path = tmp_path / "in" / "tiny.onnx"
        save_with_external_data(TINY_LLAMA, path)
        return path
    folder = tmp_path / "in"
    shutil.copytree(BUILDER_MODEL.parent, folder)
    return folder / BUILDER_MODEL.name


def test_two_runs_write_byte_identical_models_and_data_files(source, tmp_path):
    target = tmp_path / "out" / "x.onnx"
    target.parent.mkdir()
    hashes = []
    for _ in range(2):
        result = run_cli(source, "-o", target, "--no-verify")
        assert result.returncode == 0, result.stderr
        files = sorted(target.parent.iterdir())
        hashes.append({f.name: digest(f) for f in files})
        for f in files:
            f.unlink()
    assert hashes[0] == hashes[1]
    assert "x.onnx" in hashes[0]


def test_decomposing_a_decomposed_model_changes_nothing(source, tmp_path):
    first = tmp_path / "out" / "x.onnx"
    first.parent.mkdir()
    assert run_cli(source, "-o", first, "--no-verify").returncode == 0
    before = {f.name: digest(f) for f in first.parent.iterdir()}
    again = run_cli(first, "-o", tmp_path / "out" / "y.onnx")
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines() == [
        f"{first}: no com.microsoft.GroupQueryAttention node; nothing to do, nothing written"
    ]
    assert {f.name: digest(f) for f in first.parent.iterdir()} == before  # nothing written, nothing changed

    decomposed = onnx.load(first)
    assert gqa_decompose.decompose(decomposed).SerializeToString() == decomposed.SerializeToString()
