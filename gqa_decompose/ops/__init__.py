"""The registry of contrib-op decomposers: ``(domain, op_type) -> Decomposer``.

A decomposer module registers itself with :func:`register` when imported; :func:`decomposers`
and :func:`lookup` import every module of this package first, so adding an op is adding a module:
the pipeline, the gate, verification and the report look ops up here and do not change.
"""

from __future__ import annotations

import importlib
import pkgutil

from gqa_decompose.ops.base import Decomposer, OpContext, Tolerance

__all__ = ["Decomposer", "OpContext", "Tolerance", "REGISTRY", "decomposers", "register", "lookup", "oracle_domain"]

REGISTRY: dict[tuple[str, str], Decomposer] = {}
_loaded = False


def register(decomposer: Decomposer) -> Decomposer:
    """Add ``decomposer`` under its ``(domain, op_type)``; returns it (usable as a decorator on instances)."""
    REGISTRY[(decomposer.domain, decomposer.op_type)] = decomposer
    return decomposer


def _load() -> None:
    """Import every decomposer module of this package (modules starting with ``_`` and ``base`` are helpers)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_") and module.name != "base":
            importlib.import_module(f"{__name__}.{module.name}")


def decomposers() -> dict[tuple[str, str], Decomposer]:
    """Every registered decomposer by ``(domain, op_type)``."""
    _load()
    return REGISTRY


def lookup(domain: str, op_type: str) -> Decomposer | None:
    """The decomposer of ``domain::op_type`` (``""`` and ``"ai.onnx"`` are one domain), or None."""
    _load()
    domain = "" if domain == "ai.onnx" else domain
    return REGISTRY.get((domain, op_type))


def oracle_domain(decomposer: Decomposer) -> str:
    """The domain ONNX Runtime runs the op under for verification (optional ``oracle_domain`` attribute)."""
    return getattr(decomposer, "oracle_domain", decomposer.domain)
