"""The Decomposer protocol: what every contrib-op decomposer provides to the pipeline.

A decomposer owns one ``(domain, op_type)``. The pipeline asks it, per node:

1. ``parse(node, context)``: the contract. Validate the node and return a frozen
   spec, or raise :class:`~gqa_decompose.errors.GqaDecomposeError` naming the node
   and the reason (only where ONNX Runtime rejects the node, or no standard-op
   graph can express it).
2. ``expand(op, node, spec)``: the expansion. Emit standard ops with ``op`` (an
   :class:`~gqa_decompose.expansion.builder.OpBuilder` whose ``opset`` is the
   container's default-domain opset) and return one value per node output, in
   order (``None`` for an output the node does not have or nobody reads).
3. ``oracle``: how per-node verification feeds the original node on ONNX Runtime
   CPU and the expansion, and how close they must agree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import onnx_ir as ir

from gqa_decompose.spec import profile_chooses

__all__ = ["Decomposer", "OpContext", "Tolerance"]


@dataclasses.dataclass(frozen=True)
class OpContext:
    """Where a node sits (the graph or function holding it and its default-domain opset) and the runtime
    profile its expansion is for (:data:`~gqa_decompose.spec.RUNTIME_PROFILES`)."""

    opset: int
    container: ir.Graph | ir.Function | None = None
    runtime_profile: str = "portable"

    @property
    def norm_by_primitives(self) -> bool:
        """The profile's choice (webnn, litert): RMS norms from primitives at opset >= 23 too, as neither the
        WebNN EP nor LiteRT has an RMSNormalization kernel."""
        return profile_chooses(self.runtime_profile, "norm_by_primitives")


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """|expected - got| <= atol + rtol * |expected|, elementwise."""

    atol: float
    rtol: float = 0.0


@runtime_checkable
class Decomposer(Protocol):
    """One contrib op's contract, expansion and oracle."""

    domain: str
    op_type: str

    def parse(self, node: ir.Node, context: OpContext) -> Any:
        """The node's frozen spec; raises GqaDecomposeError(reason, node.name) on refusal."""
        ...

    def expand(self, op: Any, node: ir.Node, spec: Any) -> Sequence[ir.Value | None]:
        """Standard-op values replacing ``node.outputs``, one per output (None: not produced)."""
        ...

    def sample_feeds(self, node: ir.Node, spec: Any, rng: np.random.Generator) -> dict[str, np.ndarray] | None:
        """Inputs for per-node verification by input name; None: random by declared type and shape."""
        ...

    def tolerance(self, spec: Any, dtype: ir.DataType) -> Tolerance:
        """How close the expansion's outputs of ``dtype`` must be to ORT CPU's."""
        ...
