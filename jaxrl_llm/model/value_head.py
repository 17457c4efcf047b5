"""A scalar value head on the decoder's final hidden states (PPO's critic)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class ValueParam(nnx.Param):
    """Value-head weights: trained alongside the LoRA adapters (see `lora.TRAINABLE`)."""


class ValueHead(nnx.Module):
    """`V(h) = h @ w + b`: `[..., D]` hidden states -> `[...]` float32 values.

    Zero-initialised so that a fresh critic predicts 0 and its first updates come from data
    rather than from random features.
    """

    def __init__(self, d_model: int):
        self.kernel = ValueParam(jnp.zeros((d_model,), jnp.float32))
        self.bias = ValueParam(jnp.zeros((), jnp.float32))

    def __call__(self, hidden: jax.Array) -> jax.Array:
        return hidden.astype(jnp.float32) @ self.kernel[...] + self.bias[...]


class ActorCritic(nnx.Module):
    """A language model (the actor, `lm`) and a value head on its final hidden states."""

    def __init__(self, lm: nnx.Module):
        self.lm = lm
        self.value_head = ValueHead(lm.config.d_model)

    @property
    def config(self):
        return self.lm.config
