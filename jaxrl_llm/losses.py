"""RL math for language models as pure, jittable functions over batch-major arrays.

Conventions: arrays are `[B, T]` (batch, then step or token); a mask is float or bool, same
shape, 1 = counts (fractional weights allowed in reductions); everything is computed in float32
whatever the input dtype. Masked positions never change a result or a gradient (they may hold
garbage, even NaN), and an all-zero mask gives 0, never NaN.

Loss aggregation, the `reduction` argument of every loss (papers disagree):
  "token_mean"           sum over all valid tokens / their number (DAPO, Yu et al. 2025);
  "seq_mean_token_mean"  mean over each sequence's tokens, then over sequences with any valid
                         token (GRPO as written in Shao et al. 2024, eq. 3);
  "seq_sum_norm"         each sequence's token sum / `norm_constant`, then mean over sequences
                         (Dr. GRPO, Liu et al. 2025: norm_constant = the generation budget);
  "sum"                  the plain masked sum (divide by your own global count).
With `return_sum_count=True` a loss returns `(sum, count)` (`ppo_policy_loss`: in `.loss`, and
its stats as pairs too) with loss = sum / count: add both over micro-batches and accumulation
steps, then divide, to get the true full-batch mean.

A PPO step, token level:
  advantages, returns = gae(rewards, values, next_step_values(values, mask),
                            jnp.zeros_like(mask), mask, gamma=1.0, lam=0.95)
  policy = ppo_policy_loss(logprobs, old_logprobs, masked_whiten(advantages, mask), mask)
  loss = (policy.loss + 0.5 * ppo_value_loss(new_values, values, returns, mask)
          - entropy_coef * entropy_bonus(logits, mask))
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from jaxrl_llm.logprobs import entropy_from_logits

REDUCTIONS = ("token_mean", "seq_mean_token_mean", "seq_sum_norm", "sum")
# Where a KL-to-reference term goes: a penalty in the reward, or a term of the loss.
KL_MODES = ("reward", "loss")
KL_ESTIMATORS = ("k1", "k2", "k3")


def _check_range(name, value, low=None, high=None, low_open=False):
    """ValueError for a Python number outside its range; traced values are trusted."""
    if not isinstance(value, numbers.Real):
        return
    too_low = low is not None and (value <= low if low_open else value < low)
    if too_low or (high is not None and value > high):
        bounds = f"{'>' if low_open else '>='} {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bounds}, got {value}")


def _valid_f32(mask, *arrays):
    """float32 mask, and `arrays` in float32 with masked entries replaced by 0.

    Zeroing *before* any arithmetic keeps garbage padding (inf, NaN) out of the gradient too:
    a `where` after an `exp` of NaN still back-propagates 0 * NaN = NaN.
    """
    valid = jnp.asarray(mask) > 0
    return [jnp.asarray(mask, jnp.float32)] + [
        jnp.where(valid, jnp.asarray(a, jnp.float32), 0.0) for a in arrays]


def _as_batch_time(*arrays):
    """Per-action `[B]` arrays as `[B, 1]`; `[B, T]` unchanged."""
    chex.assert_rank(arrays, {1, 2})
    chex.assert_equal_shape(arrays)
    return [a[:, None] if a.ndim == 1 else a for a in arrays]


def _safe_divide(numerator, denominator):
    return jnp.where(denominator > 0, numerator / jnp.where(denominator > 0, denominator, 1.0),
                     0.0)


def masked_sum(values: chex.Array, mask: chex.Array, axis=None) -> chex.Array:
    """sum(values * mask) over `axis` (all if None); masked entries may hold anything.

    Args: values `[B, T]` (any shape); mask: same shape, 0 = ignore, else a weight.
    Returns: float32, the shape of `values` without `axis`.
    """
    chex.assert_equal_shape([values, mask])
    mask, values = _valid_f32(mask, values)
    return jnp.sum(values * mask, axis=axis)


def masked_mean(values: chex.Array, mask: chex.Array, axis=None) -> chex.Array:
    """sum(values * mask) / sum(mask) over `axis` (all if None); 0 where the mask sums to 0.

    Args: values `[B, T]` (any shape); mask: same shape.
    Returns: float32, the shape of `values` without `axis`.

    Example (the padded 100 counts for nothing):
      >>> import jax.numpy as jnp
      >>> from jaxrl_llm import losses
      >>> float(losses.masked_mean(jnp.array([[1., 2., 100.]]), jnp.array([[1., 1., 0.]])))
      1.5
    """
    chex.assert_equal_shape([values, mask])
    count = jnp.sum(jnp.asarray(mask, jnp.float32), axis=axis)
    return _safe_divide(masked_sum(values, mask, axis), count)


def masked_whiten(values: chex.Array, mask: chex.Array, shift_mean: bool = True,
                  eps: float = 1e-8) -> chex.Array:
    """(values - mean) / sqrt(var + eps) with mean, var over all valid entries (Ziegler et al.
    2019 / TRL whiten advantages this way); `shift_mean=False` adds the mean back.

    Args:
      values: `[B, T]` (any shape); mask: same shape.
      shift_mean: subtract the mean (True) or only rescale (False, for rewards).
      eps: added to the (population, ddof=0) variance.
    Returns: float32, the shape of `values`; 0 at masked entries.
    """
    chex.assert_equal_shape([values, mask])
    mask, values = _valid_f32(mask, values)
    mean = masked_mean(values, mask)
    var = masked_mean(jnp.square(values - mean), mask)
    whitened = (values - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return jnp.where(mask > 0, whitened, 0.0)


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def _check_reduction(reduction, norm_constant):
    _check_choice("reduction", reduction, REDUCTIONS)
    if reduction == "seq_sum_norm" and (norm_constant is None or not norm_constant > 0):
        raise ValueError("norm_constant must be > 0 for reduction='seq_sum_norm' (Dr. GRPO: the "
                         f"max response length), got {norm_constant}")


def aggregate_loss(per_token_loss: chex.Array, mask: chex.Array,
                   reduction: str = "token_mean", norm_constant: float | None = None,
                   return_sum_count: bool = False):
    """Reduce a per-token loss to a scalar the way `reduction` says (see the module docstring).

      token_mean:          sum_{b,t} m l / sum_{b,t} m
      seq_mean_token_mean: (1 / N) sum_b (sum_t m l / sum_t m),  N = #rows with sum_t m > 0
      seq_sum_norm:        (1 / N) sum_b (sum_t m l) / norm_constant
      sum:                 sum_{b,t} m l

    Args:
      per_token_loss: `[B, T]`; mask: `[B, T]`.
      reduction: one of `REDUCTIONS`; norm_constant: > 0, only for "seq_sum_norm".
      return_sum_count: return `(sum, count)` (count = the masked token count, the number of
        valid rows, or 1 for "sum") instead of sum / count.
    Returns: float32 scalar, or `(sum, count)` of float32 scalars; 0 for an all-zero mask.
    """
    chex.assert_rank(per_token_loss, 2)
    chex.assert_equal_shape([per_token_loss, mask])
    _check_reduction(reduction, norm_constant)
    tokens_per_row = jnp.sum(jnp.asarray(mask, jnp.float32), axis=1)
    valid_rows = jnp.sum((tokens_per_row > 0).astype(jnp.float32))
    if reduction == "token_mean":
        total, count = masked_sum(per_token_loss, mask), jnp.sum(tokens_per_row)
    elif reduction == "seq_mean_token_mean":
        total, count = jnp.sum(masked_mean(per_token_loss, mask, axis=1)), valid_rows
    elif reduction == "seq_sum_norm":
        total, count = masked_sum(per_token_loss, mask) / norm_constant, valid_rows
    else:
        total, count = masked_sum(per_token_loss, mask), jnp.ones((), jnp.float32)
    return (total, count) if return_sum_count else _safe_divide(total, count)


def next_step_values(values: chex.Array, mask: chex.Array,
                     bootstrap_values: chex.Array | None = None) -> chex.Array:
    """V(s_{t+1}) for `gae`: the value at the next valid position of the same row.

    Skips masked positions (padding, observation tokens between turns); after a row's last valid
    position it is `bootstrap_values` (the value of the state the window was cut at), default 0:
    at token level the response ended, so the last real token has no future value.
    A cut *inside* a row (a truncated episode followed by another in the same row) is not
    known here: its entry is the next episode's first value. Set `next_values` at such steps
    to the value of the state the episode was cut at yourself, and pass `truncated` to `gae`.

    Args:
      values: `[B, T]` V(s_t); mask: `[B, T]`; bootstrap_values: `[B]` or None (zeros).
    Returns: `[B, T]` float32; 0 at masked positions.
    """
    chex.assert_rank([values, mask], 2)
    chex.assert_equal_shape([values, mask])
    mask, values = _valid_f32(mask, values)
    if bootstrap_values is None:
        bootstrap_values = jnp.zeros(values.shape[0], jnp.float32)
    chex.assert_shape(bootstrap_values, (values.shape[0],))

    def backward(next_value, step):
        value, valid = step
        return jnp.where(valid, value, next_value), next_value

    _, next_values = jax.lax.scan(backward, jnp.asarray(bootstrap_values, jnp.float32),
                                  (values.T, mask.T > 0), reverse=True)
    return jnp.where(mask > 0, next_values.T, 0.0)  # scan is time-major inside only


def gae(rewards: chex.Array, values: chex.Array, next_values: chex.Array,
        terminated: chex.Array, mask: chex.Array, *, gamma: float, lam: float,
        truncated: chex.Array | None = None) -> tuple[chex.Array, chex.Array]:
    """Generalized advantage estimation (Schulman et al. 2016, eq. 16), batch-major.

      delta_t = r_t + gamma * (1 - terminated_t) * next_values_t - values_t
      A_t     = delta_t + gamma * lam * (1 - terminated_t) * (1 - truncated_t) * A_{t'}
    where t' is the next valid (mask > 0) position of the row: masked positions are skipped and
    A_{t'} = 0 past the row's last valid position. Several episodes may share a row.

    Args:
      rewards: `[B, T]` r_t, the reward for the action at step (or token) t.
      values: `[B, T]` V(s_t).
      next_values: `[B, T]` V(s_{t+1}), the value of the state reached after step t:
        - within an episode, the value of the next step's state (`values` at t');
        - at a **truncated** step (step limit, or the last step of the window while the episode
          goes on), the value of the observation it was cut at: GAE bootstraps from it;
        - at a **terminated** step anything (ignored: there is no future).
        `next_step_values(values, mask, bootstrap_values)` builds it when every cut is at a
        row's end; token level: `next_step_values(values, mask)` (the response ends: 0).
      terminated: `[B, T]` 1 where the episode ended at step t (success / failure / EOS).
      mask: `[B, T]` 1 on real steps; advantages and returns are 0 elsewhere.
      gamma: discount in [0, 1]; lam: GAE lambda in [0, 1] (keyword-only, as `truncated`:
        other libraries order the arrays differently, and a positional call must not run
        with a flag array taken for another).
      truncated: `[B, T]` 1 where the episode was cut at step t and a new one starts at t'
        (no advantage flows back across it). None: no episode is cut before its row's last
        valid step (the window end needs no flag: nothing follows it).
    Returns:
      `(advantages [B, T], returns [B, T])` float32, returns = advantages + values (the value
      targets, TD(lambda) returns); both 0 at masked positions.

    Example (a 3-step episode rewarded at its end, which terminates it; V = 0.5 everywhere):
      >>> import jax.numpy as jnp
      >>> from jaxrl_llm import losses
      >>> advantages, returns = losses.gae(
      ...     rewards=jnp.array([[0., 0., 1.]]), values=jnp.full((1, 3), 0.5),
      ...     next_values=jnp.array([[0.5, 0.5, 0.]]), terminated=jnp.array([[0., 0., 1.]]),
      ...     mask=jnp.ones((1, 3)), gamma=1.0, lam=1.0)
      >>> advantages.tolist(), returns.tolist()
      ([[0.5, 0.5, 0.5]], [[1.0, 1.0, 1.0]])
    """
    chex.assert_rank(rewards, 2)
    chex.assert_equal_shape([rewards, values, next_values, terminated, mask])
    _check_range("gamma", gamma, 0.0, 1.0)
    _check_range("lam", lam, 0.0, 1.0)
    if truncated is None:
        truncated = jnp.zeros(rewards.shape, jnp.float32)
    chex.assert_equal_shape([rewards, truncated])
    mask, rewards, values, next_values, terminated, truncated = _valid_f32(
        mask, rewards, values, next_values, terminated, truncated)
    alive = 1.0 - terminated
    # Select, not multiply: a terminated step's next value is unused and may be NaN.
    deltas = rewards + gamma * jnp.where(terminated > 0, 0.0, next_values) - values
    continues = gamma * lam * alive * (1.0 - truncated)

    def backward(next_advantage, step):
        delta, continuation, valid = step
        advantage = delta + continuation * next_advantage
        # A masked position is skipped: the carry passes it unchanged to the previous step.
        return jnp.where(valid, advantage, next_advantage), jnp.where(valid, advantage, 0.0)

    _, advantages = jax.lax.scan(backward, jnp.zeros(rewards.shape[0], jnp.float32),
                                 (deltas.T, continues.T, mask.T > 0), reverse=True)
    advantages = advantages.T  # [T, B] -> [B, T]: nothing time-major leaves
    return advantages, jnp.where(mask > 0, advantages + values, 0.0)


class PolicyLoss(NamedTuple):
    """`ppo_policy_loss` output: the loss and `ratio_stats` of its ratios (no gradient)."""
    loss: chex.Array  # scalar, or (sum, count) with return_sum_count
    clip_fraction: chex.Array  # fraction with |r - 1| > clip_eps (cleanrl's clipfrac)
    approx_kl_k1: chex.Array  # mean of -log r: k1 of KL(old || new) on samples of old
    approx_kl_k3: chex.Array  # mean of (r - 1) - log r: k3 of KL(old || new), >= 0
    ratio_mean: chex.Array
    ratio_max: chex.Array  # 0 for an all-zero mask


class RatioStats(NamedTuple):
    """`ratio_stats` output: token means, or `(sum, count)` pairs with return_sum_count."""
    clip_fraction: chex.Array
    approx_kl_k1: chex.Array
    approx_kl_k3: chex.Array
    ratio_mean: chex.Array
    ratio_max: chex.Array  # always a scalar; 0 for an all-zero mask


def ratio_stats(logprobs: chex.Array, old_logprobs: chex.Array, mask: chex.Array,
                clip_eps: float = 0.2, return_sum_count: bool = False) -> RatioStats:
    """Diagnostics of the importance ratio r = exp(logprobs - old_logprobs), without gradient:
    the clipped fraction (|r - 1| > clip_eps), k1 and k3 of KL(old || new) and the ratio's mean
    and max over valid positions.

    Args:
      logprobs, old_logprobs, mask: `[B, T]` (or `[B]` per action).
      clip_eps: the clip whose fraction is counted.
      return_sum_count: each mean as `(masked sum, masked count)`, so that means over several
        micro-batches are exact (`train.step.Trainer` divides summed pairs).
    """
    logprobs, old_logprobs, mask = _as_batch_time(logprobs, old_logprobs, mask)
    mask, logprobs, old_logprobs = _valid_f32(mask, logprobs, old_logprobs)
    log_ratio = jax.lax.stop_gradient(logprobs - old_logprobs)
    ratio = jnp.exp(log_ratio)
    count = jnp.sum(mask)
    reduce = lambda x: ((masked_sum(x, mask), count) if return_sum_count
                        else masked_mean(x, mask))
    return RatioStats(
        clip_fraction=reduce((jnp.abs(ratio - 1.0) > clip_eps).astype(jnp.float32)),
        approx_kl_k1=reduce(-log_ratio),
        approx_kl_k3=reduce(jnp.expm1(log_ratio) - log_ratio),
        ratio_mean=reduce(ratio),
        ratio_max=jnp.max(jnp.where(mask > 0, ratio, 0.0)))


def ppo_policy_loss(logprobs: chex.Array, old_logprobs: chex.Array, advantages: chex.Array,
                    mask: chex.Array, clip_eps: float = 0.2, dual_clip: float | None = None,
                    reduction: str = "token_mean", norm_constant: float | None = None,
                    return_sum_count: bool = False) -> PolicyLoss:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), optionally dual-clip (Ye et al. 2020).

      l_t = -min(r_t A_t, clip(r_t, 1 - eps, 1 + eps) A_t),  r_t = exp(logprobs_t - old_logprobs_t)
      dual clip c > 1: l_t = min(l_t, -c A_t) where A_t < 0 (Ye et al. 2020, eq. 5)
    The gradient is exactly 0 where r is clipped in the direction of A (r > 1 + eps, A > 0 or
    r < 1 - eps, A < 0) and, with dual clip, where A < 0 and r > c.

    Args:
      logprobs: `[B, T]` per-token log-probs under the policy being trained, or `[B]` / `[B, 1]`
        per-action (summed over the action's tokens) log-probs.
      old_logprobs: same shape, from the policy that sampled (stored; no gradient).
      advantages: same shape (no gradient).
      mask: same shape.
      clip_eps: epsilon > 0 of the clip; dual_clip: c > 1, or None.
      reduction, norm_constant: see `aggregate_loss`.
      return_sum_count: the loss as `aggregate_loss`'s `(sum, count)` and the stats as
        `ratio_stats`'s pairs.
    Returns: `PolicyLoss`: the loss and float32 stats (`ratio_stats`).

    Example (ratio 2 with A = 1 is clipped to 1.2; ratio 1 with A = -1 is not clipped):
      >>> import jax.numpy as jnp
      >>> from jaxrl_llm import losses
      >>> out = losses.ppo_policy_loss(jnp.log(jnp.array([[0.5, 0.9]])),
      ...                              jnp.log(jnp.array([[0.25, 0.9]])),
      ...                              jnp.array([[1., -1.]]), jnp.ones((1, 2)), clip_eps=0.2)
      >>> round(float(out.loss), 4), float(out.clip_fraction)
      (-0.1, 0.5)
    """
    logprobs, old_logprobs, advantages, mask = _as_batch_time(
        logprobs, old_logprobs, advantages, mask)
    _check_range("clip_eps", clip_eps, 0.0, low_open=True)
    if dual_clip is not None:
        _check_range("dual_clip", dual_clip, 1.0, low_open=True)
    _check_reduction(reduction, norm_constant)
    mask, logprobs, old_logprobs, advantages = _valid_f32(
        mask, logprobs, old_logprobs, jax.lax.stop_gradient(advantages))
    log_ratio = logprobs - jax.lax.stop_gradient(old_logprobs)
    ratio = jnp.exp(log_ratio)
    clipped_ratio = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    per_token = -jnp.minimum(ratio * advantages, clipped_ratio * advantages)
    if dual_clip is not None:
        per_token = jnp.where(advantages < 0, jnp.minimum(per_token, -dual_clip * advantages),
                              per_token)
    return PolicyLoss(aggregate_loss(per_token, mask, reduction, norm_constant, return_sum_count),
                      *ratio_stats(logprobs, old_logprobs, mask, clip_eps, return_sum_count))


def ppo_value_loss(values: chex.Array, old_values: chex.Array, returns: chex.Array,
                   mask: chex.Array, clip: float | None = 0.2, reduction: str = "token_mean",
                   norm_constant: float | None = None, return_sum_count: bool = False):
    """Clipped value loss (OpenAI baselines' PPO2; the seeds use clip 0.2).

      l_t = 0.5 * max((V_t - R_t)^2, (V_old_t + clip(V_t - V_old_t, -c, c) - R_t)^2)
      clip None: l_t = 0.5 * (V_t - R_t)^2

    Args:
      values: `[B, T]` (or `[B]`) predictions being trained; old_values: same shape, the values
        at collection time; returns: same shape, the targets (e.g. `gae`'s returns); mask: same.
      clip: c > 0, or None for the unclipped loss.
      reduction, norm_constant, return_sum_count: see `aggregate_loss`.
    Returns: float32 scalar, or `(sum, count)`.
    """
    values, old_values, returns, mask = _as_batch_time(values, old_values, returns, mask)
    if clip is not None:
        _check_range("clip", clip, 0.0, low_open=True)
    _check_reduction(reduction, norm_constant)
    mask, values, old_values, returns = _valid_f32(
        mask, values, jax.lax.stop_gradient(old_values), jax.lax.stop_gradient(returns))
    per_token = jnp.square(values - returns)
    if clip is not None:
        clipped_values = old_values + jnp.clip(values - old_values, -clip, clip)
        per_token = jnp.maximum(per_token, jnp.square(clipped_values - returns))
    return aggregate_loss(0.5 * per_token, mask, reduction, norm_constant, return_sum_count)


def explained_variance(values: chex.Array, returns: chex.Array, mask: chex.Array) -> chex.Array:
    """1 - Var[R - V] / Var[R] over the masked entries: how much of the returns' variance the
    critic explains (1 perfect, 0 no better than a constant, < 0 worse); 0-variance returns
    count as variance 1e-8.

    Args: values, returns, mask: the same shape (`[B, T]` or `[N]`).
    Returns: float32 scalar.

    >>> float(explained_variance(jnp.array([1., 2., 0.]), jnp.array([1., 3., 0.]),
    ...                          jnp.array([1., 1., 0.])))
    0.75
    """
    chex.assert_equal_shape([values, returns, mask])
    mask = mask.astype(jnp.float32)
    values, returns = values.astype(jnp.float32), returns.astype(jnp.float32)

    def variance(x):
        mean = masked_mean(x, mask)
        return masked_mean(jnp.square(x - mean), mask)

    return 1.0 - variance(returns - values) / jnp.maximum(variance(returns), 1e-8)


def kl_k1(logprobs: chex.Array, ref_logprobs: chex.Array) -> chex.Array:
    """k1 = log p - log p_ref (Schulman 2020, http://joschu.net/blog/kl-approx.html): unbiased
    for KL(p || p_ref) on samples from p, high variance, can be < 0. Any shape -> float32."""
    chex.assert_equal_shape([logprobs, ref_logprobs])
    return jnp.asarray(logprobs, jnp.float32) - jnp.asarray(ref_logprobs, jnp.float32)


def kl_k2(logprobs: chex.Array, ref_logprobs: chex.Array) -> chex.Array:
    """k2 = 0.5 (log p - log p_ref)^2 (Schulman 2020): biased, low variance, >= 0. Any shape
    -> float32."""
    return 0.5 * jnp.square(kl_k1(logprobs, ref_logprobs))


def kl_k3(logprobs: chex.Array, ref_logprobs: chex.Array) -> chex.Array:
    """k3 = (ratio - 1) - log ratio, ratio = p_ref / p (Schulman 2020; GRPO's KL, Shao et al.
    2024 eq. 4): unbiased for KL(p || p_ref) on samples from p, low variance, >= 0. Any shape
    -> float32.

    Example (p = 0.5, p_ref = 0.25: ratio 0.5, k3 = -0.5 + log 2):
      >>> import jax.numpy as jnp
      >>> from jaxrl_llm import losses
      >>> round(float(losses.kl_k3(jnp.log(0.5), jnp.log(0.25))), 4)
      0.1931
    """
    log_ratio = -kl_k1(logprobs, ref_logprobs)
    return jnp.expm1(log_ratio) - log_ratio  # expm1: exact near ratio = 1, where KL is tiny


_KL = dict(zip(KL_ESTIMATORS, (kl_k1, kl_k2, kl_k3)))


def kl_penalized_rewards(rewards: chex.Array, logprobs: chex.Array, ref_logprobs: chex.Array,
                         kl_coef: float | chex.Array, estimator: str = "k1") -> chex.Array:
    """KL in the reward (Ziegler et al. 2019, eq. 2): r_t - kl_coef * KL_t, per token or step.

    Args:
      rewards, logprobs (of the sampling policy), ref_logprobs: same shape (`[B, T]` or `[B]`);
        masked positions come out as garbage in, garbage out, and `gae` ignores them.
      kl_coef: beta >= 0 (e.g. from `adaptive_kl_update`); estimator: "k1" (default, as in
        Ziegler et al.), "k2" or "k3".
    Returns: float32, the shape of `rewards`.
    """
    chex.assert_equal_shape([rewards, logprobs, ref_logprobs])
    _check_choice("estimator", estimator, KL_ESTIMATORS)
    _check_range("kl_coef", kl_coef, 0.0)
    kl = jax.lax.stop_gradient(_KL[estimator](logprobs, ref_logprobs))
    return jnp.asarray(rewards, jnp.float32) - kl_coef * kl


def kl_loss(logprobs: chex.Array, ref_logprobs: chex.Array, mask: chex.Array,
            estimator: str = "k3", reduction: str = "token_mean",
            norm_constant: float | None = None, return_sum_count: bool = False):
    """KL in the loss (GRPO, Shao et al. 2024 eq. 3-4): aggregate of KL_t(p || p_ref).

    Add `kl_coef * kl_loss(...)` to the policy loss. k3 is GRPO's choice; its gradient is not
    an unbiased KL gradient but a regulariser pulling log p towards log p_ref.

    Args:
      logprobs: `[B, T]` (or `[B]`) of the policy being trained; ref_logprobs: same shape, of
        the frozen reference (no gradient); mask: same shape; estimator: "k1", "k2" or "k3".
      reduction, norm_constant, return_sum_count: see `aggregate_loss`.
    Returns: float32 scalar, or `(sum, count)`.
    """
    logprobs, ref_logprobs, mask = _as_batch_time(logprobs, ref_logprobs, mask)
    _check_choice("estimator", estimator, KL_ESTIMATORS)
    _check_reduction(reduction, norm_constant)
    mask, logprobs, ref_logprobs = _valid_f32(mask, logprobs, jax.lax.stop_gradient(ref_logprobs))
    return aggregate_loss(_KL[estimator](logprobs, ref_logprobs), mask, reduction, norm_constant,
                          return_sum_count)


def adaptive_kl_update(kl_coef: chex.Array, observed_kl: chex.Array, target: float,
                       horizon: float, n_steps: int | chex.Array) -> chex.Array:
    """Adaptive KL controller (Ziegler et al. 2019, sec. 2.2), one pure update.

      e = clip(observed_kl / target - 1, -0.2, 0.2)
      kl_coef <- kl_coef * (1 + e * n_steps / horizon)

    Args:
      kl_coef: scalar beta > 0 now; observed_kl: scalar mean KL(pi || ref) of the last batch.
      target: KL target > 0 (nats); horizon: > 0, in samples (10000 in the paper);
      n_steps: samples since the last update (the batch size).
    Returns: float32 scalar, the new kl_coef.
    """
    _check_range("target", target, 0.0, low_open=True)
    _check_range("horizon", horizon, 0.0, low_open=True)
    _check_range("n_steps", n_steps, 0)
    chex.assert_rank([kl_coef, observed_kl], 0)
    error = jnp.clip(jnp.asarray(observed_kl, jnp.float32) / target - 1.0, -0.2, 0.2)
    return jnp.asarray(kl_coef, jnp.float32) * (1.0 + error * n_steps / horizon)


def entropy_bonus(logits: chex.Array, mask: chex.Array, reduction: str = "token_mean",
                  norm_constant: float | None = None, return_sum_count: bool = False):
    """Aggregated entropy of the policy: subtract `entropy_coef * entropy_bonus(...)` from the
    loss (Mnih et al. 2016; Schulman et al. 2017, eq. 9). Entropies already computed (e.g. by
    `score_responses`) go straight to `aggregate_loss(entropy, mask)`.

    Args:
      logits: `[B, T, V]`; mask: `[B, T]`.
      reduction, norm_constant, return_sum_count: see `aggregate_loss`.
    Returns: float32 scalar (nats), or `(sum, count)`.
    """
    chex.assert_rank([logits, mask], [3, 2])
    chex.assert_equal_shape_prefix([logits, mask], 2)
    _check_reduction(reduction, norm_constant)
    # Padding logits may be garbage: replace them before the softmax, not after (gradient).
    logits = jnp.where(jnp.asarray(mask)[..., None] > 0, jnp.asarray(logits, jnp.float32), 0.0)
    return aggregate_loss(entropy_from_logits(logits), mask, reduction, norm_constant,
                          return_sum_count)


def reinforce_loss(logprobs: chex.Array, returns: chex.Array, baseline: chex.Array | None,
                   mask: chex.Array, reduction: str = "token_mean",
                   norm_constant: float | None = None, return_sum_count: bool = False):
    """REINFORCE with a baseline (Williams 1992): l_t = -(R - b) * log p_t.

    The advantage R - b carries no gradient: a learned baseline is trained by its own loss
    (e.g. `ppo_value_loss` with clip None). With `[P, k]` rewards of k samples per prompt, pass
    `rewards.reshape(-1)` and `mean_baseline(rewards).reshape(-1)` (notebook 003), or
    `rloo_advantages(rewards).reshape(-1)` as `returns` with baseline None.

    Args:
      logprobs: `[B, T]` per-token (or `[B]` per-sequence summed) log-probs being trained.
      returns: `[B]` per sequence (broadcast over its tokens) or `[B, T]` per token.
      baseline: shape of `returns` (a group mean, or a learned value), or None (no baseline).
      mask: shape of `logprobs`.
      reduction, norm_constant, return_sum_count: see `aggregate_loss` ("sum" is the textbook
        sum over sequences and tokens).
    Returns: float32 scalar, or `(sum, count)`.
    """
    chex.assert_rank([logprobs, returns], {1, 2})
    chex.assert_equal_shape([logprobs, mask])
    chex.assert_equal_shape_prefix([logprobs, returns], 1)
    _check_reduction(reduction, norm_constant)
    returns = jnp.asarray(returns, jnp.float32)
    if baseline is not None:
        chex.assert_equal_shape([returns, baseline])
        returns = returns - jnp.asarray(baseline, jnp.float32)
    advantages = jax.lax.stop_gradient(returns)
    logprobs, mask = _as_batch_time(logprobs, mask)
    if advantages.ndim == 1:
        advantages = jnp.broadcast_to(advantages[:, None], logprobs.shape)
    chex.assert_equal_shape([logprobs, advantages])
    mask, logprobs, advantages = _valid_f32(mask, logprobs, advantages)
    return aggregate_loss(-advantages * logprobs, mask, reduction, norm_constant,
                          return_sum_count)


def _check_group(rewards, name):
    chex.assert_rank(rewards, 2)
    if rewards.shape[1] < 2:
        raise ValueError(f"{name} needs k >= 2 samples per prompt (rewards [num_prompts, k]), "
                         f"got k = {rewards.shape[1]}")


def _constant_groups(rewards):
    """`[P, 1]` True where all k rewards are equal: no signal, and float rounding of the mean
    must not turn into a nonzero advantage (or +-1 / eps after GRPO's std scaling)."""
    return jnp.max(rewards, axis=1, keepdims=True) == jnp.min(rewards, axis=1, keepdims=True)


def mean_baseline(rewards: chex.Array) -> chex.Array:
    """Baseline b_i = mean_j r_j over the k samples of the same prompt (notebook 003), own
    sample included (slightly biased; `rloo_advantages` leaves it out).

    Args: rewards `[num_prompts, k]`. Returns: `[num_prompts, k]` float32.
    """
    chex.assert_rank(rewards, 2)
    rewards = jnp.asarray(rewards, jnp.float32)
    return jnp.broadcast_to(jnp.mean(rewards, axis=1, keepdims=True), rewards.shape)


def rloo_advantages(rewards: chex.Array) -> chex.Array:
    """REINFORCE leave-one-out (Ahmadian et al. 2024, eq. 6; Kool et al. 2019):
    A_i = r_i - 1 / (k - 1) * sum_{j != i} r_j = k / (k - 1) * (r_i - mean_j r_j).

    Args: rewards `[num_prompts, k]`, k >= 2.
    Returns: `[num_prompts, k]` float32; each row sums to 0, a constant row is all 0.

    Example (each sample against the mean of the other three):
      >>> import jax.numpy as jnp
      >>> from jaxrl_llm import losses
      >>> [round(a, 4) for a in losses.rloo_advantages(jnp.array([[1., 0., 0., 1.]]))[0].tolist()]
      [0.6667, -0.6667, -0.6667, 0.6667]
    """
    _check_group(rewards, "rloo_advantages")
    rewards = jnp.asarray(rewards, jnp.float32)
    k = rewards.shape[1]
    others_mean = (jnp.sum(rewards, axis=1, keepdims=True) - rewards) / (k - 1)
    return jnp.where(_constant_groups(rewards), 0.0, rewards - others_mean)


def grpo_advantages(rewards: chex.Array, scale_by_std: bool = True,
                    eps: float = 1e-6) -> chex.Array:
    """Group-relative advantages (GRPO, Shao et al. 2024, sec. 4.1.2), every token of a response
    gets its response's A_i:
      scale_by_std=True:  A_i = (r_i - mean_j r_j) / (std_j r_j + eps)
      scale_by_std=False: A_i = r_i - mean_j r_j   (Dr. GRPO, Liu et al. 2025: no std bias)
    std with Bessel's correction (ddof=1), as TRL and verl compute it.

    Args: rewards `[num_prompts, k]`, k >= 2; eps > 0.
    Returns: `[num_prompts, k]` float32; a group of identical rewards gives exactly 0.
    """
    _check_group(rewards, "grpo_advantages")
    _check_range("eps", eps, 0.0, low_open=True)
    rewards = jnp.asarray(rewards, jnp.float32)
    centered = rewards - jnp.mean(rewards, axis=1, keepdims=True)
    if scale_by_std:
        centered = centered / (jnp.std(rewards, axis=1, keepdims=True, ddof=1) + eps)
    return jnp.where(_constant_groups(rewards), 0.0, centered)


def bradley_terry_loss(chosen_rewards: chex.Array, rejected_rewards: chex.Array,
                       mask: chex.Array | None = None, reduction: str = "token_mean"
                       ) -> chex.Array:
    """Reward-model loss on preference pairs (Bradley & Terry 1952; Ouyang et al. 2022, eq. 1):
    -log sigmoid(r(x, y_chosen) - r(x, y_rejected)), written as softplus(-margin) so that a
    pair ranked wrong by a wide margin gives a finite loss and gradient.

    Args: chosen_rewards, rejected_rewards `[P]` (one scalar reward per pair member); mask `[P]`
      (padded pairs 0; default all 1); reduction "token_mean" (mean over pairs) or "sum".
    Returns: a scalar float32.

    Example (a tie costs log 2; ranking the chosen one higher costs less):
      >>> import jax.numpy as jnp
      >>> from jaxrl_llm import losses
      >>> [round(float(losses.bradley_terry_loss(jnp.array([c]), jnp.array([0.]))), 4)
      ...  for c in (0., 2.)]
      [0.6931, 0.1269]
    """
    chex.assert_rank([chosen_rewards, rejected_rewards], 1)
    chex.assert_equal_shape([chosen_rewards, rejected_rewards])
    if reduction not in ("token_mean", "sum"):
        raise ValueError(f"bradley_terry_loss reduction must be 'token_mean' or 'sum', got "
                         f"{reduction!r}")
    mask = jnp.ones(chosen_rewards.shape, jnp.float32) if mask is None else mask
    mask, chosen, rejected = _valid_f32(mask, chosen_rewards, rejected_rewards)
    per_pair = jax.nn.softplus(rejected - chosen)
    return (masked_sum(per_pair, mask) if reduction == "sum"
            else masked_mean(per_pair, mask))
