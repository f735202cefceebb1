"""Runs in the LiteRT Python (onnx2tf needs Python >= 3.12): converts an ONNX model, or runs a .tflite.

Not imported by gqa_decompose: :mod:`gqa_decompose.runtime_litert` runs it as a script::

    python litert_worker.py versions
    python litert_worker.py convert model.onnx out_folder      # writes out_folder/model_float{32,16}.tflite
    python litert_worker.py run model.tflite feeds.npz outputs.npz

Errors go to stderr, the exit code is 1.
"""

import pathlib
import sys


def versions() -> str:
    from importlib import metadata

    return f"onnx2tf {metadata.version('onnx2tf')}, ai-edge-litert {metadata.version('ai-edge-litert')}"


def convert(onnx_path: str, folder: str) -> None:
    import onnx
    import onnx2tf

    model = onnx.load(onnx_path)
    # onnx2tf turns 4-D inputs NCHW -> NHWC by default: the caches must keep ONNX's layout.
    names = [value.name for value in model.graph.input]
    onnx2tf.convert(
        input_onnx_file_path=onnx_path,
        output_folder_path=folder,
        keep_shape_absolutely_input_names=names or None,
        non_verbose=True,
    )


def run(tflite_path: str, feeds_path: str, outputs_path: str) -> None:
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=tflite_path, num_threads=1)
    runner = interpreter.get_signature_runner()
    with np.load(feeds_path) as feeds:
        outputs = runner(**{name: feeds[name] for name in feeds.files})
    np.savez(outputs_path, **outputs)


def main(argv: list[str]) -> int:
    command, args = argv[0], argv[1:]
    if command == "versions":
        print(versions())
    elif command == "convert":
        convert(*args)
        if not any(pathlib.Path(args[1]).glob("*_float32.tflite")):
            sys.exit("onnx2tf wrote no float32 .tflite")
    elif command == "run":
        run(*args)
    else:
        sys.exit(f"unknown command {command}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
