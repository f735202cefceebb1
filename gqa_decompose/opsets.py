"""The default-domain opsets the rewrite depends on, in one place."""

__all__ = ["ATTENTION_MIN_OPSET", "MIN_OPSET", "MIN_RAISABLE_OPSET", "TENSOR_SCATTER_MIN_OPSET"]

# Unsqueeze/Split/Squeeze with axes as inputs and Softmax over one axis.
MIN_OPSET = 13
# Attention, RotaryEmbedding and RMSNormalization exist from opset 23.
ATTENTION_MIN_OPSET = 23
# TensorScatter (the KV cache write of the attention target).
TENSOR_SCATTER_MIN_OPSET = 24
# Below 20, too many ops changed meaning (Reduce*-18, Pad-18/19) for an opset raise to 23 to be checked.
MIN_RAISABLE_OPSET = 20
