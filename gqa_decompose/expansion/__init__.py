"""Spec -> standard-op subgraph, one module per concern."""

from gqa_decompose.expansion.builder import OpBuilder
from gqa_decompose.expansion.gqa import ExpandedNode, expand_gqa
from gqa_decompose.expansion.sequence import SharedSubgraphs

__all__ = ["ExpandedNode", "OpBuilder", "SharedSubgraphs", "expand_gqa"]
