"""What the fixture generators (``make_builder_fixture.py``, ``make_dynamo_fixture.py``,
``make_optimizer_fixture.py``) share: writing one self-contained ``model.onnx`` that ONNX Runtime loads."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

MAX_IR_VERSION = 10  # what ORT 1.31 (and every ORT >= 1.16) reads


def write_model(
    proto, dest: Path, *, stale: Sequence[str], ir_key: str, max_bytes: int | None = None, limit: str = ""
) -> dict:
    """Save ``proto`` as ``dest/model.onnx`` with every weight inside, after removing ``stale`` files of an
    earlier run; check that ORT CPU loads it. Returns notes: the IR version it came with (under ``ir_key``),
    ``ir_patched_to`` when that was above ``MAX_IR_VERSION``, the opsets and, with ``max_bytes``, the size
    (at least ``max_bytes``, said ``limit``, is an error: fixtures stay small)."""
    import onnx
    import onnxruntime as ort

    dest.mkdir(parents=True, exist_ok=True)
    for name in stale:
        (dest / name).unlink(missing_ok=True)
    notes = {ir_key: proto.ir_version}
    if proto.ir_version > MAX_IR_VERSION:
        proto.ir_version = MAX_IR_VERSION
        notes["ir_patched_to"] = MAX_IR_VERSION
    onnx.save_model(proto, str(dest / "model.onnx"), save_as_external_data=False)
    # onnx.checker rejects ORT-only ops in the default domain (the builder's SimplifiedLayerNormalization), so
    # check that ONNX Runtime loads the saved file instead.
    ort.InferenceSession(str(dest / "model.onnx"), providers=["CPUExecutionProvider"])
    notes["opsets"] = {imp.domain or "ai.onnx": imp.version for imp in proto.opset_import}
    if max_bytes is not None:
        notes["size"] = (dest / "model.onnx").stat().st_size
        if notes["size"] >= max_bytes:
            raise SystemExit(f"model.onnx is {notes['size']} bytes (>= {limit})")
    return notes
