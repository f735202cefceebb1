"""Loading and saving models: weights stay on disk, outputs appear atomically.

``load`` keeps external weights as lazy ``ExternalTensor`` handles (no weight
is read) after checking that every external-data path stays inside the
model's folder. ``save`` writes into a temporary folder beside the target and
renames the data file, then the model, into place, so a reader never sees a
half-written model and the input's own files are never opened for writing.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable

import onnx_ir as ir

from gqa_decompose.errors import GqaDecomposeError

__all__ = ["check_output_path", "default_output_path", "genai_shares_kv_buffer", "external_tensors", "load_model", "save_model"]


def default_output_path(model_path: str | os.PathLike) -> pathlib.Path:
    """``<stem>.decomposed.onnx`` beside the model."""
    path = pathlib.Path(model_path)
    return path.with_name(f"{path.stem}.decomposed.onnx")


def genai_shares_kv_buffer(model_path: str | os.PathLike) -> bool:
    """True when an onnxruntime-genai ``genai_config.json`` beside the model runs it with
    ``past_present_share_buffer``: past is then always a max-length (static) buffer."""
    path = pathlib.Path(model_path).absolute()
    config_path = path.parent / "genai_config.json"
    if not config_path.is_file():
        return False
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError):
        return False
    decoder_file = config.get("model", {}).get("decoder", {}).get("filename")
    if decoder_file is not None and decoder_file != path.name:
        return False
    return bool(config.get("search", {}).get("past_present_share_buffer", False))


def external_tensors(model: ir.Model) -> list[ir.ExternalTensor]:
    tensors = []
    graphs = [model.graph, *(sub for sub in model.graph.subgraphs())]
    for graph in graphs:
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                tensors.append(value.const_value)
    return tensors


def _check_external_paths(model: ir.Model, folder: pathlib.Path) -> None:
    root = folder.resolve()
    for tensor in external_tensors(model):
        location = pathlib.Path(os.fspath(tensor.location))
        resolved = (root / location).resolve()
        if location.is_absolute() or not resolved.is_relative_to(root):
            raise GqaDecomposeError(
                f"initializer '{tensor.name}' points at external data '{location}', "
                f"outside the model's folder {root}; refusing to follow it"
            )
        if not resolved.is_file():
            raise GqaDecomposeError(
                f"initializer '{tensor.name}' points at external data '{location}', which does not exist"
            )


_SOURCE_FILES = "gqa_decompose.source_files"  # the files load_model read the model from


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load a model without reading its external weights.

    Raises:
        GqaDecomposeError: the file is missing, is not an ONNX model, or refers
            to external data outside its folder.
    """
    model_path = pathlib.Path(path).absolute()
    if not model_path.is_file():
        raise GqaDecomposeError(f"no such model file: {model_path}")
    try:
        model = ir.load(model_path)
    except Exception as error:  # protobuf raises several unrelated types
        raise GqaDecomposeError(
            f"cannot read {model_path} as an ONNX model: {type(error).__name__}: {error}".splitlines()[0]
        ) from error
    _check_external_paths(model, model_path.parent)
    model.meta[_SOURCE_FILES] = frozenset(
        {model_path.resolve(), *(pathlib.Path(tensor.path).resolve() for tensor in external_tensors(model))}
    )
    _load_small_external_tensors(model)
    return model


# onnx-ir's shape inference keeps initializers up to 1000 bytes in the proto it hands to
# ONNX's C++ inference, which cannot read external data: an external shape or axes
# constant (every tensor of a model saved with size_threshold=0, as onnxruntime-genai's
# builder does) makes inference fail and leaves the GQA query untyped.
_SMALL_TENSOR_BYTES = 1024


def _load_small_external_tensors(model: ir.Model) -> None:
    """Read external constants of at most 1 KiB into memory; weights stay on disk."""
    for graph in [model.graph, *model.graph.subgraphs()]:
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor) and tensor.nbytes <= _SMALL_TENSOR_BYTES:
                (value.const_value,) = ir.external_data.convert_tensors_from_external([tensor])


def check_output_path(
    model: ir.Model, path: str | os.PathLike, *, external_data: bool, reuse_input_data: bool = False
) -> None:
    """Refuse an output that would replace a file the model was loaded from.

    ``save_model`` runs this itself; callers run it right after loading too, so
    a bad path fails before any rewrite or verification work.
    """
    target = pathlib.Path(path).absolute()
    sources = model.meta.get(_SOURCE_FILES, frozenset())
    if target.resolve() in sources:
        raise GqaDecomposeError(
            f"the output path is the input model's own file {target}; "
            "a file of the input model is never overwritten"
        )
    if reuse_input_data:
        for tensor in external_tensors(model):
            if pathlib.Path(tensor.base_dir).resolve() != target.parent.resolve():
                raise GqaDecomposeError(
                    "reusing the input's external data needs the output in the input's folder "
                    f"({pathlib.Path(tensor.base_dir).resolve()})"
                )
    elif external_data and (target.parent / f"{target.name}.data").resolve() in sources:
        raise GqaDecomposeError(
            f"writing {target} would replace {target}.data, a file of the input model; "
            "choose another output path"
        )


def save_model(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    external_data: bool,
    reuse_input_data: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> list[pathlib.Path]:
    """Write ``model`` to ``path`` atomically; returns the files written.

    With ``external_data``, weights go to ``<name>.data`` beside the model,
    streamed tensor by tensor from the input's data file. With
    ``reuse_input_data`` the output instead refers to the input's own data
    file (no weight is copied); the output must then be in the input's folder.
    """
    target = pathlib.Path(path).absolute()
    check_output_path(model, target, external_data=external_data, reuse_input_data=reuse_input_data)
    if reuse_input_data:
        external_data = False
    data_name = f"{target.name}.data" if external_data else None
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        callback = None
        if progress is not None:

            def callback(tensor, info) -> None:  # noqa: ARG001 - onnx-ir's signature
                progress(info.index + 1, info.total)

        ir.save(model, staging / target.name, external_data=data_name, callback=callback)
        written = []
        if data_name is not None and (staging / data_name).exists():
            os.replace(staging / data_name, target.parent / data_name)
            written.append(target.parent / data_name)
        os.replace(staging / target.name, target)
        written.insert(0, target)
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)
