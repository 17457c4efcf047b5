"""Log-probabilities and entropies from logits (placeholder until the full module lands)."""

import jax
import jax.numpy as jnp


def token_logprobs(logits, targets, temperature=1.0):
    logits = logits.astype(jnp.float32) / temperature
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
