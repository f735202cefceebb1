"""Print the refusal table of docs/refusals.md: each refusal, where ORT CPU rejects the node, and ORT's message.

Builds every case of ``tests/refusal_cases.py``, asks ``gqa_decompose`` and ONNX Runtime
(load, then one decode step on inputs the declared shapes admit) about it::

    python scripts/refusal_table.py > /tmp/table.md
"""

from __future__ import annotations

import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from refusal_cases import CASES, ort_message  # noqa: E402

import gqa_decompose  # noqa: E402


def _ort_text(message: str) -> tuple[str, str]:
    """(when ORT rejects it, the message without ORT's prefix, source location and node name)."""
    when = "at run time" if "while running" in message else "at load"
    text = message.split("Status Message: ", 1)[-1]
    if ") , Error " in text:  # a schema check: the node's signature, then the error
        text = text.rsplit(") , Error ", 1)[-1]
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : (This is an invalid model. )?", "", text)
    text = re.sub(r"^(Exception during initialization: )?/?\S+:\d+ [^)]*\) ", "", text)
    text = re.sub(r"^\S+\.(cc|h):\d+ \w+ ", "", text)
    return when, text[:160] + ("…" if len(text) > 160 else "")


def main() -> None:
    print("| case | our refusal | ORT CPU 1.31 | ORT's message |")
    print("|---|---|---|---|")
    for name, case in CASES.items():
        model = case.build()
        try:
            gqa_decompose.decompose(model)
            ours = "(accepted)"
        except gqa_decompose.GqaDecomposeError as error:
            ours = error.reason if hasattr(error, "reason") else str(error)
        message = ort_message(model)
        when, text = ("runs it", "") if message is None else _ort_text(message)
        cell = lambda s: s.replace("|", "\\|")  # noqa: E731
        print(f"| {name} | {cell(ours)} | rejects {when} | `{cell(text)}` |")


if __name__ == "__main__":
    main()
