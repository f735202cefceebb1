"""The one exception type users of gqa-decompose see."""

from __future__ import annotations

__all__ = ["GqaDecomposeError"]


class GqaDecomposeError(Exception):
    """A model or node that gqa-decompose cannot (or will not) rewrite.

    ``node_name`` names the offending node when there is one; ``reason`` is a
    one-line explanation fit for a terminal. ``str(error)`` combines both.
    """

    def __init__(self, reason: str, node_name: str | None = None) -> None:
        self.reason = reason
        self.node_name = node_name
        message = f"node '{node_name}': {reason}" if node_name else reason
        super().__init__(message)
