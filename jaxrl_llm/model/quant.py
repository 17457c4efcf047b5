"""Int8 weight-only quantization of a frozen base: symmetric, one scale per output channel.

`y = (x @ q) * scale` with `q` int8 `[in, out]` and `scale` `[out]`; the product runs in the
activation dtype. Quantized weights are `QuantizedWeight` variables, a type that no optimizer or
checkpoint filter of this library selects, so the base stays frozen by construction.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrl_llm.model.llama import Embed, Linear, Transformer, _lastdim


class QuantizedWeight(nnx.Variable):
    """Frozen int8 values or their float scales (never trained, never in an optimizer)."""


def quantize_int8(kernel: jax.Array, axis: int = 0) -> tuple[jax.Array, jax.Array]:
    """Symmetric int8 quantization with one scale per channel.

    Args:
      kernel: float array, e.g. `[in, out]`.
      axis: the axis reduced to compute each scale (0 for `[in, out]` kernels: one scale per
        output channel; 1 for `[V, D]` embeddings: one scale per token row).
    Returns:
      `(q int8 same shape, scale float32 with `axis` removed)`, `kernel ≈ q * scale`.
    """
    kernel = kernel.astype(jnp.float32)
    scale = jnp.max(jnp.abs(kernel), axis=axis) / 127.0
    scale = jnp.where(scale == 0, 1.0, scale)  # an all-zero channel quantizes to zeros
    q = jnp.clip(jnp.round(kernel / jnp.expand_dims(scale, axis)), -127, 127).astype(jnp.int8)
    return q, scale


class Int8Linear(nnx.Module):
    """A frozen linear layer with int8 weights: `y = (x @ q) * scale (+ bias)`."""

    def __init__(self, q: jax.Array, scale: jax.Array, bias: jax.Array | None = None):
        self.in_features, self.out_features = q.shape
        self.q = QuantizedWeight(q)
        self.scale = QuantizedWeight(scale)
        self.bias = None if bias is None else QuantizedWeight(bias)

    @classmethod
    def from_linear(cls, linear: Linear) -> "Int8Linear":
        q, scale = quantize_int8(linear.kernel[...], axis=0)
        return cls(q, scale, None if linear.bias is None else linear.bias[...])

    def dequantized_kernel(self) -> jax.Array:
        """`[in, out]` float32 kernel `q * scale`."""
        return self.q[...].astype(jnp.float32) * self.scale[...][None, :]

    def to_linear(self, param_dtype) -> Linear:
        """The float `Linear` this layer approximates (weights `q * scale`)."""
        linear = Linear(self.in_features, self.out_features, use_bias=self.bias is not None,
                        param_dtype=param_dtype, rngs=nnx.Rngs(0))
        linear.kernel[...] = self.dequantized_kernel().astype(param_dtype)
        if self.bias is not None:
            linear.bias[...] = self.bias[...].astype(param_dtype)
        return linear

    def __call__(self, x: jax.Array) -> jax.Array:
        y = (x @ self.q[...].astype(x.dtype)) * _lastdim(self.scale[...].astype(x.dtype), x.ndim)
        return y if self.bias is None else y + _lastdim(self.bias[...].astype(x.dtype), x.ndim)


class Int8Embed(nnx.Module):
    """A frozen int8 token embedding, one scale per token row; `attend` is the tied LM head."""

    def __init__(self, embed: Embed):
        q, scale = quantize_int8(embed.embedding[...], axis=1)
        self.q = QuantizedWeight(q)
        self.scale = QuantizedWeight(scale)

    def to_embed(self, param_dtype) -> Embed:
        """The float `Embed` this table approximates."""
        vocab_size, d_model = self.q.shape
        embed = Embed(vocab_size, d_model, param_dtype=param_dtype, rngs=nnx.Rngs(0))
        embed.embedding[...] = (self.q[...].astype(jnp.float32) * self.scale[...][:, None]
                                ).astype(param_dtype)
        return embed

    def __call__(self, tokens: jax.Array, dtype) -> jax.Array:
        rows = jnp.take(self.q[...], tokens, axis=0).astype(dtype)
        return rows * jnp.take(self.scale[...], tokens, axis=0).astype(dtype)[..., None]

    def attend(self, x: jax.Array) -> jax.Array:
        logits = x @ self.q[...].astype(x.dtype).T
        return logits * _lastdim(self.scale[...].astype(x.dtype), x.ndim)


def quantize_model(model: Transformer, *, embeddings: bool = False) -> Transformer:
    """Replace every `Linear` of `model` (in place) by an `Int8Linear`; returns the model.

    Args:
      model: a float `Transformer` (quantize before attaching LoRA).
      embeddings: also quantize the token embedding (and with it the tied LM head).
    """
    for path, module in list(nnx.iter_modules(model)):
        for name, child in list(vars(module).items()):
            if isinstance(child, Linear):
                setattr(module, name, Int8Linear.from_linear(child))
    if embeddings:
        model.embed_tokens = Int8Embed(model.embed_tokens)
    return model


def dequantize_model(model: Transformer) -> Transformer:
    """Inverse of `quantize_model` (in place): every int8 layer becomes its float equivalent."""
    dtype = model.config.jnp_param_dtype
    for path, module in list(nnx.iter_modules(model)):
        for name, child in list(vars(module).items()):
            if isinstance(child, Int8Linear):
                setattr(module, name, child.to_linear(dtype))
    if isinstance(model.embed_tokens, Int8Embed):
        model.embed_tokens = model.embed_tokens.to_embed(dtype)
    return model


def parameter_bytes(model: nnx.Module) -> int:
    """Bytes held by every array variable of `model` (weights, scales, adapters)."""
    leaves = jax.tree.leaves(nnx.state(model))
    return sum(leaf.size * leaf.dtype.itemsize for leaf in leaves if hasattr(leaf, "dtype"))
