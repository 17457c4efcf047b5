"""RL math against independent references: python loops, numpy, rlax, hand-computed cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import rlax

from jaxrl_llm import losses

REDUCTIONS = [("token_mean", None), ("seq_mean_token_mean", None), ("seq_sum_norm", 8.0),
              ("sum", None)]


def reduce_numpy(per_token, mask, reduction, norm_constant=None):
    """The four aggregations, written out with numpy row by row."""
    rows = [b for b in range(len(mask)) if mask[b].sum() > 0]
    if reduction == "token_mean":
        return (per_token * mask).sum() / mask.sum() if rows else 0.0
    if reduction == "seq_mean_token_mean":
        return np.mean([(per_token[b] * mask[b]).sum() / mask[b].sum() for b in rows])
    if reduction == "seq_sum_norm":
        return np.mean([(per_token[b] * mask[b]).sum() / norm_constant for b in rows])
    return (per_token * mask).sum()


SHAPE = (5, 6)  # one shape for the random [B, T] cases: eager JAX compiles per shape


def random_mask(rng, shape=SHAPE, keep=0.6):
    mask = (rng.random(shape) < keep).astype(np.float32)
    mask[0] = 0.0  # an all-padding row (micro-batch filler) must count for nothing
    mask[1, 0] = 1.0
    return mask


def garbage_at_padding(rng, x, mask):
    """Same valid entries, padding replaced by huge numbers, inf and NaN."""
    junk = rng.choice(np.array([1e6, -1e6, np.inf, -np.inf, np.nan], np.float32), x.shape)
    return np.where(mask > 0, x, junk).astype(np.float32)


# ---------------------------------------------------------------- masked reductions


def test_masked_sum_mean_match_numpy_with_weights_and_garbage_padding():
    rng = np.random.default_rng(0)
    values = rng.normal(size=SHAPE).astype(np.float32)
    weights = random_mask(rng) * rng.uniform(0.2, 2.0, SHAPE).astype(np.float32)
    noisy = garbage_at_padding(rng, values, weights)
    np.testing.assert_allclose(float(losses.masked_sum(noisy, weights)), (values * weights).sum(),
                               rtol=1e-5)
    np.testing.assert_allclose(float(losses.masked_mean(noisy, weights)),
                               (values * weights).sum() / weights.sum(), rtol=1e-5)
    row_means = np.asarray(losses.masked_mean(noisy, weights, axis=1))
    assert row_means[0] == 0.0  # empty row: 0, not NaN
    np.testing.assert_allclose(row_means[1:], (values * weights).sum(1)[1:] / weights.sum(1)[1:],
                               rtol=1e-5)
    assert float(losses.masked_mean(noisy, np.zeros_like(weights))) == 0.0


def test_masked_whiten_matches_numpy_and_ignores_padding():
    rng = np.random.default_rng(1)
    values = rng.normal(2.0, 3.0, size=SHAPE).astype(np.float32)
    mask = random_mask(rng)
    valid = values[mask > 0]
    ref = (values - valid.mean()) / np.sqrt(valid.var() + 1e-8)
    out = np.asarray(losses.masked_whiten(garbage_at_padding(rng, values, mask), mask))
    np.testing.assert_allclose(out, np.where(mask > 0, ref, 0.0), atol=1e-5)
    kept = np.asarray(losses.masked_whiten(values, mask, shift_mean=False))
    np.testing.assert_allclose(kept, np.where(mask > 0, ref + valid.mean(), 0.0), atol=1e-5)
    assert np.all(np.asarray(losses.masked_whiten(values, np.zeros_like(mask))) == 0.0)


def test_aggregations_by_hand():
    per_token = jnp.array([[1.0, 3.0, 0.0], [5.0, 0.0, 0.0], [7.0, 7.0, 7.0]])
    mask = jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    agg = lambda *a, **k: float(losses.aggregate_loss(per_token, mask, *a, **k))
    assert agg("token_mean") == pytest.approx(9.0 / 3)
    assert agg("seq_mean_token_mean") == pytest.approx((2.0 + 5.0) / 2)  # empty row not counted
    assert agg("seq_sum_norm", norm_constant=4.0) == pytest.approx((4.0 / 4 + 5.0 / 4) / 2)
    assert agg("sum") == pytest.approx(9.0)
    total, count = losses.aggregate_loss(per_token, mask, "seq_mean_token_mean",
                                         return_sum_count=True)
    assert (float(total), float(count)) == (7.0, 2.0)


@pytest.mark.parametrize("reduction,norm_constant", REDUCTIONS)
def test_aggregate_matches_numpy_and_zero_mask_gives_zero(reduction, norm_constant):
    rng = np.random.default_rng(2)
    per_token = rng.normal(size=SHAPE).astype(np.float32)
    mask = random_mask(rng)
    out = losses.aggregate_loss(garbage_at_padding(rng, per_token, mask), mask, reduction,
                                norm_constant)
    np.testing.assert_allclose(float(out), reduce_numpy(per_token, mask, reduction,
                                                        norm_constant), rtol=1e-5)
    zero = losses.aggregate_loss(per_token, np.zeros_like(mask), reduction, norm_constant)
    assert float(zero) == 0.0


# ---------------------------------------------------------------- GAE


def gae_reference(rewards, values, next_values, terminated, truncated, mask, gamma, lam):
    """A_t = sum_l (gamma lam)^l delta_{t_l} over the valid steps t_0 = t, t_1, ... of the same
    episode (explicit sums, not the recursion)."""
    advantages = np.zeros(rewards.shape)
    for b in range(rewards.shape[0]):
        steps = [t for t in range(rewards.shape[1]) if mask[b, t]]
        for i, t in enumerate(steps):
            weight = 1.0
            for u in steps[i:]:
                future = 0.0 if terminated[b, u] else next_values[b, u]
                advantages[b, t] += weight * (rewards[b, u] + gamma * future - values[b, u])
                if terminated[b, u] or truncated[b, u]:
                    break
                weight *= gamma * lam
    return advantages


def random_rollout(rng, batch=6, length=10):
    """Rows holding several episodes that end inside the window (terminated or truncated), a
    window end that bootstraps, masked holes and right padding; garbage wherever unused."""
    rewards, values = (rng.normal(size=(batch, length)).astype(np.float32) for _ in range(2))
    mask = (rng.random((batch, length)) < 0.8).astype(np.float32)
    mask[:, 0] = 1.0
    for b in range(batch):
        mask[b, rng.integers(length // 2, length + 1):] = 0.0  # right padding
    terminated, truncated = np.zeros_like(mask), np.zeros_like(mask)
    next_values = np.full_like(values, np.nan)  # must never be read where it stays NaN
    for b in range(batch):
        steps = np.flatnonzero(mask[b])
        for i, t in enumerate(steps):
            kind = rng.choice(["continue", "terminated", "truncated"], p=[0.6, 0.2, 0.2])
            if i == len(steps) - 1 and kind == "continue":
                next_values[b, t] = rng.normal()  # the window end: bootstrap value
            elif kind == "continue":
                next_values[b, t] = values[b, steps[i + 1]]
            elif kind == "terminated":
                terminated[b, t] = 1.0
            else:
                truncated[b, t], next_values[b, t] = 1.0, rng.normal()  # V(final observation)
    return rewards, values, next_values, terminated, truncated, mask


def call_gae(rewards, values, next_values, terminated, truncated, mask, gamma=0.97, lam=0.9):
    return losses.gae(rewards, values, next_values, terminated, mask, gamma=gamma, lam=lam,
                      truncated=truncated)


def test_gae_equals_explicit_sums_with_both_episode_ends_and_holes():
    rng = np.random.default_rng(3)
    rollout = random_rollout(rng)
    assert rollout[3].sum() > 0 and rollout[4].sum() > 0
    advantages, returns = call_gae(*rollout)
    ref = gae_reference(*rollout, 0.97, 0.9)
    np.testing.assert_allclose(np.asarray(advantages), ref, atol=1e-5)
    mask = rollout[5]
    np.testing.assert_allclose(np.asarray(returns), np.where(mask > 0, ref + rollout[1], 0.0),
                               atol=1e-5)


def test_gae_padding_never_leaks_and_zero_mask_is_zero():
    rng = np.random.default_rng(4)
    rewards, values, next_values, terminated, truncated, mask = random_rollout(rng)
    clean = call_gae(rewards, values, np.nan_to_num(next_values), terminated, truncated, mask)
    noisy = call_gae(*(garbage_at_padding(rng, x, mask) for x in (rewards, values)),
                     next_values, terminated, truncated, mask)
    for a, b in zip(clean, noisy):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
        assert np.all(np.asarray(a)[mask == 0] == 0.0)
    zero = call_gae(rewards, values, next_values, terminated, truncated, np.zeros_like(mask))
    assert all(np.all(np.asarray(x) == 0.0) for x in zero)


def test_gae_matches_rlax_with_terminations_inside_the_window():
    """rlax: time-major single trajectory, discount_t = gamma (1 - terminated_t), values of
    length T + 1 whose last entry is the bootstrap."""
    rng = np.random.default_rng(5)
    rewards = rng.normal(size=(6, 10)).astype(np.float32)
    values = rng.normal(size=(6, 11)).astype(np.float32)
    terminated = (rng.random((6, 10)) < 0.2).astype(np.float32)
    ref = jax.vmap(rlax.truncated_generalized_advantage_estimation, (0, 0, None, 0))(
        rewards, 0.99 * (1 - terminated), 0.95, values)
    ours, _ = losses.gae(rewards, values[:, :-1], values[:, 1:], terminated,
                         np.ones_like(rewards), gamma=0.99, lam=0.95)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=1e-5)


def test_gae_truncation_inside_the_window_equals_two_rlax_segments():
    rng = np.random.default_rng(6)
    rewards = rng.normal(size=8).astype(np.float32)
    values = rng.normal(size=8).astype(np.float32)
    final_value, bootstrap = 2.5, -1.5  # V(observation cut at step 3), V(s_8)
    first = rlax.truncated_generalized_advantage_estimation(
        rewards[:4], np.full(4, 0.9, np.float32), 0.8, np.append(values[:4], final_value))
    second = rlax.truncated_generalized_advantage_estimation(
        rewards[4:], np.full(4, 0.9, np.float32), 0.8, np.append(values[4:], bootstrap))
    next_values = np.append(values[1:], bootstrap)
    next_values[3] = final_value
    truncated = np.zeros(8, np.float32)
    truncated[3] = 1.0
    ours, _ = losses.gae(rewards[None], values[None], next_values[None],
                         np.zeros((1, 8)), np.ones((1, 8)), gamma=0.9, lam=0.8,
                         truncated=truncated[None])
    np.testing.assert_allclose(np.asarray(ours[0]), np.concatenate([first, second]), atol=1e-5)


def test_token_level_gae_equals_the_sliced_textbook_loop():
    """Reward on the last real token plus per-token KL penalties, right-padded responses: the
    padded batch gives what the textbook loop gives on each unpadded response (V after = 0)."""
    rng = np.random.default_rng(7)
    lengths = np.array([5, 1, 3, 10, 7, 2])
    mask = (np.arange(10)[None] < lengths[:, None]).astype(np.float32)
    values, logprobs, ref_logprobs = (rng.normal(size=(6, 10)).astype(np.float32)
                                      for _ in range(3))
    rewards = np.zeros((6, 10), np.float32)
    rewards[np.arange(6), lengths - 1] = rng.normal(size=6)  # the score of each response
    rewards = losses.kl_penalized_rewards(rewards, logprobs, ref_logprobs, kl_coef=0.1)
    advantages, returns = losses.gae(
        garbage_at_padding(rng, np.asarray(rewards), mask), garbage_at_padding(rng, values, mask),
        losses.next_step_values(values, mask), np.zeros_like(mask), mask, gamma=1.0, lam=0.95)
    for b, n in enumerate(lengths):
        r = np.asarray(rewards)[b, :n].astype(np.float64)
        v = values[b, :n].astype(np.float64)
        ref, last = np.zeros(n), 0.0
        for t in reversed(range(n)):
            delta = r[t] + (v[t + 1] if t + 1 < n else 0.0) - v[t]
            ref[t] = last = delta + 0.95 * last
        np.testing.assert_allclose(np.asarray(advantages)[b, :n], ref, atol=1e-5)
        np.testing.assert_allclose(np.asarray(returns)[b, :n], ref + v, atol=1e-5)
    assert np.all(np.asarray(advantages)[mask == 0] == 0.0)


def test_next_step_values_by_hand():
    values = np.array([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]], np.float32)
    mask = np.array([[1, 0, 1, 0], [1, 1, 1, 1]], np.float32)
    out = losses.next_step_values(values, mask, bootstrap_values=np.array([9.0, 10.0]))
    np.testing.assert_array_equal(np.asarray(out), [[3, 0, 9, 0], [6, 7, 8, 10]])
    np.testing.assert_array_equal(np.asarray(losses.next_step_values(values, mask))[1],
                                  [6, 7, 8, 0])


def test_gae_jit_vmap_grad_and_float32():
    rng = np.random.default_rng(8)
    rollout = [np.nan_to_num(x) for x in random_rollout(rng)]
    eager = call_gae(*rollout)
    jitted = jax.jit(call_gae)
    stacked = jax.jit(jax.vmap(call_gae))(*(np.stack([x, x[::-1]]) for x in rollout))
    flipped = jitted(*(x[::-1] for x in rollout))
    for e, j, s, f in zip(eager, jitted(*rollout), stacked, flipped):  # (advantages, returns)
        np.testing.assert_allclose(np.asarray(j), np.asarray(e), atol=1e-5)
        np.testing.assert_allclose(np.asarray(s[0]), np.asarray(e), atol=1e-5)
        np.testing.assert_allclose(np.asarray(s[1]), np.asarray(f), atol=1e-5)
    bf16 = jitted(*(jnp.asarray(x, jnp.bfloat16) for x in rollout))
    assert all(x.dtype == jnp.float32 for x in bf16)
    grad = jax.jit(jax.grad(lambda v: jnp.sum(call_gae(rollout[0], v, *rollout[2:])[0])))(
        rollout[1])
    assert np.all(np.isfinite(np.asarray(grad)))


# ---------------------------------------------------------------- PPO


def ppo_numpy(logprobs, old, adv, mask, eps, dual_clip=None, reduction="token_mean",
              norm_constant=None):
    """Per-token clipped surrogate and its gradient wrt logprobs, written out case by case."""
    ratio = np.exp(logprobs.astype(np.float64) - old)
    unclipped, clipped = ratio * adv, np.clip(ratio, 1 - eps, 1 + eps) * adv
    per_token = -np.minimum(unclipped, clipped)
    grad = np.where(unclipped <= clipped, -ratio * adv, 0.0)  # d/dlogp of the active branch
    if dual_clip is not None:
        capped = (adv < 0) & (per_token > -dual_clip * adv)
        per_token = np.where(capped, -dual_clip * adv, per_token)
        grad = np.where(capped, 0.0, grad)
    return reduce_numpy(per_token, mask, reduction, norm_constant), grad


def random_ppo_batch(rng, shape=SHAPE, spread=0.5):
    logprobs = (rng.normal(size=shape) * spread - 1).astype(np.float32)
    old = (logprobs + rng.normal(size=shape) * spread).astype(np.float32)
    adv = rng.normal(size=shape).astype(np.float32)
    return logprobs, old, adv, random_mask(rng, shape)


@pytest.mark.parametrize("reduction,norm_constant", REDUCTIONS)
@pytest.mark.parametrize("dual_clip", [None, 2.0])
def test_ppo_policy_loss_value_and_stats_match_numpy(reduction, norm_constant, dual_clip):
    rng = np.random.default_rng(9)
    logprobs, old, adv, mask = random_ppo_batch(rng)
    out = losses.ppo_policy_loss(logprobs, old, adv, mask, clip_eps=0.2, dual_clip=dual_clip,
                                 reduction=reduction, norm_constant=norm_constant)
    ref_loss, _ = ppo_numpy(logprobs, old, adv, mask, 0.2, dual_clip, reduction, norm_constant)
    np.testing.assert_allclose(float(out.loss), ref_loss, rtol=1e-5)
    log_ratio = (logprobs.astype(np.float64) - old)[mask > 0]
    ratio = np.exp(log_ratio)
    np.testing.assert_allclose(float(out.clip_fraction), np.mean(np.abs(ratio - 1) > 0.2),
                               rtol=1e-6)
    np.testing.assert_allclose(float(out.approx_kl_k1), np.mean(-log_ratio), rtol=1e-5)
    np.testing.assert_allclose(float(out.approx_kl_k3), np.mean(ratio - 1 - log_ratio),
                               rtol=1e-5)
    np.testing.assert_allclose(float(out.ratio_mean), ratio.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(out.ratio_max), ratio.max(), rtol=1e-5)


def test_ratio_stat_pairs_summed_over_micro_batches_are_the_full_batch_means():
    rng = np.random.default_rng(12)
    logprobs, old, _, mask = random_ppo_batch(rng)
    full = losses.ratio_stats(logprobs, old, mask, clip_eps=0.2)
    halves = [losses.ratio_stats(logprobs[rows], old[rows], mask[rows], clip_eps=0.2,
                                 return_sum_count=True)
              for rows in (slice(0, 2), slice(2, None))]  # micro-batches of unequal counts
    for name in ("clip_fraction", "approx_kl_k1", "approx_kl_k3", "ratio_mean"):
        total = sum(float(getattr(h, name)[0]) for h in halves)
        count = sum(float(getattr(h, name)[1]) for h in halves)
        np.testing.assert_allclose(total / count, float(getattr(full, name)), rtol=1e-5)
    assert sum(float(h.clip_fraction[1]) for h in halves) == mask.sum()
    paired = losses.ppo_policy_loss(logprobs, old, np.ones_like(old), mask, return_sum_count=True)
    np.testing.assert_allclose(paired.clip_fraction[0] / paired.clip_fraction[1],
                               full.clip_fraction, rtol=1e-6)


@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_ppo_gradient_matches_numpy_and_is_zero_exactly_where_clipped(dual_clip):
    rng = np.random.default_rng(10)
    logprobs, old, adv, _ = random_ppo_batch(rng, spread=1.5)
    mask = np.ones_like(adv)
    loss = lambda lp: losses.ppo_policy_loss(lp, old, adv, mask, dual_clip=dual_clip).loss
    grad = np.asarray(jax.grad(loss)(jnp.asarray(logprobs)))
    _, ref = ppo_numpy(logprobs, old, adv, mask, 0.2, dual_clip)
    np.testing.assert_allclose(grad, ref / mask.sum(), atol=1e-6)
    ratio = np.exp(logprobs - old)
    with_advantage = ((ratio > 1.2) & (adv > 0)) | ((ratio < 0.8) & (adv < 0))
    against = ((ratio > 1.2) & (adv < 0)) | ((ratio < 0.8) & (adv > 0))
    if dual_clip is not None:
        capped = (adv < 0) & (ratio > dual_clip)
        assert capped.any()
        assert np.all(grad[capped] == 0.0)
        against &= ~capped
    assert with_advantage.any() and against.any()
    assert np.all(grad[with_advantage] == 0.0)
    assert np.all(grad[against] != 0.0)  # pessimistic bound: the unclipped term still pulls


def test_ppo_policy_loss_by_hand():
    out = losses.ppo_policy_loss(jnp.log(jnp.array([[10.0, 10.0]])), jnp.zeros((1, 2)),
                                 jnp.array([[-1.0, 1.0]]), jnp.ones((1, 2)), dual_clip=3.0)
    # A < 0: -min(-10, -1.2) = 10, capped at 3; A > 0: -min(10, 1.2) = -1.2.
    assert float(out.loss) == pytest.approx((3.0 - 1.2) / 2)
    assert float(out.clip_fraction) == 1.0 and float(out.ratio_max) == pytest.approx(10.0)
    shrinking = losses.ppo_policy_loss(jnp.log(jnp.array([[0.5, 0.25]])), jnp.zeros((1, 2)),
                                       jnp.ones((1, 2)), jnp.array([[1.0, 0.0]]))
    assert float(shrinking.ratio_max) == pytest.approx(0.5)  # not the padding's ratio
    assert float(shrinking.loss) == pytest.approx(-0.5)  # -min(0.5 * 1, 0.8 * 1): pessimistic


def test_ppo_per_action_logprobs_shapes_agree():
    rng = np.random.default_rng(11)
    logprobs, old, adv = (rng.normal(size=7).astype(np.float32) for _ in range(3))
    mask = np.array([1, 1, 0, 1, 1, 1, 0], np.float32)
    flat = losses.ppo_policy_loss(logprobs, old, adv, mask)
    column = losses.ppo_policy_loss(*(x[:, None] for x in (logprobs, old, adv, mask)))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), flat, column)
    ref, _ = ppo_numpy(logprobs[:, None], old[:, None], adv[:, None], mask[:, None], 0.2)
    np.testing.assert_allclose(float(flat.loss), ref, rtol=1e-5)


def test_value_loss_and_gradient_match_numpy():
    rng = np.random.default_rng(12)
    values, old, returns = (rng.normal(size=SHAPE).astype(np.float32) for _ in range(3))
    mask = random_mask(rng)
    clipped = old + np.clip(values - old, -0.2, 0.2)
    unclipped_err, clipped_err = (values - returns) ** 2, (clipped - returns) ** 2
    ref = reduce_numpy(0.5 * np.maximum(unclipped_err, clipped_err), mask, "token_mean")
    np.testing.assert_allclose(float(losses.ppo_value_loss(values, old, returns, mask)), ref,
                               rtol=1e-5)
    np.testing.assert_allclose(
        float(losses.ppo_value_loss(values, old, returns, mask, clip=None)),
        reduce_numpy(0.5 * unclipped_err, mask, "token_mean"), rtol=1e-5)
    grad = jax.grad(lambda v: losses.ppo_value_loss(v, old, returns, mask))(jnp.asarray(values))
    inside = np.abs(values - old) < 0.2
    ref_grad = np.where(unclipped_err >= clipped_err, values - returns,
                        np.where(inside, clipped - returns, 0.0)) * mask / mask.sum()
    np.testing.assert_allclose(np.asarray(grad), ref_grad, atol=1e-6)


def test_value_loss_by_hand():
    # V moved from 0 to 1 with return 2: clipped V = 0.2, so max(1, 3.24) / 2 = 1.62.
    out = losses.ppo_value_loss(jnp.ones((1, 1)), jnp.zeros((1, 1)), jnp.full((1, 1), 2.0),
                                jnp.ones((1, 1)), clip=0.2)
    assert float(out) == pytest.approx(1.62)


def all_losses(arrays, mask, reduction="token_mean", norm_constant=None, **kw):
    """Every masked loss of the module on the same arrays: a dict of pytrees of scalars."""
    logprobs, old, adv, logits = arrays
    args = dict(reduction=reduction, norm_constant=norm_constant, **kw)
    return dict(
        policy=losses.ppo_policy_loss(logprobs, old, adv, mask, dual_clip=3.0, **args),
        value=losses.ppo_value_loss(logprobs, old, adv, mask, **args),
        kl=losses.kl_loss(logprobs, old, mask, **args),
        reinforce=losses.reinforce_loss(logprobs, adv, old, mask, **args),
        entropy=losses.entropy_bonus(logits, mask, **args),
        aggregate=losses.aggregate_loss(adv, mask, **args))


def random_loss_inputs(rng):
    logprobs, old, adv, mask = random_ppo_batch(rng)
    logits = rng.normal(size=SHAPE + (9,)).astype(np.float32)
    return [logprobs, old, adv, logits], mask


@pytest.mark.parametrize("reduction,norm_constant", REDUCTIONS)
def test_padding_never_changes_any_loss_stat_or_gradient(reduction, norm_constant):
    rng = np.random.default_rng(13)
    arrays, mask = random_loss_inputs(rng)
    noisy = [garbage_at_padding(rng, x, mask) for x in arrays[:3]]
    noisy.append(np.where(mask[..., None] > 0, arrays[3], np.nan).astype(np.float32))

    def total(differentiable, others):
        out = all_losses([differentiable[0], others[0], others[1], differentiable[1]], mask,
                         reduction, norm_constant)
        return sum(jax.tree.leaves(out)), out

    value_and_grad = jax.jit(jax.value_and_grad(total, has_aux=True))  # compiles once
    grads = []
    for inputs in (arrays, noisy):
        (_, out), grad = value_and_grad(
            [jnp.asarray(inputs[0]), jnp.asarray(inputs[3])], inputs[1:3])
        grads.append(grad)
        if inputs is arrays:
            clean = out
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), clean, out)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), *grads)
    assert np.all(np.asarray(grads[1][0])[mask == 0] == 0.0)


@pytest.mark.parametrize("reduction,norm_constant", REDUCTIONS)
def test_all_zero_mask_gives_finite_zeros_and_gradients(reduction, norm_constant):
    rng = np.random.default_rng(14)
    arrays, mask = random_loss_inputs(rng)
    zero_mask = np.zeros_like(mask)
    total = lambda lp: sum(jax.tree.leaves(all_losses([lp] + arrays[1:], zero_mask, reduction,
                                                     norm_constant)))
    out = all_losses(arrays, zero_mask, reduction, norm_constant)
    assert all(float(x) == 0.0 for x in jax.tree.leaves(out))
    assert np.all(np.asarray(jax.jit(jax.grad(total))(arrays[0])) == 0.0)


@pytest.mark.parametrize("reduction,norm_constant", REDUCTIONS[:3])
def test_sum_and_count_over_micro_batches_give_the_full_batch_loss(reduction, norm_constant):
    rng = np.random.default_rng(15)
    arrays, mask = random_loss_inputs(rng)
    full = all_losses(arrays, mask, reduction, norm_constant)
    # Micro-batches of rows [0, 2) and [2, B), the other rows padded out (padding changes
    # nothing: tested above), so that every call has one shape and compiles once.
    in_first = (np.arange(SHAPE[0]) < 2)[:, None]
    parts = [all_losses(arrays, mask * rows, reduction, norm_constant, return_sum_count=True)
             for rows in (in_first, ~in_first)]
    for name, loss in full.items():
        first, second = parts[0][name], parts[1][name]
        if name == "policy":
            first, second, loss = first.loss, second.loss, loss.loss
        accumulated = (first[0] + second[0]) / (first[1] + second[1])
        np.testing.assert_allclose(float(accumulated), float(loss), rtol=1e-5, err_msg=name)


def test_ppo_jit_equals_eager():
    rng = np.random.default_rng(16)
    batch = random_ppo_batch(rng)
    fn = jax.jit(losses.ppo_policy_loss, static_argnames=("clip_eps", "dual_clip", "reduction"))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
                 fn(*batch, clip_eps=0.1, dual_clip=3.0, reduction="seq_mean_token_mean"),
                 losses.ppo_policy_loss(*batch, clip_eps=0.1, dual_clip=3.0,
                                        reduction="seq_mean_token_mean"))


# ---------------------------------------------------------------- KL


def test_kl_estimators_by_hand():
    logp, ref = np.log(np.array([0.5, 0.2])), np.log(np.array([0.25, 0.4]))
    np.testing.assert_allclose(np.asarray(losses.kl_k1(logp, ref)), [np.log(2), np.log(0.5)],
                               rtol=1e-6)
    np.testing.assert_allclose(np.asarray(losses.kl_k2(logp, ref)),
                               [0.5 * np.log(2) ** 2, 0.5 * np.log(0.5) ** 2], rtol=1e-6)
    # r = p_ref / p = 0.5, 2: (r - 1) - log r.
    np.testing.assert_allclose(np.asarray(losses.kl_k3(logp, ref)),
                               [-0.5 - np.log(0.5), 1 - np.log(2)], rtol=1e-6)


def test_kl_estimators_converge_to_the_exact_categorical_kl():
    rng = np.random.default_rng(17)
    p, q = rng.dirichlet(np.ones(6)), rng.dirichlet(np.ones(6))
    exact = float(np.sum(p * np.log(p / q)))
    samples = rng.choice(6, size=400_000, p=p)
    logp, logq = np.log(p[samples]), np.log(q[samples])
    k1, k2, k3 = (np.asarray(fn(logp, logq)) for fn in (losses.kl_k1, losses.kl_k2,
                                                         losses.kl_k3))
    assert k1.mean() == pytest.approx(exact, abs=0.01)
    assert k3.mean() == pytest.approx(exact, abs=0.01)
    assert np.all(k3 >= 0) and np.all(k2 >= 0)
    assert k3.std() < k1.std()  # Schulman's point: same mean, less variance


def test_kl_in_reward_and_in_loss():
    rewards, logp, ref = jnp.array([1.0, 0.0]), jnp.array([-1.0, -2.0]), jnp.array([-1.5, -1.0])
    np.testing.assert_allclose(np.asarray(losses.kl_penalized_rewards(rewards, logp, ref, 0.2)),
                               [1.0 - 0.2 * 0.5, 0.0 + 0.2 * 1.0], rtol=1e-6)
    k3 = np.asarray(losses.kl_k3(logp, ref))
    np.testing.assert_allclose(
        np.asarray(losses.kl_penalized_rewards(rewards, logp, ref, 0.2, estimator="k3")),
        np.asarray(rewards) - 0.2 * k3, rtol=1e-6)
    mask = jnp.array([[1.0, 0.0]])
    assert float(losses.kl_loss(logp[None], ref[None], mask)) == pytest.approx(k3[0], rel=1e-6)
    assert float(losses.kl_loss(logp[None], ref[None], mask, estimator="k1")) == pytest.approx(
        0.5, rel=1e-6)


def ziegler_controller(kl_coef, observed, target, horizon, n_steps):
    """lm-human-preferences AdaptiveKLController.update, in plain python."""
    error = min(max(observed / target - 1, -0.2), 0.2)
    return kl_coef * (1 + error * n_steps / horizon)


def test_adaptive_kl_update_matches_the_reference_controller():
    assert float(losses.adaptive_kl_update(0.1, 10.0, 1.0, 100.0, 50)) == pytest.approx(0.11)
    assert float(losses.adaptive_kl_update(0.1, 1.1, 1.0, 100.0, 50)) == pytest.approx(0.105)
    update = jax.jit(losses.adaptive_kl_update, static_argnums=(2, 3))
    ours, ref = jnp.float32(0.2), 0.2
    for observed in [6.0, 5.5, 7.0, 0.5, 6.1, 5.9]:
        ours, ref = update(ours, observed, 6.0, 10_000, 256), ziegler_controller(
            ref, observed, 6.0, 10_000, 256)
        assert float(ours) == pytest.approx(ref, rel=1e-6)


# ---------------------------------------------------------------- REINFORCE, RLOO, GRPO


def test_rloo_by_hand_and_against_a_loop():
    rewards = jnp.array([[1.0, 2.0, 3.0], [0.1, 0.1, 0.1]])
    rloo = np.asarray(losses.rloo_advantages(rewards))
    np.testing.assert_allclose(rloo[0], [1 - 2.5, 2 - 2.0, 3 - 1.5])
    assert np.all(rloo[1] == 0.0)
    rng = np.random.default_rng(18)
    rewards = rng.normal(size=(5, 4)).astype(np.float32)
    ref = [[r[i] - np.mean(np.delete(r, i)) for i in range(4)] for r in rewards]
    out = np.asarray(losses.rloo_advantages(rewards))
    np.testing.assert_allclose(out, ref, atol=1e-6)
    np.testing.assert_allclose(out.sum(1), 0.0, atol=1e-6)


def test_grpo_and_dr_grpo_by_hand_and_against_numpy():
    rewards = jnp.array([[1.0, 2.0, 3.0], [0.1, 0.1, 0.1]])
    grpo = np.asarray(losses.grpo_advantages(rewards))
    np.testing.assert_allclose(grpo[0], [-1, 0, 1], atol=1e-5)  # sample std of 1, 2, 3 is 1
    assert np.all(grpo[1] == 0.0)  # identical rewards: exactly 0, not NaN or +-1/eps
    dr = np.asarray(losses.grpo_advantages(rewards, scale_by_std=False))
    np.testing.assert_allclose(dr[0], [-1, 0, 1], atol=1e-6)
    assert np.all(dr[1] == 0.0)
    rng = np.random.default_rng(19)
    rewards = rng.normal(size=(4, 6)).astype(np.float32)
    centered = rewards - rewards.mean(1, keepdims=True)
    np.testing.assert_allclose(np.asarray(losses.grpo_advantages(rewards, eps=1e-4)),
                               centered / (rewards.std(1, ddof=1, keepdims=True) + 1e-4),
                               atol=1e-5)
    out = losses.grpo_advantages(jnp.asarray(rewards, jnp.bfloat16), scale_by_std=False)
    assert out.dtype == jnp.float32


def test_reinforce_with_group_mean_baseline_by_hand():
    rewards = jnp.array([[3.0, 1.0]])  # one prompt, k = 2 samples
    baseline = losses.mean_baseline(rewards)
    np.testing.assert_array_equal(np.asarray(baseline), [[2.0, 2.0]])
    logprobs = jnp.array([[-1.0, -2.0], [-0.5, 7.0]])
    mask = jnp.array([[1.0, 1.0], [1.0, 0.0]])
    loss = losses.reinforce_loss(logprobs, rewards.reshape(-1), baseline.reshape(-1), mask)
    # advantages +1, -1: -(1 * -1 + 1 * -2 + -1 * -0.5) / 3 tokens
    assert float(loss) == pytest.approx(-(-1.0 - 2.0 + 0.5) / 3)
    per_token = losses.reinforce_loss(logprobs, jnp.full((2, 2), 3.0), jnp.ones((2, 2)), mask,
                                      reduction="sum")
    assert float(per_token) == pytest.approx(-2.0 * (-1.0 - 2.0 - 0.5))


def test_reinforce_gradient_and_no_gradient_into_the_baseline():
    rng = np.random.default_rng(20)
    logprobs = rng.normal(size=SHAPE).astype(np.float32)
    returns, baseline = (rng.normal(size=SHAPE[0]).astype(np.float32) for _ in range(2))
    mask = random_mask(rng)
    fn = lambda lp, b: losses.reinforce_loss(lp, returns, b, mask)
    grad_logprobs, grad_baseline = jax.grad(fn, argnums=(0, 1))(logprobs, baseline)
    ref = -(returns - baseline)[:, None] * mask / mask.sum()
    np.testing.assert_allclose(np.asarray(grad_logprobs), ref, atol=1e-6)
    assert np.all(np.asarray(grad_baseline) == 0.0)
    summed = losses.reinforce_loss(logprobs.sum(1), returns, None, np.ones(SHAPE[0]))
    np.testing.assert_allclose(float(summed), -np.mean(returns * logprobs.sum(1)), rtol=1e-5)


# ---------------------------------------------------------------- errors for people


def test_gae_flags_are_keyword_only():
    # rlax-style positional (..., discount, lambda) or (..., terminated, truncated, ...) calls
    # must fail loudly rather than take a flag array for another.
    with pytest.raises(TypeError):
        losses.gae(*[jnp.ones((1, 2))] * 6, 0.9)


@pytest.mark.parametrize("call,message", [
    (lambda: losses.aggregate_loss(jnp.ones((1, 2)), jnp.ones((1, 2)), "mean"),
     "reduction must be one of"),
    (lambda: losses.aggregate_loss(jnp.ones((1, 2)), jnp.ones((1, 2)), "seq_sum_norm"),
     "norm_constant must be > 0"),
    (lambda: losses.ppo_policy_loss(*[jnp.ones((1, 2))] * 4, clip_eps=0.0),
     "clip_eps must be > 0.0, got 0.0"),
    (lambda: losses.ppo_policy_loss(*[jnp.ones((1, 2))] * 4, dual_clip=1.0),
     "dual_clip must be > 1.0"),
    (lambda: losses.ppo_value_loss(*[jnp.ones((1, 2))] * 4, clip=-0.1), "clip must be > 0.0"),
    (lambda: losses.gae(*[jnp.ones((1, 2))] * 5, gamma=1.5, lam=0.9),
     r"gamma must be in \[0.0, 1.0\], got 1.5"),
    (lambda: losses.kl_loss(*[jnp.ones((1, 2))] * 3, estimator="k4"), "estimator must be one"),
    (lambda: losses.adaptive_kl_update(0.1, 1.0, 0.0, 100.0, 1), "target must be > 0.0"),
    (lambda: losses.rloo_advantages(jnp.ones((2, 1))), "k >= 2"),
    (lambda: losses.grpo_advantages(jnp.ones((2, 1))), "k >= 2"),
])
def test_bad_static_arguments_raise_value_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_explained_variance_equals_numpy_on_the_masked_entries():
    rng = np.random.default_rng(0)
    values, returns = rng.normal(size=(3, 7)), rng.normal(size=(3, 7))
    mask = rng.random((3, 7)) < 0.6
    want = 1 - np.var((returns - values)[mask]) / np.var(returns[mask])
    got = losses.explained_variance(jnp.asarray(values), jnp.asarray(returns), jnp.asarray(mask))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # Constant returns: the denominator is floored, never a division by zero.
    assert np.isfinite(losses.explained_variance(jnp.zeros(4), jnp.ones(4), jnp.ones(4)))


def test_bradley_terry_loss_equals_numpy_and_ignores_padded_pairs():
    rng = np.random.default_rng(0)
    chosen, rejected = rng.normal(size=9) * 30, rng.normal(size=9) * 30  # margins up to ~100
    mask = np.array([1, 1, 1, 0, 1, 1, 0, 1, 1], np.float32)
    per_pair = np.logaddexp(0.0, -(chosen - rejected))  # -log sigmoid, stable in numpy
    got = losses.bradley_terry_loss(jnp.asarray(chosen), jnp.asarray(rejected), jnp.asarray(mask))
    np.testing.assert_allclose(got, per_pair[mask > 0].mean(), rtol=1e-5)
    total = losses.bradley_terry_loss(jnp.asarray(chosen), jnp.asarray(rejected),
                                      jnp.asarray(mask), reduction="sum")
    np.testing.assert_allclose(total, per_pair[mask > 0].sum(), rtol=1e-5)
    garbage = np.where(mask > 0, rejected, np.nan)
    grad = jax.grad(lambda c: losses.bradley_terry_loss(c, jnp.asarray(garbage),
                                                        jnp.asarray(mask)))(jnp.asarray(chosen))
    assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[mask == 0] == 0)
    # d/dc softplus(-(c - r)) = -sigmoid(r - c), averaged over the 7 real pairs.
    want = -1 / (1 + np.exp(chosen - rejected)) / mask.sum()
    np.testing.assert_allclose(np.asarray(grad)[mask > 0], want[mask > 0], rtol=1e-4, atol=1e-9)
