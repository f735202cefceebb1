"""Exit codes and verification modes: what the CLI and the report share, importable without onnx
(``gqa-decompose --help`` imports nothing heavier)."""

__all__ = ["EXIT_BAD_INPUT", "EXIT_FAILED", "EXIT_OK", "VERIFY_MODES"]

VERIFY_MODES = ("none", "nodes", "model", "all")
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
