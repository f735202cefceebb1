"""decompose_file(): verified before anything is written, with the CLI's guarantee, and what it returns."""

from __future__ import annotations

import pytest
from test_cli import GQA_NODES, scale_attention_by
from test_model_io import folder_listing

from gqa_decompose import decompose_file
from gqa_decompose.errors import GqaDecomposeError


def test_a_passing_model_is_written_with_its_verifications(tiny):
    result = decompose_file(tiny)
    assert result.output == tiny.with_name("tiny-llama-gqa.decomposed.onnx")
    assert result.output.is_file()
    assert [node.name for node in result.nodes] == GQA_NODES
    assert len(result.verifications) == len(result.nodes)
    assert all(v is not None and v.passed for v in result.verifications)
    assert result.model_verification is None


def test_a_wrong_expansion_raises_and_writes_nothing(tiny, monkeypatch):
    scale_attention_by(1.5, monkeypatch)
    with pytest.raises(GqaDecomposeError, match="verification failed") as raised:
        decompose_file(tiny)
    assert raised.value.node_name == GQA_NODES[0]
    assert folder_listing(tiny.parent) == {tiny.name}


def test_verify_none_writes_even_a_wrong_expansion(tiny, monkeypatch):
    # The same sabotage goes unnoticed without verification: the test above owes its failure to verification.
    scale_attention_by(1.5, monkeypatch)
    result = decompose_file(tiny, verify="none")
    assert result.output.is_file()
    assert result.verifications == (None,) * len(GQA_NODES)


def test_model_level_verification_is_returned(tiny):
    result = decompose_file(tiny, verify="model")
    assert result.model_verification is not None and result.model_verification.passed
    assert result.verifications == (None,) * len(GQA_NODES)


def test_an_unknown_verify_mode_is_refused(tiny):
    with pytest.raises(ValueError, match="verify"):
        decompose_file(tiny, verify="some")
    assert folder_listing(tiny.parent) == {tiny.name}
