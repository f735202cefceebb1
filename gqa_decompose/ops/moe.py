"""com.microsoft.MoE -> Softmax + TopK routing and a dense masked sum over all experts.

Dimension legend: T tokens (every axis of the input but the last), H hidden, E experts, k chosen per token,
I inter size, F fc1's output (2*I for SwiGLU, else I).

ORT CPU's semantics (``moe_cpu.cc``, checked against ORT 1.31): fc1 weights [E, F, H], fc2 [E, H, I] (both
applied as ``x @ W^T``), biases [E, F] and [E, H]; routing = softmax over all E in fp32, the k largest
(ties: the higher expert index first, as ORT's ``partial_sort`` on (prob, index) pairs gives),
divided by their sum when ``normalize_routing_weights=1``; SwiGLU interleaved (``swiglu_fusion=1``):
``gate = min(fc1[2i], limit); linear = clip(fc1[2i+1], -limit, limit);
act = gate * sigmoid(alpha * gate) * (linear + beta)``::

    router_TE -> Cast fp32 -> Softmax -> reverse E -> TopK(k) -> (normalize) -> ScatterElements -> routing_ET1
    x_TH -> Expand to E -> MatMul(fc1_EHF) + bias -> activation -> MatMul(fc2_EIH) + bias -> h_ETH
    out_TH = ReduceSum_E(Where(routing_ET1 > 0, h_ETH * routing_ET1, 0))

The form is the dense masked sum: every expert runs on every token, so it costs E/k times the FLOPs of
ORT's sparse kernel (gpt-oss-20b: 32/4 = 8x) and holds E*T*F activations; the weights are re-laid
out once at rewrite time ([E, H, F], [E, I, H]; same bytes) so no Transpose runs. It was chosen over a
gather of the chosen experts' weights because that gather copies T*k*F*H weights per run (prefill blows
up); the masked Where keeps an unchosen expert's inf/NaN out of the sum.

fp16: the GEMMs run in fp16 and each stage rounds to fp16 as ORT's kernel does (bias added in fp32,
activation in fp32); routing and the weighted sum are fp32; one final Cast.

Refused: swiglu_fusion other than 1 (ORT CPU refuses it), fc3 weights (ORT CPU: not implemented),
use_sparse_mixer=1 (ORT CPU ignores it, so no expansion is both right and equal to ORT).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from gqa_decompose.errors import GqaDecomposeError
from gqa_decompose.expansion.builder import OpBuilder
from gqa_decompose.ops import register
from gqa_decompose.ops._blockwise import add_initializer, lazy_tensor
from gqa_decompose.ops._common import float_attribute, input_at, int_attribute
from gqa_decompose.ops.base import OpContext, Tolerance

__all__ = ["MoE", "MoESpec", "RoutingSpec", "expert_sum", "route"]

INPUT, ROUTER, FC1, FC1_BIAS, FC2, FC2_BIAS, FC3, FC3_BIAS = range(8)
_ACTIVATIONS = ("relu", "gelu", "silu", "identity", "swiglu")


@dataclasses.dataclass(frozen=True)
class RoutingSpec:
    """What MoE and QMoE share: routing and the expert MLP's activation."""

    k: int
    experts: int
    hidden: int
    inter: int
    activation: str
    normalize: bool
    alpha: float
    beta: float
    limit: float
    dtype: ir.DataType


@dataclasses.dataclass(frozen=True)
class MoESpec:
    routing: RoutingSpec
    has_fc1_bias: bool
    has_fc2_bias: bool


def parse_routing(node: ir.Node, experts: int, inter: int, fc3_indices: tuple[int, ...]) -> RoutingSpec:
    """The routing/activation contract shared by MoE and QMoE; raises where ORT CPU refuses or diverges."""
    x, router = node.inputs[INPUT], node.inputs[ROUTER]
    if x is None or x.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16) or x.shape is None:
        raise GqaDecomposeError(f"{node.op_type} input must be float or float16 with a known rank", node.name)
    hidden = x.shape[-1]
    if not isinstance(hidden, int):
        raise GqaDecomposeError(f"{node.op_type} needs a static hidden size", node.name)
    attribute = node.attributes.get("activation_type")
    activation = attribute.as_string() if attribute is not None else "relu"
    if activation not in _ACTIVATIONS:
        raise GqaDecomposeError(
            f"{node.op_type} activation_type={activation!r}: ORT supports {_ACTIVATIONS}", node.name
        )
    if activation == "swiglu" and int_attribute(node, "swiglu_fusion", 0) != 1:
        raise GqaDecomposeError(f"{node.op_type}: ORT CPU runs SwiGLU only interleaved (swiglu_fusion=1)", node.name)
    if any(input_at(node, i) is not None for i in fc3_indices):
        raise GqaDecomposeError(f"{node.op_type} with fc3 weights: ORT CPU does not implement them", node.name)
    if int_attribute(node, "use_sparse_mixer", 0):
        raise GqaDecomposeError(f"{node.op_type} use_sparse_mixer=1: ORT CPU ignores it (plain top-k)", node.name)
    k = int_attribute(node, "k", 1)
    if not 1 <= k <= experts:
        raise GqaDecomposeError(f"{node.op_type} k={k} with {experts} experts", node.name)
    if router is None or router.dtype != x.dtype:
        raise GqaDecomposeError(f"{node.op_type} router_probs must have the input's type", node.name)
    return RoutingSpec(
        k=k,
        experts=experts,
        hidden=hidden,
        inter=inter,
        activation=activation,
        normalize=bool(int_attribute(node, "normalize_routing_weights", 0)),
        alpha=float_attribute(node, "activation_alpha", 1.0),
        beta=float_attribute(node, "activation_beta", 0.0),
        limit=float_attribute(node, "swiglu_limit", float("inf")),
        dtype=x.dtype,
    )


class MoE:
    """The decomposer of com.microsoft.MoE."""

    domain = "com.microsoft"
    op_type = "MoE"

    def parse(self, node: ir.Node, context: OpContext) -> MoESpec:
        """Validate as ORT CPU does; the expert count and sizes come from the weights' static shapes."""
        fc1, fc2 = node.inputs[FC1], node.inputs[FC2]
        if fc1 is None or fc2 is None or fc1.shape is None or fc2.shape is None or not fc2.shape.is_static():
            raise GqaDecomposeError("MoE needs fc1 and fc2 weights with static shapes", node.name)
        experts, hidden_out, inter = (int(d) for d in fc2.shape)
        routing = parse_routing(node, experts, inter, (FC3, FC3_BIAS))
        if hidden_out != routing.hidden or tuple(fc1.shape) != (experts, _fc1_out(routing), routing.hidden):
            raise GqaDecomposeError("MoE weights must be fc1 [E, F, H] and fc2 [E, H, I]", node.name)
        return MoESpec(routing, input_at(node, FC1_BIAS) is not None, input_at(node, FC2_BIAS) is not None)

    def expand(self, op: OpBuilder, node: ir.Node, spec: MoESpec) -> list[ir.Value]:
        """Route, run every expert, sum the chosen ones weighted."""
        routing = spec.routing
        fc1_EHF = _transposed(op, node, node.inputs[FC1], "fc1_EHF")
        fc2_EIH = _transposed(op, node, node.inputs[FC2], "fc2_EIH")
        biases = [
            node.inputs[FC1_BIAS] if spec.has_fc1_bias else None,
            node.inputs[FC2_BIAS] if spec.has_fc2_bias else None,
        ]
        return [expert_sum(op, node.inputs[INPUT], node.inputs[ROUTER], routing, fc1_EHF, fc2_EIH, *biases)]

    def sample_feeds(self, node: ir.Node, spec: MoESpec, rng: np.random.Generator):
        """Input and router logits of the node's declared shapes (symbolic dims: 3); tied logits at times."""
        x, router = node.inputs[INPUT], node.inputs[ROUTER]
        shape = [d if isinstance(d, int) else 3 for d in x.shape]
        tokens = int(np.prod(shape[:-1]))
        logits = rng.standard_normal((tokens, spec.routing.experts)).astype(np.float32)
        logits[0, :] = logits[0, 0]  # all experts tied: the tie order decides which k run
        feeds = {x.name: rng.standard_normal(shape).astype(spec.routing.dtype.numpy())}
        feeds[router.name] = logits.astype(spec.routing.dtype.numpy())
        return feeds

    def tolerance(self, spec: MoESpec, dtype: ir.DataType) -> Tolerance:
        """fp32: GEMM and summation order; fp16: a rounding at each of ORT's stages may land one ulp apart."""
        if dtype == ir.DataType.FLOAT16:
            return Tolerance(atol=5e-3, rtol=5e-3)
        return Tolerance(atol=1e-4, rtol=1e-4)


def _fc1_out(routing: RoutingSpec) -> int:
    return 2 * routing.inter if routing.activation == "swiglu" else routing.inter


def _transposed(op: OpBuilder, node: ir.Node, weight: ir.Value, label: str) -> ir.Value:
    """[E, A, B] -> [E, B, A]: a re-laid-out initializer when constant (same bytes), else a Transpose."""
    tensor = ir.convenience.get_const_tensor(weight)
    if tensor is None:
        return op.op("Transpose", weight, perm=[0, 2, 1])
    e, a, b = (int(d) for d in weight.shape)
    name = f"{node.name or node.op_type}/{label}"
    relaid = lazy_tensor(lambda: np.ascontiguousarray(tensor.numpy().transpose(0, 2, 1)), tensor.dtype, (e, b, a), name)
    return add_initializer(op, node, name, relaid)


def route(op: OpBuilder, router: ir.Value, routing: RoutingSpec) -> ir.Value:
    """fp32 [E, T, 1]: each token's weight per expert, 0 where not chosen."""
    E = routing.experts
    logits_TE = op.op("Reshape", op.cast(router, ir.DataType.FLOAT), op.ints([-1, E]))
    probs_TE = op.op("Softmax", logits_TE, axis=-1)
    # Reversed experts: TopK keeps the lower index among ties, which is then the higher original index.
    reversed_TE = op.op("Slice", probs_TE, op.ints([E - 1]), op.ints([-E - 1]), op.ints([1]), op.ints([-1]))
    top_Tk, top_rev_Tk = op.op_multi("TopK", reversed_TE, op.ints([routing.k]), num_outputs=2, axis=-1)
    top_index_Tk = op.op("Sub", op.int_scalar(E - 1), top_rev_Tk)
    if routing.normalize:
        top_Tk = op.op("Div", top_Tk, op.op("ReduceSum", top_Tk, op.ints([-1]), keepdims=1))
    zeros_TE = op.op("ConstantOfShape", op.op("Shape", probs_TE), value=ir.tensor(np.zeros(1, np.float32)))
    routing_TE = op.op("ScatterElements", zeros_TE, top_index_Tk, top_Tk, axis=1)
    return op.unsqueeze(op.op("Transpose", routing_TE, perm=[1, 0]), [2])


def activation(op: OpBuilder, h_ETF: ir.Value, routing: RoutingSpec) -> ir.Value:
    """fp32 [E, T, F] -> [E, T, I], ORT's formulas."""
    kind = routing.activation
    if kind == "relu":
        return op.op("Relu", h_ETF)
    if kind == "identity":
        return h_ETF
    if kind == "silu":
        return op.op("Mul", h_ETF, op.op("Sigmoid", h_ETF))
    if kind == "gelu":  # ORT's tanh form: 0.5 x (1 + tanh(0.7978845608 (x + 0.044715 x^3)))
        cube = op.op("Mul", op.op("Mul", h_ETF, h_ETF), h_ETF)
        inner = op.op(
            "Mul", op.op("Add", h_ETF, op.op("Mul", cube, op.float_scalar(0.044715))), op.float_scalar(0.7978845608)
        )
        return op.op(
            "Mul", op.op("Mul", h_ETF, op.float_scalar(0.5)), op.op("Add", op.op("Tanh", inner), op.float_scalar(1.0))
        )
    F = 2 * routing.inter
    gate = op.op("Slice", h_ETF, op.ints([0]), op.ints([F]), op.ints([2]), op.ints([2]))
    linear = op.op("Slice", h_ETF, op.ints([1]), op.ints([F]), op.ints([2]), op.ints([2]))
    if routing.limit != float("inf"):
        gate = op.op("Min", gate, op.float_scalar(routing.limit))
        linear = op.op("Clip", linear, op.float_scalar(-routing.limit), op.float_scalar(routing.limit))
    swish = op.op("Mul", gate, op.op("Sigmoid", op.op("Mul", gate, op.float_scalar(routing.alpha))))
    return op.op("Mul", swish, op.op("Add", linear, op.float_scalar(routing.beta)))


def _linear(op: OpBuilder, x: ir.Value, weight: ir.Value, bias: ir.Value | None, dtype: ir.DataType) -> ir.Value:
    """x @ weight (+ bias [E, N] broadcast over tokens), rounded to ``dtype`` after the GEMM and after the bias."""
    y = op.op("MatMul", x, weight)
    if bias is None:
        return y
    if dtype == ir.DataType.FLOAT:
        return op.op("Add", y, op.unsqueeze(bias, [1]))
    summed = op.op("Add", op.cast(y, ir.DataType.FLOAT), op.cast(op.unsqueeze(bias, [1]), ir.DataType.FLOAT))
    return op.cast(summed, dtype)


def expert_sum(
    op: OpBuilder,
    x: ir.Value,
    router: ir.Value,
    routing: RoutingSpec,
    fc1_EHF: ir.Value,
    fc2_EIH: ir.Value,
    fc1_bias: ir.Value | None,
    fc2_bias: ir.Value | None,
) -> ir.Value:
    """The dense masked sum over experts; weights already [E, H, F] / [E, I, H] in the input's type."""
    dtype = routing.dtype
    routing_ET1 = route(op, router, routing)
    x_1TH = op.op("Reshape", x, op.ints([1, -1, routing.hidden]))
    # Tokens repeated per expert: OpenVINO 2026.4 turns a MatMul of [1, T, H] by constant [E, H, F] into a
    # FullyConnected that refuses the broadcast ("Can not clone with new dims"). E*T*H values, half of h1's.
    x_ETH = op.op("Expand", x_1TH, op.ints([routing.experts, 1, 1]))
    h1_ETF = _linear(op, x_ETH, fc1_EHF, fc1_bias, dtype)
    act_ETI = activation(op, op.cast(h1_ETF, ir.DataType.FLOAT) if dtype != ir.DataType.FLOAT else h1_ETF, routing)
    if dtype != ir.DataType.FLOAT:
        act_ETI = op.cast(act_ETI, dtype)
    h2_ETH = _linear(op, act_ETI, fc2_EIH, fc2_bias, dtype)
    if dtype != ir.DataType.FLOAT:
        h2_ETH = op.cast(h2_ETH, ir.DataType.FLOAT)
    chosen_ET1 = op.op("Greater", routing_ET1, op.float_scalar(0.0))
    weighted_ETH = op.op("Where", chosen_ET1, op.op("Mul", h2_ETH, routing_ET1), op.float_scalar(0.0))
    out_TH = op.op("ReduceSum", weighted_ETH, op.ints([0]), keepdims=0)
    if dtype != ir.DataType.FLOAT:
        out_TH = op.cast(out_TH, dtype)
    return op.op("Reshape", out_TH, op.op("Shape", x))


MOE = register(MoE())
