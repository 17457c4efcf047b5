"""The action-level policy over a state's valid actions (GLAM, Carta et al. 2023): one definition.

For the K valid actions a_1..a_K of a state, s_k is the summed token log-prob of " a_k" + EOS
given the prompt (`generation.score_continuations` during play, `packing.packed_forward` in
training), optionally divided by its token count, and

    pi(a_k | s) = softmax_k(s_k / temperature).

Play samples from (or takes the argmax of) pi, stores log pi(a | s) as the PPO old log-prob,
and the update recomputes pi from the same scores: one function serves all three.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def action_logprobs(scores: jax.Array, candidate_mask: jax.Array, temperature: float = 1.0,
                    lengths: jax.Array | None = None) -> jax.Array:
    """log pi over each state's candidates.

    Args:
      scores: `[..., C]` summed log-prob of each candidate (any value where masked).
      candidate_mask: `[..., C]` bool, True on real candidates (>= 1 per state that is used).
      temperature: > 0; lower sharpens pi.
      lengths: optional `[..., C]` token counts: scores are then per-token means (length
        normalisation, which removes the summed score's preference for short actions).
    Returns:
      `[..., C]` float32 log-probabilities, -inf on masked candidates (a state with no
      candidate gets all -inf: mask it out of every reduction).
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    scores = scores.astype(jnp.float32)
    if lengths is not None:
        scores = scores / jnp.maximum(lengths, 1).astype(jnp.float32)
    return jax.nn.log_softmax(jnp.where(candidate_mask, scores / temperature, -jnp.inf), axis=-1)


def categorical_entropy(logpi: jax.Array, candidate_mask: jax.Array) -> jax.Array:
    """`[...]` entropy -sum_k pi_k log pi_k over the candidates of `[..., C]` log-probs."""
    safe = jnp.where(candidate_mask, logpi, 0.0)  # 0 * -inf would be NaN
    return -jnp.sum(jnp.exp(safe) * safe * candidate_mask, axis=-1)


def categorical_kl(logpi: jax.Array, ref_logpi: jax.Array, candidate_mask: jax.Array
                   ) -> jax.Array:
    """`[...]` exact KL(pi || ref) = sum_k pi_k (log pi_k - log ref_k) over the candidates."""
    safe, ref = (jnp.where(candidate_mask, x, 0.0) for x in (logpi, ref_logpi))
    return jnp.sum(jnp.exp(safe) * (safe - ref) * candidate_mask, axis=-1)
