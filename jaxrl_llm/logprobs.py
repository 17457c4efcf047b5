"""Log-probabilities and entropies from logits: the one definition used by sampler and trainer."""

import chex
import jax
import jax.numpy as jnp


def token_logprobs(logits, targets, temperature=1.0):
    """log softmax(logits / temperature)[targets] in float32: `[..., V]`, `[...]` -> `[...]`."""
    logits = logits.astype(jnp.float32) / temperature
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def entropy_from_logits(logits):
    """Entropy of softmax(logits) in float32: `[..., V]` -> `[...]` (no NaN with -inf logits)."""
    logits = logits.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.sum(jnp.where(jnp.isfinite(logp), jnp.exp(logp) * logp, 0.0), axis=-1)


def score_responses(model, prompt_tokens, prompt_mask, response_tokens, response_mask, *,
                    remat: bool = False):
    """Log-probs of given responses under `model`, in one forward pass over prompt + response.

    The prompt must be left-padded and the response right-padded, so that every row's last
    prompt token sits at column P - 1 and the slices below are static.

    Args:
      model: a `jaxrl_llm.model.Transformer` (LoRA / int8 variants included).
      prompt_tokens: `[B, P]` int, left-padded; prompt_mask: `[B, P]` bool.
      response_tokens: `[B, R]` int, right-padded; response_mask: `[B, R]` bool.
      remat: recompute activations in the backward pass (long prompts, little memory).
    Returns:
      `(logprobs [B, R], entropy [B, R], prompt_hidden [B, D])`: float32 log-prob of each
      response token given everything before it (0 where masked), the entropy of the model's
      next-token distribution at each response position, and the final hidden state of the last
      prompt token (where a value head reads the state value).
    """
    chex.assert_rank([prompt_tokens, prompt_mask, response_tokens, response_mask], 2)
    chex.assert_equal_shape([prompt_tokens, prompt_mask])
    chex.assert_equal_shape([response_tokens, response_mask])
    from jaxrl_llm.model.llama import causal_mask, positions_from_mask

    num_prompt, num_response = prompt_tokens.shape[1], response_tokens.shape[1]
    tokens = jnp.concatenate([prompt_tokens, response_tokens], axis=1)
    mask = jnp.concatenate([prompt_mask, response_mask], axis=1).astype(bool)
    hidden, _ = model.hidden_states(tokens, positions_from_mask(mask), causal_mask(mask),
                                    remat=remat)
    # Position t predicts token t + 1: the response is predicted from columns P-1 .. P+R-2.
    predicting = hidden[:, num_prompt - 1:num_prompt + num_response - 1]
    logits = model.logits(predicting)  # [B, R, V]: the LM head only where it is needed
    response_mask = response_mask.astype(jnp.float32)
    logprobs = token_logprobs(logits, response_tokens) * response_mask
    return logprobs, entropy_from_logits(logits), hidden[:, num_prompt - 1]
