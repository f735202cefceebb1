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

__all__ = [
    "check_output_folder",
    "check_output_path",
    "default_output_path",
    "genai_shares_kv_buffer",
    "external_tensors",
    "load_model",
    "read_genai_config",
    "save_model",
    "shares_kv_buffer",
]


def default_output_path(model_path: str | os.PathLike) -> pathlib.Path:
    """``<stem>.decomposed.onnx`` beside the model.

    Raises:
        GqaDecomposeError: the path names no file (``.``, ``/``).
    """
    path = pathlib.Path(model_path)
    if not path.name or path.name == "..":
        raise GqaDecomposeError(f"{path} names a folder, not a model file")
    return path.with_name(f"{path.stem}.decomposed.onnx")


def output_file(model_path: str | os.PathLike, output: str | os.PathLike | None) -> pathlib.Path:
    """Where the rewrite of ``model_path`` goes, absolute: ``output``; ``<stem>.decomposed.onnx`` inside it
    when it names a folder (existing, or ending in a path separator); by default beside the model."""
    default = default_output_path(model_path)
    if not output:
        return default.absolute()
    path = pathlib.Path(output)
    if os.fspath(output).endswith(("/", "\\")) or path.is_dir():
        return (path / default.name).absolute()
    return path.absolute()


def read_genai_config(model_path: str | os.PathLike | None) -> dict:
    """onnxruntime-genai's ``genai_config.json`` beside ``model_path`` when it describes that file; else {}."""
    if model_path is None:
        return {}
    path = pathlib.Path(model_path).absolute()
    try:
        config = json.loads((path.parent / "genai_config.json").read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(config, dict):
        return {}
    decoder_file = config.get("model", {}).get("decoder", {}).get("filename")
    if decoder_file is not None and decoder_file != path.name:
        return {}
    return config


def shares_kv_buffer(config: dict) -> bool:
    """True when a genai config runs the model with ``past_present_share_buffer`` (a max-length past)."""
    return bool(config.get("search", {}).get("past_present_share_buffer", False))


def genai_shares_kv_buffer(model_path: str | os.PathLike) -> bool:
    """True when an onnxruntime-genai ``genai_config.json`` beside the model runs it with
    ``past_present_share_buffer``: past is then always a max-length (static) buffer."""
    return shares_kv_buffer(read_genai_config(model_path))


def external_tensors(model: ir.Model) -> list[ir.ExternalTensor]:
    tensors = []
    graphs = [model.graph, *(sub for sub in model.graph.subgraphs())]
    for graph in graphs:
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                tensors.append(value.const_value)
    return tensors


def _check_external_paths(model: ir.Model, folder: pathlib.Path) -> None:
    """Every external tensor lies inside the model's folder, within its data file's bytes."""
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
        offset = tensor.offset or 0
        length = tensor.length if tensor.length is not None else tensor.nbytes
        if length != tensor.nbytes:
            raise GqaDecomposeError(
                f"initializer '{tensor.name}' declares {length} bytes of external data "
                f"but its type and shape need {tensor.nbytes}"
            )
        size = resolved.stat().st_size
        if offset < 0 or offset + length > size:
            raise GqaDecomposeError(
                f"initializer '{tensor.name}' needs bytes {offset}..{offset + length} of external data "
                f"'{location}', which holds {size} bytes (truncated?)"
            )


_PROTOBUF_LIMIT = 2**31  # bytes: protobuf's hard limit on a serialized message
_SOURCE_FILES = "gqa_decompose.source_files"  # the files load_model read the model from


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load a model without reading its external weights.

    Raises:
        GqaDecomposeError: the file is missing, is not an ONNX model, or refers
            to external data outside its folder.
    """
    model_path = pathlib.Path(path).absolute()
    if model_path.is_dir():
        raise GqaDecomposeError(f"{model_path} is a folder, not a model file")
    if not model_path.is_file():
        raise GqaDecomposeError(f"no such model file: {model_path}")
    size = model_path.stat().st_size
    if size >= _PROTOBUF_LIMIT:
        # protobuf cannot parse a message of 2 GiB or more; do not read it into memory to find out.
        raise GqaDecomposeError(
            f"{model_path} is {size / 2**30:.1f} GiB: a protobuf file of 2 GiB or more cannot be "
            "an ONNX model (store the weights as external data)"
        )
    try:
        model = ir.load(model_path)
    except Exception as error:  # protobuf raises several unrelated types
        raise GqaDecomposeError(
            f"cannot read {model_path} as an ONNX model: {type(error).__name__}: {error}".splitlines()[0]
        ) from error
    if model.ir_version == 0:  # any bytes that parse as a protobuf, an empty file among them
        raise GqaDecomposeError(f"{model_path} is not an ONNX model (no ir_version; {size} bytes)")
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
            f"the output path is the input model's own file {target}; a file of the input model is never overwritten"
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
            f"writing {target} would replace {target}.data, a file of the input model; choose another output path"
        )


def check_output_folder(path: str | os.PathLike, create_missing: bool = True) -> None:
    """Refuse an output whose folder cannot be written (checked before any work is done).

    A missing folder is fine when ``create_missing`` (``save_model`` creates it) as
    long as its nearest existing ancestor is a writable folder; otherwise it is
    refused. Writability is probed by creating and removing a temporary folder,
    since permission bits do not bind root.
    """
    folder = pathlib.Path(path).absolute().parent
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise GqaDecomposeError(f"cannot write the output into {folder}: {existing} is not a folder")
    if not create_missing and existing != folder:
        raise GqaDecomposeError(f"the output folder {folder} does not exist (end -o with / to have it created)")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".gqa-decompose-probe.", dir=existing))
    except OSError as error:
        raise GqaDecomposeError(f"cannot write the output into {folder}: {error.strerror or error}") from None


_STAGING_SUFFIX = ".partial"


def _staging_prefix(target: pathlib.Path) -> str:
    return f".{target.name}."


def _remove_stale_staging(target: pathlib.Path) -> None:
    """Remove staging folders that a killed run for the same target left behind.

    A staging folder is named ``.<name>.<pid>.<random>.partial``; it is stale when
    no process with that pid is alive (a live run's folder is left alone).
    """
    prefix = _staging_prefix(target)
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(_STAGING_SUFFIX) and entry.is_dir()):
            continue
        pid_text = name[len(prefix) :].split(".", 1)[0]
        if not pid_text.isdigit() or _process_alive(int(pid_text)):
            continue
        shutil.rmtree(entry, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


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
    created = [folder for folder in (target.parent, *target.parent.parents) if not folder.exists()]
    staging = _make_staging_folder(target, created)
    saved = False
    try:
        ir.save(model, staging / target.name, external_data=data_name, callback=_save_callback(progress))
        written = []
        if data_name is not None and (staging / data_name).exists():
            os.replace(staging / data_name, target.parent / data_name)
            written.append(target.parent / data_name)
        os.replace(staging / target.name, target)
        written.insert(0, target)
        saved = True
        return written
    except OSError as error:
        raise GqaDecomposeError(f"cannot write {target}: {error.strerror or error}") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if not saved:
            _remove_folders(created)


def _make_staging_folder(target: pathlib.Path, created: list[pathlib.Path]) -> pathlib.Path:
    """A fresh staging folder beside ``target``; on failure, removes the ``created`` folders and raises."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_staging(target)
        return pathlib.Path(
            tempfile.mkdtemp(
                prefix=f"{_staging_prefix(target)}{os.getpid()}.", suffix=_STAGING_SUFFIX, dir=target.parent
            )
        )
    except OSError as error:
        _remove_folders(created)
        raise GqaDecomposeError(f"cannot write the output into {target.parent}: {error.strerror or error}") from None


def _save_callback(progress: Callable[[int, int], None] | None) -> Callable | None:
    """ir.save's per-tensor callback reporting (tensors written, total) to ``progress``."""
    if progress is None:
        return None

    def callback(tensor, info) -> None:  # noqa: ARG001 - onnx-ir's signature
        progress(info.index + 1, info.total)

    return callback


def _remove_folders(folders: list[pathlib.Path]) -> None:
    """Remove the folders save_model created (deepest first), if they are still empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return
