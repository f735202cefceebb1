"""Fixtures shared by the CLI and gate tests: copies of the shipped models, so models/ is never written."""

from __future__ import annotations

import pathlib
import shutil

import pytest

MODELS = pathlib.Path(__file__).resolve().parent.parent / "models"


def has_gqa(path: pathlib.Path) -> bool:
    """Whether the model at ``path`` holds a GroupQueryAttention node (its weights are not read)."""
    import onnx

    return any(node.op_type == "GroupQueryAttention" for node in onnx.load(path, load_external_data=False).graph.node)


@pytest.fixture
def tiny(tmp_path) -> pathlib.Path:
    """models/tiny-llama-gqa.onnx, copied."""
    path = tmp_path / "tiny-llama-gqa.onnx"
    shutil.copyfile(MODELS / "tiny-llama-gqa.onnx", path)
    return path


@pytest.fixture
def builder(tmp_path) -> pathlib.Path:
    """models/builder-tiny-llama/model.onnx, copied with its folder (genai_config.json included)."""
    folder = tmp_path / "builder"
    shutil.copytree(MODELS / "builder-tiny-llama", folder)
    return folder / "model.onnx"
