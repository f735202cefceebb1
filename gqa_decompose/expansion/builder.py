"""A thin op builder over ``onnx_ir.tape.Tape`` that names what it makes.

Every node and value an expansion creates is named ``<prefix>/<Op>_<k>`` so a
reader of the rewritten model can tell which GQA node each op came from. Ops
are emitted without an explicit version: they take the opset of the graph
they land in, which keeps the model's own default-domain opset.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir
from onnx_ir import tape as ir_tape

from gqa_decompose.expansion import folding

__all__ = ["OpBuilder"]


class OpBuilder:
    """Creates nodes for one naming scope (one GQA node, or the shared scope)."""

    def __init__(self, prefix: str, opset: int | None = None) -> None:
        self.prefix = prefix
        # The default-domain opset the nodes land in, for ops whose form changed
        # across opsets; None when unknown (only forms valid in every opset >= 13).
        self.opset = opset
        self._tape = ir_tape.Tape()
        self._counter = 0
        self._taken = 0

    def _name(self, node: ir.Node) -> None:
        self._counter += 1
        node.name = f"{self.prefix}/{node.op_type}_{self._counter}"
        for index, output in enumerate(node.outputs):
            suffix = "" if len(node.outputs) == 1 else f"_{index}"
            output.name = f"{node.name}_out{suffix}"

    def op(self, op_type: str, *inputs: ir.Value | None, **attributes) -> ir.Value:
        folded = folding.fold(op_type, list(inputs), attributes) if op_type != "Constant" else None
        if folded is not None:  # shape inference reads constants only: emit the result, not its computation
            op_type, inputs, attributes = "Constant", (), {"value": ir.tensor(folded)}
        value = self._tape.op(op_type, list(inputs), attributes or None)
        self._name(value.producer())
        return value

    def op_multi(self, op_type: str, *inputs: ir.Value | None, num_outputs: int, **attributes) -> Sequence[ir.Value]:
        values = self._tape.op_multi_out(op_type, list(inputs), attributes or None, num_outputs=num_outputs)
        self._name(values[0].producer())
        return values

    def if_else(
        self,
        condition: ir.Value,
        then_branch: Callable[[OpBuilder], Sequence[ir.Value]],
        else_branch: Callable[[OpBuilder], Sequence[ir.Value]],
    ) -> Sequence[ir.Value]:
        """An If node whose branches are built by ``then_branch(op)`` / ``else_branch(op)``.

        Each function gets a builder for its branch graph and returns that
        branch's outputs (the same count); it may read any value of the
        enclosing graphs. ONNX Runtime writes a branch's outputs straight into
        the If's outputs (and into a buffer bound to them), so a branch costs
        no copy, but an outer value passed through a branch is copied: build
        the consumers of large tensors inside the branch instead.
        """
        self._counter += 1
        name = f"{self.prefix}/If_{self._counter}"
        graphs = []
        for label, build in (("then", then_branch), ("else", else_branch)):
            branch = OpBuilder(f"{name}/{label}")
            outputs = list(build(branch))
            made = {output for node in branch._tape.nodes for output in node.outputs}
            outputs = [value if value in made else branch.op("Identity", value) for value in outputs]
            graphs.append(ir.Graph((), outputs, nodes=branch.take_nodes(), name=f"{name}/{label}"))
        if len(graphs[0].outputs) != len(graphs[1].outputs):
            raise ValueError("If branches must have the same number of outputs")
        values = self._tape.op_multi_out(
            "If",
            [condition],
            {"then_branch": graphs[0], "else_branch": graphs[1]},
            num_outputs=len(graphs[0].outputs),
        )
        node = values[0].producer()
        node.name = name
        for index, output in enumerate(values):
            output.name = f"{name}_out_{index}"
            # The branches agree on type; shapes may differ between them.
            output.type = graphs[0].outputs[index].type
        return values

    def take_nodes(self) -> list[ir.Node]:
        """Nodes created since the last call, in creation (topological) order."""
        nodes = list(self._tape.nodes[self._taken :])
        self._taken = len(self._tape.nodes)
        return nodes

    # Constants -----------------------------------------------------------------------------

    def ints(self, values: Sequence[int]) -> ir.Value:
        """A 1-D int64 constant."""
        return self.op("Constant", value=ir.tensor(np.array(values, dtype=np.int64).reshape(-1)))

    def int_scalar(self, value: int) -> ir.Value:
        """A 0-D int64 constant."""
        return self.op("Constant", value=ir.tensor(np.array(value, dtype=np.int64)))

    def float_scalar(self, value: float, dtype: ir.DataType = ir.DataType.FLOAT) -> ir.Value:
        """A 0-D floating-point constant of ``dtype``."""
        return self.op("Constant", value=ir.tensor(value, dtype=dtype))

    # Shape helpers -------------------------------------------------------------------------

    def dim(self, value: ir.Value, axis: int) -> ir.Value:
        """Dimension ``axis`` of ``value`` as a 0-D int64 (a constant when static)."""
        shape = value.shape
        if shape is not None and isinstance(shape[axis], int):
            return self.int_scalar(shape[axis])
        return self.op("Gather", self.op("Shape", value), self.int_scalar(axis), axis=0)

    def with_static_dims(self, resized: ir.Value, source: ir.Value, axis: int) -> ir.Value:
        """``resized`` (``source`` cut or padded along ``axis`` by a computed amount) through a Reshape that states
        ``source``'s static dims on the other axes, 0 (keep the dim) elsewhere; ``resized`` itself when none is.

        ONNX's inference loses every dim through a Pad by computed amounts (and ScatterND, Slice after it), and
        IREE 3.13 mishandles the unknown dims: a bias [1, 1, S, T] it added as one that does not broadcast
        (batch 0's head 0 only), a MatMul of static by unknown batch dims failed to compile. A Reshape is a view.
        """
        shape = source.shape
        if shape is None:
            return resized
        target = [dim if isinstance(dim, int) and i != axis % len(shape) else 0 for i, dim in enumerate(shape)]
        return self.op("Reshape", resized, self.ints(target)) if any(target) else resized

    def unsqueeze(self, value: ir.Value, axes: Sequence[int]) -> ir.Value:
        return self.op("Unsqueeze", value, self.ints(axes))

    def slice(self, value: ir.Value, start, end, axis: int) -> ir.Value:
        """``value[start:end]`` along ``axis``; start/end are ints or 1-D int64 values."""
        starts = start if isinstance(start, ir.Value) else self.ints([start])
        ends = end if isinstance(end, ir.Value) else self.ints([end])
        return self.op("Slice", value, starts, ends, self.ints([axis]))

    def reduce_mean_last_axis(self, value: ir.Value) -> ir.Value:
        """ReduceMean over the last axis, keeping it (axes moved from attribute to input in opset 18)."""
        if self.opset is not None and self.opset >= 18:
            return self.op("ReduceMean", value, self.ints([-1]), keepdims=1)
        return self.op("ReduceMean", value, axes=[-1], keepdims=1)

    def cast(self, value: ir.Value, dtype: ir.DataType) -> ir.Value:
        return self.op("Cast", value, to=dtype)

    def to_vector(self, scalar: ir.Value) -> ir.Value:
        """A 0-D int64 value as a 1-element 1-D value (for Concat into shapes)."""
        return self.op("Reshape", scalar, self.ints([1]))
