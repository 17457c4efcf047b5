"""Sampling rules: how one token is drawn from a row of logits (`generation` runs them)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxrl_llm.logprobs import token_logprobs


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How tokens are drawn.

    Attributes:
      max_new_tokens: tokens sampled per row at most (N).
      temperature: logits are divided by it before sampling; must be > 0 (use `greedy`).
      top_k: keep the k most likely tokens (0 = off).
      top_p: nucleus sampling: keep the smallest set of tokens with probability >= top_p (1 = off).
      greedy: take the argmax (temperature, top_k, top_p are then ignored).
      eos_ids: end-of-sequence ids; a row ends after emitting one.
      stop_ids: further ids that end a row (e.g. the newline that ends a TextWorld action).
      pad_id: written after a row has ended.
    """

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False
    eos_ids: tuple[int, ...] = ()
    stop_ids: tuple[int, ...] = ()
    pad_id: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (set greedy=True for argmax), "
                             f"got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        object.__setattr__(self, "eos_ids", tuple(int(i) for i in self.eos_ids))
        object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))


def sample_logits(logits: jax.Array, key: jax.Array,
                  sampling: SamplingConfig) -> tuple[jax.Array, jax.Array]:
    """Draw one token per row.

    Args:
      logits: `[B, V]` float32.
      key: PRNG key.
      sampling: the rule.
    Returns:
      `(tokens [B] int32, logprobs [B] float32)`, log-probs of the distribution sampled from.
    """
    if sampling.greedy:
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return tokens, token_logprobs(logits[:, None], tokens[:, None])[:, 0]
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1:
        logits = top_p_filter(logits, sampling.top_p)
    tokens = jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
    return tokens, token_logprobs(logits[:, None], tokens[:, None])[:, 0]


def top_p_filter(logits: jax.Array, top_p: float) -> jax.Array:
    """Nucleus filter (Holtzman et al. 2020): `[B, V]` logits with the tail set to -inf.

    Keeps the most likely tokens until their cumulative probability reaches top_p (the token that
    crosses the threshold is kept, so at least one token always survives).
    """
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < top_p
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(
        keep_sorted)
    return jnp.where(keep, logits, -jnp.inf)
