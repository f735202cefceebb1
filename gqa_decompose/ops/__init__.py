"""The registry of contrib-op decomposers: ``(domain, op_type) -> Decomposer``.

A decomposer module registers itself with :func:`register`; the pipeline, the gate,
verification and the report look ops up here and do not change when an op is added.
"""

from __future__ import annotations

from gqa_decompose.ops.base import Decomposer, OpContext, Tolerance

__all__ = ["Decomposer", "OpContext", "Tolerance", "REGISTRY", "register", "lookup"]

REGISTRY: dict[tuple[str, str], Decomposer] = {}


def register(decomposer: Decomposer) -> Decomposer:
    """Add ``decomposer`` under its ``(domain, op_type)``; returns it (usable as a decorator on instances)."""
    REGISTRY[(decomposer.domain, decomposer.op_type)] = decomposer
    return decomposer


def lookup(domain: str, op_type: str) -> Decomposer | None:
    """The decomposer of ``domain::op_type`` (``""`` and ``"ai.onnx"`` are one domain), or None."""
    domain = "" if domain == "ai.onnx" else domain
    return REGISTRY.get((domain, op_type))

# Decomposer modules register themselves on import (after REGISTRY and register exist).
from gqa_decompose.ops import (  # noqa: F401
    attention,
    gather_block_quantized,
    matmul_nbits,
    moe,
    multi_head_attention,
    qmoe,
)
