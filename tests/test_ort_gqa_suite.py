"""A sample of ONNX Runtime's own GQA test grid (test_gqa_cpu.py, re-implemented by scripts/ort_gqa_suite.py; the
whole grid's result is docs/ort-gqa-suite.md): each case's graph runs fused and after ``decompose()`` on ORT CPU,
with the test's IO binding (present bound to the past buffer when shared), and the outputs must agree."""

from __future__ import annotations

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "scripts"))
import ort_gqa_suite  # noqa: E402

GRID = ort_gqa_suite.grid()
PLAIN = dict(local=False, rotary=False, interleaved=False, packed=False, softcap=0.0, smooth_softmax=False, tree=False)


def _case(test: str, buffer: bool, **flags) -> ort_gqa_suite.Case:
    """The first grid case of ``test`` with these flags (the rest off)."""
    wanted = {**PLAIN, **flags}
    return next(
        c for c in GRID if c.test == test and c.buffer == buffer and all(getattr(c, k) == v for k, v in wanted.items())
    )


# The prompt graph declares present twice, the second time with kv_sequence_length rows; with a shared buffer ORT
# binds present to the 262-row past: the rewrite keeps the original declarations (issue 13 item 3), or ORT refuses.

SAMPLE = [
    pytest.param(_case("no_past", False), id="prompt-no-buffer"),
    pytest.param(_case("no_past", False, rotary=True, packed=True, softcap=50.0), id="prompt-no-buffer-rotary-packed"),
    pytest.param(_case("no_past", True), id="prompt-buffer"),
    pytest.param(_case("no_past", True, local=True, rotary=True, interleaved=True), id="prompt-buffer-local-rotary"),
    pytest.param(_case("past", True), id="decode-buffer"),
    pytest.param(_case("past", False), id="decode-no-buffer"),
    pytest.param(_case("past", True, local=True, rotary=True, softcap=50.0), id="decode-buffer-local-rotary-softcap"),
    pytest.param(
        _case("past", False, rotary=True, interleaved=True, packed=True, smooth_softmax=True),
        id="decode-no-buffer-interleaved-packed-smooth",
    ),
    pytest.param(_case("interactive", False), id="chunk-no-buffer"),
    pytest.param(_case("interactive", True, local=True), id="chunk-buffer-local"),
]


@pytest.mark.parametrize("case", SAMPLE)
def test_case_matches_the_fused_run(case):
    result = ort_gqa_suite.run_case(case)
    assert result["outcome"] == "passed", (result["outcome"], result["detail"])
    assert set(result["errors"]) == {"output", "present_key", "present_value"}


@pytest.mark.parametrize(
    ("case", "message"),
    [
        pytest.param(
            _case("no_past", True, tree=True), "position_ids dimension 0 must be equal to the batch size", id="prompt"
        ),
        pytest.param(
            _case("past", True, tree=True),
            "attention_bias dimension 3 must be equal to total_sequence_length",
            id="decode",
        ),
    ],
)
def test_the_grids_tree_attention_cases_are_rejected_by_ort_itself(case, message):
    # The test file feeds position_ids [1, 1] for a batch of 3, and an attention_bias as wide as max(seqlens_k) + 1
    # where total_sequence_length is the buffer's length: ORT 1.31 CPU refuses its own graphs, fused.
    result = ort_gqa_suite.run_case(case)
    assert result["outcome"] == "ORT rejects" and message in result["detail"], result


def test_grid_is_the_pipeline_mode_grid():
    counts = {test: sum(c.test == test for c in GRID) for test in ("no_past", "past", "interactive")}
    assert counts == {"no_past": 384, "past": 192, "interactive": 48}
    assert len({c.name for c in GRID}) == len(GRID)


def test_a_wrong_rewrite_is_caught(monkeypatch):
    # The comparison must see a rewrite that is off: scale the rewritten model's output by 1.01.
    import numpy as np

    real = ort_gqa_suite.run_bound

    def skewed(session, feeds, buffer):
        outputs = real(session, feeds, buffer)
        if skewed.calls:
            outputs["output"] = outputs["output"] * np.float32(1.01)
        skewed.calls += 1
        return outputs

    skewed.calls = 0
    monkeypatch.setattr(ort_gqa_suite, "run_bound", skewed)
    result = ort_gqa_suite.run_case(_case("past", False))
    assert result["outcome"] == "mismatch" and "output" in result["detail"], result
