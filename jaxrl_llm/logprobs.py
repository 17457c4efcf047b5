"""Log-probabilities and entropies from logits: the one definition used by sampler and trainer.

Everything here is computed in float32 whatever the logits' dtype (bf16 keeps about 3
significant digits: too few for a log-softmax over a large vocabulary), and stays finite where a
sampler masks logits with -inf (top-k / top-p filtering, forbidden tokens).
"""

import numbers

import chex
import jax
import jax.numpy as jnp


def token_logprobs(logits: chex.Array, targets: chex.Array,
                   temperature: float | chex.Array = 1.0) -> chex.Array:
    """log softmax(logits / temperature)[targets], in float32.

    log p(y_t) = z_t[y_t] / tau - logsumexp_v(z_t[v] / tau): a sampler at temperature tau draws
    from softmax(z / tau), so its log-probs are of that distribution; the trainer uses tau = 1.
    The gather-then-logsumexp form never materialises a second `[B, T, V]` log-softmax array.

    Args:
      logits: `[B, T, V]` (any leading dims `[..., V]`), any float dtype.
      targets: `[B, T]` (the leading dims of `logits`) integer ids in `[0, V)`.
      temperature: tau > 0 (a Python number is checked; an array is trusted).
    Returns:
      `[B, T]` float32 log-probabilities of `targets`; -inf where a target's logit is -inf.
    """
    chex.assert_rank(logits, targets.ndim + 1)
    chex.assert_equal_shape_prefix([logits, targets], targets.ndim)
    if isinstance(temperature, numbers.Real) and not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = logits.astype(jnp.float32) / temperature
    target_logits = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)
    return target_logits[..., 0] - jax.nn.logsumexp(logits, axis=-1)


def entropy_from_logits(logits: chex.Array) -> chex.Array:
    """Entropy H = -sum_v p_v log p_v of p = softmax(logits), in float32.

    Computed as H = logsumexp(z) - sum_v p_v z_v on max-shifted logits z (no cancellation for
    large logits); tokens with a -inf logit have p_v = 0 and contribute exactly 0 to the value
    and to the gradient (a naive p * log p gives 0 * -inf = NaN in one or the other).

    Args:
      logits: `[B, T, V]` (any leading dims `[..., V]`), any float dtype; -inf allowed, with at
        least one finite logit per distribution.
    Returns:
      `[B, T]` (the leading dims) float32 entropies in nats, in `[0, log V]`.
    """
    chex.assert_type(logits, float)
    logits = logits.astype(jnp.float32)
    live = ~jnp.isneginf(logits)  # NaN stays live on purpose: it must show, not vanish
    # Shift by the max (a constant for the gradient) so that z <= 0 and lse is O(log V).
    shift = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    shifted = jnp.where(live, logits - shift, -jnp.inf)
    probs = jax.nn.softmax(shifted, axis=-1)
    # Where p = 0 because the logit is -inf, use z = 0 so that p * z is 0 with a 0 gradient.
    expected_logit = jnp.sum(probs * jnp.where(live, shifted, 0.0), axis=-1)
    return jax.nn.logsumexp(shifted, axis=-1) - expected_logit


def head_logprobs(model, hidden: chex.Array, targets: chex.Array,
                  chunk: int = 1024) -> tuple[chex.Array, chex.Array]:
    """Log-probs of `targets` and next-token entropies from hidden states, LM head in chunks.

    A `[B, N, V]` logit array of a few thousand scored tokens is gigabytes (V ~ 50k); here the
    head runs on `chunk` tokens at a time and each chunk is recomputed in the backward pass
    (`jax.checkpoint`), so at most one chunk's logits are alive at once.

    Args:
      model: a `jaxrl_llm.model.Transformer` (its `logits` is the LM head).
      hidden: `[B, N, D]` final hidden states of the predicting positions.
      targets: `[B, N]` the ids they predict.
      chunk: tokens per head call (>= 1).
    Returns:
      `(logprobs [B, N], entropy [B, N])`, float32, as `token_logprobs` / `entropy_from_logits`.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")

    @jax.checkpoint
    def stats(h, t):
        logits = model.logits(h)
        return token_logprobs(logits, t), entropy_from_logits(logits)

    n = hidden.shape[1]
    parts = [stats(hidden[:, i:i + chunk], targets[:, i:i + chunk]) for i in range(0, n, chunk)]
    return tuple(jnp.concatenate(p, axis=1) for p in zip(*parts))


def response_hidden_states(model, prompt_tokens, prompt_mask, response_tokens, response_mask, *,
                           remat: bool = False):
    """Final hidden states at the positions that predict each response token, one forward pass.

    The prompt must be left-padded and the response right-padded, so that every row's last
    prompt token sits at column P - 1 and the slice is static. Column 0 of the result is the
    last prompt token (where a value head reads V(prompt)), column t the state after response
    tokens 0..t-1 (a per-token value head's input).

    Args:
      model: a `jaxrl_llm.model.Transformer` (LoRA / int8 variants included).
      prompt_tokens: `[B, P]` int, left-padded; prompt_mask: `[B, P]` bool.
      response_tokens: `[B, R]` int, right-padded; response_mask: `[B, R]` bool.
      remat: recompute activations in the backward pass (long prompts, little memory).
    Returns:
      `[B, R, D]` hidden states (finite, but meaningless where `response_mask` is False).
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
    return hidden[:, num_prompt - 1:num_prompt + num_response - 1]


def score_responses(model, prompt_tokens, prompt_mask, response_tokens, response_mask, *,
                    remat: bool = False):
    """Log-probs of given responses under `model`, in one forward pass over prompt + response.

    Args: as `response_hidden_states` (left-padded prompt, right-padded response).
    Returns:
      `(logprobs [B, R], entropy [B, R], prompt_hidden [B, D])`: float32 log-prob of each
      response token given everything before it (0 where masked), the entropy of the model's
      next-token distribution at each response position, and the final hidden state of the last
      prompt token (where a value head reads the state value).
    """
    predicting = response_hidden_states(model, prompt_tokens, prompt_mask, response_tokens,
                                        response_mask, remat=remat)
    logits = model.logits(predicting)  # [B, R, V]: the LM head only where it is needed
    response_mask = response_mask.astype(jnp.float32)
    logprobs = token_logprobs(logits, response_tokens) * response_mask
    return logprobs, entropy_from_logits(logits), predicting[:, 0]
