"""RL math for language models as pure, jittable functions over batch-major arrays.

Conventions: arrays are `[B, T]` (batch, time or token); masks are float or bool `[B, T]` with
1 = counts; everything is computed in float32 whatever the input dtype; masked positions never
change a result, and an all-zero mask gives 0, never NaN. Losses take a `reduction`:
  "token_mean"  sum over all valid tokens / their number (the default),
  "seq_mean"    mean per sequence, then mean over sequences with any valid token,
  "sum"         the plain masked sum (accumulate sums and counts across micro-batches yourself),
  "constant"    sum / `norm_constant` (Dr. GRPO, Liu et al. 2025: no length normalisation).
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

REDUCTIONS = ("token_mean", "seq_mean", "sum", "constant")


def _f32(*arrays):
    return [jnp.asarray(a, jnp.float32) for a in arrays]


def masked_sum(values: chex.Array, mask: chex.Array, axis=None) -> chex.Array:
    """Sum of `values` where `mask` is 1 (same shapes)."""
    chex.assert_equal_shape([values, mask])
    values, mask = _f32(values, mask)
    # Select rather than multiply: padding may hold inf/NaN (e.g. exp of garbage log-probs).
    return jnp.sum(jnp.where(mask > 0, values * mask, 0.0), axis=axis)


def masked_mean(values: chex.Array, mask: chex.Array, axis=None) -> chex.Array:
    """Mean of `values` where `mask` is 1; 0 where nothing is valid."""
    chex.assert_equal_shape([values, mask])
    count = jnp.sum(jnp.asarray(mask, jnp.float32), axis=axis)
    return masked_sum(values, mask, axis) / jnp.maximum(count, 1.0)


def masked_whiten(values: chex.Array, mask: chex.Array, shift_mean: bool = True,
                  eps: float = 1e-8) -> chex.Array:
    """(values - mean) / std over valid positions (mean kept if not `shift_mean`); 0 elsewhere."""
    chex.assert_equal_shape([values, mask])
    values, mask = _f32(values, mask)
    mean = masked_mean(values, mask)
    var = masked_mean(jnp.square(values - mean), mask)
    whitened = (values - mean) * jax.lax.rsqrt(var + eps)
    return jnp.where(mask > 0, whitened if shift_mean else whitened + mean, 0.0)


def aggregate(per_token: chex.Array, mask: chex.Array, reduction: str = "token_mean",
              norm_constant: float | None = None) -> chex.Array:
    """Reduce a `[B, T]` per-token loss to a scalar (see the module docstring for the modes)."""
    chex.assert_rank(per_token, 2)
    chex.assert_equal_shape([per_token, mask])
    if reduction == "token_mean":
        return masked_mean(per_token, mask)
    if reduction == "seq_mean":
        per_seq = masked_mean(per_token, mask, axis=1)
        has_tokens = (jnp.sum(jnp.asarray(mask, jnp.float32), axis=1) > 0).astype(jnp.float32)
        return jnp.sum(per_seq * has_tokens) / jnp.maximum(jnp.sum(has_tokens), 1.0)
    if reduction == "sum":
        return masked_sum(per_token, mask)
    if reduction == "constant":
        if not norm_constant or norm_constant <= 0:
            raise ValueError(f"reduction='constant' needs norm_constant > 0, got {norm_constant}")
        return masked_sum(per_token, mask) / norm_constant
    raise ValueError(f"unknown reduction {reduction!r}; choose from {', '.join(REDUCTIONS)}")


def gae(rewards: chex.Array, values: chex.Array, next_values: chex.Array,
        terminated: chex.Array, mask: chex.Array, gamma: float, lam: float):
    """Generalized advantage estimation (Schulman et al. 2016), batch-major.

    delta_t = r_t + gamma * (1 - terminated_t) * V(s_{t+1}) - V(s_t)
    A_t     = delta_t + gamma * lam * (1 - terminated_t) * A_{t+1}

    Args:
      rewards: `[B, T]` reward of step t.
      values: `[B, T]` V(s_t).
      next_values: `[B, T]` V(s_{t+1}): for the last valid step of a truncated episode (step
        limit, or the end of the window) the value of the state it was cut at (bootstrap); any
        value at a terminated step is ignored.
      terminated: `[B, T]` 1 where the episode ended by success/failure at step t (no future).
      mask: `[B, T]` 1 on valid steps. Valid steps of a row must be a prefix (episodes start at
        t=0); the recursion stops at the first invalid step, so padding never leaks in.
      gamma: discount; lam: GAE lambda.
    Returns:
      `(advantages [B, T], returns [B, T])` with returns = advantages + values (value targets);
      both 0 at masked positions.
    """
    chex.assert_rank(rewards, 2)
    chex.assert_equal_shape([rewards, values, next_values, terminated, mask])
    rewards, values, next_values, terminated, mask = _f32(
        rewards, values, next_values, terminated, mask)
    not_done = 1.0 - terminated
    deltas = rewards + gamma * not_done * next_values - values
    # The continuation from t+1 exists only if t+1 is a valid step of the same episode.
    next_valid = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)
    carry_scale = gamma * lam * not_done * next_valid

    def backward(next_advantage, inputs):
        delta, scale, valid = inputs
        advantage = (delta + scale * next_advantage) * valid
        return advantage, advantage

    _, advantages = jax.lax.scan(backward, jnp.zeros(rewards.shape[0], jnp.float32),
                                 (deltas.T, carry_scale.T, mask.T), reverse=True)
    advantages = advantages.T  # scan runs time-major inside; nothing time-major leaves
    return advantages, (advantages + values) * mask


class PolicyLoss(NamedTuple):
    loss: chex.Array
    clip_fraction: chex.Array  # fraction of valid tokens whose ratio was clipped
    approx_kl_k1: chex.Array  # mean of log(old / new): Schulman's k1 of KL(old || new)
    approx_kl_k3: chex.Array  # mean of (r - 1) - log r with r = new / old: k3, >= 0
    ratio_mean: chex.Array
    ratio_max: chex.Array


def ppo_policy_loss(logprobs: chex.Array, old_logprobs: chex.Array, advantages: chex.Array,
                    mask: chex.Array, clip_eps: float = 0.2, dual_clip: float | None = None,
                    reduction: str = "token_mean", norm_constant: float | None = None
                    ) -> PolicyLoss:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), optionally dual-clip (Ye et al. 2020).

    L = -min(r A, clip(r, 1 - eps, 1 + eps) A), r = exp(logprobs - old_logprobs); with dual clip
    c > 1, for A < 0 the loss is further capped at -c A.

    Args:
      logprobs: `[B, T]` log-probs under the policy being trained (per token, or per action with
        T = 1 for summed action log-probs).
      old_logprobs: `[B, T]` the stored log-probs of the policy that sampled.
      advantages: `[B, T]`.
      mask: `[B, T]`.
      clip_eps: epsilon of the clip.
      dual_clip: c > 1, or None.
      reduction, norm_constant: see `aggregate`.
    Returns:
      `PolicyLoss` of scalars; stats are token means over valid positions.
    """
    chex.assert_rank(logprobs, 2)
    chex.assert_equal_shape([logprobs, old_logprobs, advantages, mask])
    if not clip_eps > 0:
        raise ValueError(f"clip_eps must be > 0, got {clip_eps}")
    if dual_clip is not None and not dual_clip > 1:
        raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip}")
    logprobs, old_logprobs, advantages, mask = _f32(logprobs, old_logprobs, advantages, mask)
    log_ratio = logprobs - old_logprobs
    ratio = jnp.exp(log_ratio)
    clipped = jnp.clip(ratio, 1 - clip_eps, 1 + clip_eps)
    per_token = -jnp.minimum(ratio * advantages, clipped * advantages)
    if dual_clip is not None:
        per_token = jnp.where(advantages < 0, jnp.minimum(per_token, -dual_clip * advantages),
                              per_token)
    stop = jax.lax.stop_gradient
    was_clipped = (jnp.abs(stop(ratio) - 1) > clip_eps).astype(jnp.float32)
    return PolicyLoss(
        loss=aggregate(per_token, mask, reduction, norm_constant),
        clip_fraction=masked_mean(was_clipped, mask),
        approx_kl_k1=masked_mean(stop(-log_ratio), mask),
        approx_kl_k3=masked_mean(stop(ratio - 1 - log_ratio), mask),
        ratio_mean=masked_mean(stop(ratio), mask),
        ratio_max=jnp.max(jnp.where(mask > 0, stop(ratio), 0.0)))


def ppo_value_loss(values: chex.Array, old_values: chex.Array, returns: chex.Array,
                   mask: chex.Array, clip: float | None = 0.2, reduction: str = "token_mean",
                   norm_constant: float | None = None) -> chex.Array:
    """0.5 * max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2); unclipped if clip is None.

    Args: values, old_values, returns, mask: `[B, T]`. Returns a scalar.
    """
    chex.assert_rank(values, 2)
    chex.assert_equal_shape([values, old_values, returns, mask])
    values, old_values, returns, mask = _f32(values, old_values, returns, mask)
    loss = jnp.square(values - returns)
    if clip is not None:
        if clip <= 0:
            raise ValueError(f"value clip must be > 0 (or None), got {clip}")
        clipped = old_values + jnp.clip(values - old_values, -clip, clip)
        loss = jnp.maximum(loss, jnp.square(clipped - returns))
    return 0.5 * aggregate(loss, mask, reduction, norm_constant)


def kl_k1(logprobs: chex.Array, ref_logprobs: chex.Array) -> chex.Array:
    """k1 = log p - log p_ref: unbiased for KL(p || p_ref) on samples from p, can be < 0."""
    logprobs, ref_logprobs = _f32(logprobs, ref_logprobs)
    return logprobs - ref_logprobs


def kl_k2(logprobs: chex.Array, ref_logprobs: chex.Array) -> chex.Array:
    """k2 = 0.5 (log p - log p_ref)^2: biased, low variance, >= 0 (Schulman 2020)."""
    return 0.5 * jnp.square(kl_k1(logprobs, ref_logprobs))


def kl_k3(logprobs: chex.Array, ref_logprobs: chex.Array) -> chex.Array:
    """k3 = (r - 1) - log r, r = p_ref / p: unbiased for KL(p || p_ref) on samples from p, >= 0."""
    log_r = -kl_k1(logprobs, ref_logprobs)
    return jnp.expm1(log_r) - log_r


def kl_penalized_rewards(rewards: chex.Array, logprobs: chex.Array, ref_logprobs: chex.Array,
                         kl_coef: float) -> chex.Array:
    """KL in the reward (Ziegler et al. 2019): r_t - kl_coef * k1_t, any matching shapes."""
    chex.assert_equal_shape([rewards, logprobs, ref_logprobs])
    return jnp.asarray(rewards, jnp.float32) - kl_coef * kl_k1(logprobs, ref_logprobs)


def adaptive_kl_update(kl_coef: chex.Array, observed_kl: chex.Array, target: float,
                       horizon: float, n_steps: int) -> chex.Array:
    """Adaptive KL controller (Ziegler et al. 2019): proportional error clipped to +-0.2.

    kl_coef <- kl_coef * (1 + clip(observed / target - 1, -0.2, 0.2) * n_steps / horizon)
    """
    error = jnp.clip(jnp.asarray(observed_kl, jnp.float32) / target - 1.0, -0.2, 0.2)
    return jnp.asarray(kl_coef, jnp.float32) * (1.0 + error * n_steps / horizon)


def reinforce_loss(logprobs: chex.Array, returns: chex.Array, baseline: chex.Array,
                   mask: chex.Array, reduction: str = "token_mean",
                   norm_constant: float | None = None) -> chex.Array:
    """REINFORCE with a baseline (Williams 1992): -(R - b) * log p over valid tokens.

    Args: logprobs, mask `[B, T]`; returns, baseline `[B]` (per sequence). Returns a scalar.
    """
    chex.assert_rank([logprobs, returns, baseline], [2, 1, 1])
    advantage = jax.lax.stop_gradient(jnp.asarray(returns, jnp.float32) - baseline)
    per_token = -advantage[:, None] * jnp.asarray(logprobs, jnp.float32)
    return aggregate(per_token, mask, reduction, norm_constant)


def mean_baseline(rewards: chex.Array) -> chex.Array:
    """`[P, k]` rewards -> `[P, k]` baseline = mean of the k samples of the prompt (notebook 003)."""
    chex.assert_rank(rewards, 2)
    rewards = jnp.asarray(rewards, jnp.float32)
    return jnp.broadcast_to(jnp.mean(rewards, axis=1, keepdims=True), rewards.shape)


def rloo_advantages(rewards: chex.Array) -> chex.Array:
    """RLOO (Ahmadian et al. 2024): A_i = r_i - mean_{j != i} r_j over the k samples of a prompt.

    Args: rewards `[num_prompts, k]`, k >= 2. Returns `[num_prompts, k]`; each row sums to 0.
    """
    chex.assert_rank(rewards, 2)
    k = rewards.shape[1]
    if k < 2:
        raise ValueError(f"RLOO needs k >= 2 samples per prompt, got {k}")
    rewards = jnp.asarray(rewards, jnp.float32)
    others = (jnp.sum(rewards, axis=1, keepdims=True) - rewards) / (k - 1)
    return rewards - others


def grpo_advantages(rewards: chex.Array, scale_by_std: bool = True,
                    eps: float = 1e-6) -> chex.Array:
    """GRPO (Shao et al. 2024): (r - mean_group) / (std_group + eps); Dr. GRPO (Liu et al. 2025)
    with `scale_by_std=False`: r - mean_group. Identical rewards in a group give 0, not NaN.

    Args: rewards `[num_prompts, k]`, k >= 2. Returns `[num_prompts, k]`.
    """
    chex.assert_rank(rewards, 2)
    if rewards.shape[1] < 2:
        raise ValueError(f"GRPO needs k >= 2 samples per prompt, got {rewards.shape[1]}")
    rewards = jnp.asarray(rewards, jnp.float32)
    centered = rewards - jnp.mean(rewards, axis=1, keepdims=True)
    if not scale_by_std:
        return centered
    return centered / (jnp.std(rewards, axis=1, keepdims=True) + eps)
