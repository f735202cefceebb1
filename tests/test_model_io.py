"""Loading and saving models: weights stay on disk, paths stay inside the model's folder,
outputs appear atomically and never replace a file of the input."""

from __future__ import annotations

import hashlib
import os
import pathlib

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from gqa_models import GqaConfig, make_gqa_model

from gqa_decompose import model_io
from gqa_decompose.errors import GqaDecomposeError

REPO = pathlib.Path(__file__).resolve().parent.parent
TINY_LLAMA = REPO / "models" / "tiny-llama-gqa.onnx"
SMALL_TENSOR_BYTES = 1024  # external constants up to this size are read at load


def sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def folder_listing(folder: pathlib.Path) -> set[str]:
    """Every entry under ``folder`` (hidden ones included), relative to it."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def save_with_external_data(source: pathlib.Path, path: pathlib.Path, location: str | None = None) -> pathlib.Path:
    """``source`` saved at ``path`` with every tensor in one external-data file; returns that file."""
    location = location or f"{path.name}.data"
    path.parent.mkdir(parents=True, exist_ok=True)
    model = onnx.load(source)
    onnx.save_model(
        model, path, save_as_external_data=True, all_tensors_to_one_file=True, location=location, size_threshold=0
    )
    return path.parent / location


def point_at_external_data(tensor: onnx.TensorProto, location: str, length: int) -> None:
    """Rewrite ``tensor`` by hand into a reference to ``location`` (no data kept inline)."""
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", "0"), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def write_model_with_external_cos_cache(folder: pathlib.Path, location: str) -> pathlib.Path:
    """A rotary GQA model in ``folder`` whose cos_cache initializer lives at ``location``."""
    model = make_gqa_model(GqaConfig(rotary="half"))
    cos = next(t for t in model.graph.initializer if t.name == "cos_cache")
    payload = onnx.numpy_helper.to_array(cos).tobytes()
    point_at_external_data(cos, location, len(payload))
    folder.mkdir(parents=True, exist_ok=True)
    data_path = pathlib.Path(location) if os.path.isabs(location) else folder / location
    data_path.write_bytes(payload)
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def initializer_tensors(model: ir.Model) -> dict[str, ir.TensorProtocol]:
    return {name: value.const_value for name, value in model.graph.initializers.items()}


# Paths -------------------------------------------------------------------------------------


def test_the_default_output_sits_beside_the_model_as_stem_dot_decomposed_onnx(tmp_path):
    assert model_io.default_output_path(tmp_path / "sub" / "model.onnx") == tmp_path / "sub" / "model.decomposed.onnx"
    assert model_io.default_output_path("a/b.v2.onnx") == pathlib.Path("a/b.v2.decomposed.onnx")


# Loading -----------------------------------------------------------------------------------


def test_loading_a_missing_file_raises_a_gqa_decompose_error_naming_it(tmp_path):
    with pytest.raises(GqaDecomposeError, match="no such model file") as info:
        model_io.load_model(tmp_path / "absent.onnx")
    assert "absent.onnx" in str(info.value)


def test_loading_a_file_that_is_not_onnx_raises_a_one_line_gqa_decompose_error(tmp_path):
    path = tmp_path / "text.onnx"
    path.write_text("this is not a protobuf\n" * 5)
    with pytest.raises(GqaDecomposeError, match="cannot read .* as an ONNX model") as info:
        model_io.load_model(path)
    assert "\n" not in str(info.value)


def test_loading_keeps_every_weight_larger_than_1_kib_as_an_unread_external_tensor(tmp_path):
    path = tmp_path / "tiny.onnx"
    save_with_external_data(TINY_LLAMA, path)
    model = model_io.load_model(path)
    tensors = initializer_tensors(model)
    large = {name: t for name, t in tensors.items() if t.nbytes > SMALL_TENSOR_BYTES}
    assert len(large) >= 10, sorted(large)  # embedding, projections, lm head, cos/sin caches
    not_external = [name for name, t in large.items() if not isinstance(t, ir.ExternalTensor)]
    assert not not_external
    assert {pathlib.Path(t.path).resolve() for t in large.values()} == {(tmp_path / "tiny.onnx.data").resolve()}
    assert model_io.external_tensors(model) == list(large.values())


def test_loading_reads_external_constants_of_at_most_1_kib_so_shape_inference_can_use_them(tmp_path):
    path = tmp_path / "tiny.onnx"
    save_with_external_data(TINY_LLAMA, path)
    model = model_io.load_model(path)
    small = {name: t for name, t in initializer_tensors(model).items() if t.nbytes <= SMALL_TENSOR_BYTES}
    assert small, "the model holds small constants (axes, shapes)"
    assert not [name for name, t in small.items() if isinstance(t, ir.ExternalTensor)]
    reference = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(TINY_LLAMA).graph.initializer}
    for name, tensor in small.items():
        np.testing.assert_array_equal(tensor.numpy(), reference[name], err_msg=name)


@pytest.mark.parametrize("where", ["parent folder", "absolute path"])
def test_loading_refuses_external_data_outside_the_models_folder(tmp_path, where):
    location = "../outside.data" if where == "parent folder" else str(tmp_path / "outside.data")
    path = write_model_with_external_cos_cache(tmp_path / "model", location)
    assert (tmp_path / "outside.data").is_file()
    with pytest.raises(GqaDecomposeError, match="outside the model's folder") as info:
        model_io.load_model(path)
    assert "cos_cache" in str(info.value)
    assert "outside.data" in str(info.value)


def test_loading_refuses_external_data_that_does_not_exist(tmp_path):
    path = write_model_with_external_cos_cache(tmp_path, "weights.data")
    (tmp_path / "weights.data").unlink()
    with pytest.raises(GqaDecomposeError, match="'weights.data', which does not exist"):
        model_io.load_model(path)


def test_loading_follows_external_data_in_a_subfolder_of_the_models_folder(tmp_path):
    (tmp_path / "weights").mkdir()
    path = write_model_with_external_cos_cache(tmp_path, "weights/cos.data")
    model = model_io.load_model(path)
    cos = model.graph.initializers["cos_cache"].const_value
    assert isinstance(cos, ir.ExternalTensor)
    expected = next(t for t in make_gqa_model(GqaConfig(rotary="half")).graph.initializer if t.name == "cos_cache")
    np.testing.assert_array_equal(cos.numpy(), onnx.numpy_helper.to_array(expected))


# Saving ------------------------------------------------------------------------------------


def test_saving_without_external_data_writes_one_self_contained_file(tmp_path):
    model = model_io.load_model(TINY_LLAMA)
    target = tmp_path / "new" / "deeper" / "out.onnx"
    written = model_io.save_model(model, target, external_data=False)
    assert written == [target]
    assert folder_listing(tmp_path / "new") == {"deeper", "deeper/out.onnx"}
    reloaded = onnx.load(target)
    assert not [t.name for t in reloaded.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert len(reloaded.graph.node) == len(onnx.load(TINY_LLAMA).graph.node)


def test_saving_with_external_data_streams_weights_into_the_outputs_own_data_file(tmp_path):
    source = tmp_path / "in" / "tiny.onnx"
    source_data = save_with_external_data(TINY_LLAMA, source)
    before = sha256(source_data)
    model = model_io.load_model(source)
    target = tmp_path / "out" / "x.onnx"
    written = model_io.save_model(model, target, external_data=True)
    assert written == [target, tmp_path / "out" / "x.onnx.data"]
    assert folder_listing(tmp_path / "out") == {"x.onnx", "x.onnx.data"}
    assert sha256(source_data) == before
    saved = onnx.load(target, load_external_data=False)
    locations = {
        entry.value for tensor in saved.graph.initializer for entry in tensor.external_data if entry.key == "location"
    }
    assert locations == {"x.onnx.data"}
    reference = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(TINY_LLAMA).graph.initializer}
    reloaded = onnx.load(target)
    assert {t.name for t in reloaded.graph.initializer} == set(reference)
    for tensor in reloaded.graph.initializer:
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(tensor), reference[tensor.name], err_msg=tensor.name)


def test_saving_reports_progress_up_to_the_number_of_tensors_written(tmp_path):
    source = tmp_path / "tiny.onnx"
    save_with_external_data(TINY_LLAMA, source)
    calls: list[tuple[int, int]] = []
    model_io.save_model(
        model_io.load_model(source), tmp_path / "out.onnx", external_data=True, progress=lambda *a: calls.append(a)
    )
    assert calls
    total = calls[0][1]
    assert all(t == total for _, t in calls)
    assert sorted(done for done, _ in calls) == list(range(1, total + 1))


def test_saving_over_an_existing_output_replaces_it(tmp_path):
    target = tmp_path / "out.onnx"
    target.write_bytes(b"an older output")
    model_io.save_model(model_io.load_model(TINY_LLAMA), target, external_data=False)
    assert onnx.load(target).graph.name == onnx.load(TINY_LLAMA).graph.name
    assert folder_listing(tmp_path) == {"out.onnx"}


def _failing_save(model, path, external_data=None, **kwargs):
    """Like onnx_ir.save, but the disk fills up halfway through."""
    path = pathlib.Path(path)
    if external_data is not None:
        (path.parent / external_data).write_bytes(b"\0" * 100)
    path.write_bytes(b"\x08\x0a partial")
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("external_data", [False, True], ids=["self-contained", "external data"])
def test_a_save_failing_midway_leaves_no_output_and_no_temporary_files(tmp_path, monkeypatch, external_data):
    source = tmp_path / "in" / "tiny.onnx"
    save_with_external_data(TINY_LLAMA, source)
    model = model_io.load_model(source)
    out = tmp_path / "out"
    out.mkdir()
    (out / "unrelated.txt").write_text("keep me")
    monkeypatch.setattr(model_io.ir, "save", _failing_save)
    with pytest.raises(GqaDecomposeError, match="cannot write .*x.onnx: No space left"):
        model_io.save_model(model, out / "x.onnx", external_data=external_data)
    assert folder_listing(out) == {"unrelated.txt"}


@pytest.mark.parametrize("external_data", [False, True], ids=["self-contained", "external data"])
def test_a_save_failing_midway_leaves_an_existing_output_intact(tmp_path, monkeypatch, external_data):
    source = tmp_path / "in" / "tiny.onnx"
    save_with_external_data(TINY_LLAMA, source)
    model = model_io.load_model(source)
    out = tmp_path / "out"
    out.mkdir()
    (out / "x.onnx").write_bytes(b"previous model")
    (out / "x.onnx.data").write_bytes(b"previous weights")
    monkeypatch.setattr(model_io.ir, "save", _failing_save)
    with pytest.raises(GqaDecomposeError, match="No space left"):
        model_io.save_model(model, out / "x.onnx", external_data=external_data)
    assert (out / "x.onnx").read_bytes() == b"previous model"
    assert (out / "x.onnx.data").read_bytes() == b"previous weights"
    assert folder_listing(out) == {"x.onnx", "x.onnx.data"}


@pytest.mark.parametrize("output_name", ["b.onnx", "b.onnx.data", "a.onnx"])
def test_saving_refuses_to_replace_a_file_of_the_input_model(tmp_path, output_name):
    # a.onnx keeps its weights in b.onnx.data: writing b.onnx would write b.onnx.data.
    source = tmp_path / "a.onnx"
    data = save_with_external_data(TINY_LLAMA, source, location="b.onnx.data")
    hashes = {source: sha256(source), data: sha256(data)}
    model = model_io.load_model(source)
    with pytest.raises(GqaDecomposeError, match="a file of the input model"):
        model_io.save_model(model, tmp_path / output_name, external_data=True)
    assert {path: sha256(path) for path in hashes} == hashes
    assert folder_listing(tmp_path) == {"a.onnx", "b.onnx.data"}


def test_a_save_failing_midway_removes_the_folders_it_created(tmp_path, monkeypatch):
    model = model_io.load_model(TINY_LLAMA)
    monkeypatch.setattr(model_io.ir, "save", _failing_save)
    with pytest.raises(GqaDecomposeError, match="No space left"):
        model_io.save_model(model, tmp_path / "new" / "deeper" / "x.onnx", external_data=False)
    assert folder_listing(tmp_path) == set()


def test_saving_removes_staging_folders_of_dead_runs_only(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".x.onnx.{int(dead.stdout)}.abc.partial"
    live = tmp_path / f".x.onnx.{os.getpid()}.def.partial"  # this process: alive
    other = tmp_path / f".y.onnx.{int(dead.stdout)}.ghi.partial"  # another target's
    for folder in (stale, live, other):
        folder.mkdir()
    model_io.save_model(model_io.load_model(TINY_LLAMA), tmp_path / "x.onnx", external_data=False)
    assert folder_listing(tmp_path) == {"x.onnx", live.name, other.name}
