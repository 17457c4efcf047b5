"""RL math against independent references: python loops, numpy, rlax, hand-computed cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import rlax

from jaxrl_llm import losses


def gae_loop(rewards, values, next_values, terminated, mask, gamma, lam):
    """Plain per-row python loop: the textbook recursion, stopping at padding."""
    advantages = np.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        next_advantage = 0.0
        for t in reversed(range(rewards.shape[1])):
            if not mask[b, t]:
                next_advantage = 0.0
                continue
            not_done = 1.0 - terminated[b, t]
            delta = rewards[b, t] + gamma * not_done * next_values[b, t] - values[b, t]
            next_advantage = delta + gamma * lam * not_done * next_advantage
            advantages[b, t] = next_advantage
    return advantages


def random_episodes(rng, batch=5, length=9):
    rewards = rng.normal(size=(batch, length)).astype(np.float32)
    values = rng.normal(size=(batch, length)).astype(np.float32)
    next_values = np.concatenate([values[:, 1:], rng.normal(size=(batch, 1))], 1).astype(
        np.float32)
    lengths = rng.integers(1, length + 1, batch)
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.float32)
    terminated = np.zeros_like(mask)
    for b in range(batch):  # half the episodes terminate, the others are truncated (bootstrap)
        if b % 2 == 0:
            terminated[b, lengths[b] - 1] = 1.0
        else:
            next_values[b, lengths[b] - 1] = rng.normal()
    return rewards, values, next_values, terminated, mask


def test_gae_equals_python_loop_with_both_episode_ends():
    rng = np.random.default_rng(0)
    episode = random_episodes(rng)
    advantages, returns = losses.gae(*episode, gamma=0.97, lam=0.9)
    ref = gae_loop(*episode, 0.97, 0.9)
    np.testing.assert_allclose(np.asarray(advantages), ref, atol=1e-5)
    np.testing.assert_allclose(np.asarray(returns), (ref + episode[1]) * episode[4], atol=1e-5)


def test_gae_padding_never_leaks():
    rng = np.random.default_rng(1)
    rewards, values, next_values, terminated, mask = random_episodes(rng)
    noise = lambda x: np.where(mask > 0, x, rng.normal(size=x.shape) * 100).astype(np.float32)
    a1, r1 = losses.gae(rewards, values, next_values, terminated, mask, 1.0, 0.95)
    a2, r2 = losses.gae(noise(rewards), noise(values), noise(next_values), terminated, mask,
                        1.0, 0.95)
    np.testing.assert_allclose(np.asarray(a1), np.asarray(a2), atol=1e-5)
    np.testing.assert_allclose(np.asarray(r1), np.asarray(r2), atol=1e-5)


def test_gae_matches_rlax_on_a_truncated_trajectory():
    """rlax: time-major single trajectory, values of length T+1 (the last is the bootstrap)."""
    rng = np.random.default_rng(2)
    rewards = rng.normal(size=7).astype(np.float32)
    values = rng.normal(size=8).astype(np.float32)
    discounts = np.full(7, 0.99, np.float32)
    discounts[3] = 0.0  # an episode terminates at step 3 inside the window
    ref = rlax.truncated_generalized_advantage_estimation(rewards, discounts, 0.9, values)
    terminated = (discounts == 0).astype(np.float32)
    ours, _ = losses.gae(rewards[None], values[None, :-1], values[None, 1:], terminated[None],
                         np.ones((1, 7), np.float32), gamma=0.99, lam=0.9)
    np.testing.assert_allclose(np.asarray(ours[0]), np.asarray(ref), atol=1e-5)


def test_gae_jit_and_all_zero_mask():
    rng = np.random.default_rng(3)
    episode = random_episodes(rng)
    jitted = jax.jit(losses.gae, static_argnames=("gamma", "lam"))(*episode, gamma=1.0, lam=0.95)
    eager = losses.gae(*episode, gamma=1.0, lam=0.95)
    np.testing.assert_allclose(np.asarray(jitted[0]), np.asarray(eager[0]), atol=1e-6)
    zero = losses.gae(*episode[:4], np.zeros_like(episode[4]), gamma=1.0, lam=0.95)
    assert np.all(np.asarray(zero[0]) == 0) and np.all(np.isfinite(np.asarray(zero[1])))


def ppo_numpy(logprobs, old, adv, mask, eps):
    ratio = np.exp(logprobs - old)
    per = -np.minimum(ratio * adv, np.clip(ratio, 1 - eps, 1 + eps) * adv)
    return (per * mask).sum() / mask.sum(), (np.abs(ratio - 1) > eps)[mask > 0].mean()


def test_ppo_policy_loss_value_and_stats_match_numpy():
    rng = np.random.default_rng(4)
    logprobs, old, adv = (rng.normal(size=(4, 6)).astype(np.float32) * s for s in (0.3, 0.3, 1))
    mask = (rng.random((4, 6)) > 0.3).astype(np.float32)
    out = losses.ppo_policy_loss(logprobs, old, adv, mask, clip_eps=0.2)
    ref_loss, ref_clip = ppo_numpy(logprobs, old, adv, mask, 0.2)
    np.testing.assert_allclose(float(out.loss), ref_loss, rtol=1e-5)
    np.testing.assert_allclose(float(out.clip_fraction), ref_clip, rtol=1e-5)
    log_ratio = (logprobs - old)[mask > 0]
    np.testing.assert_allclose(float(out.approx_kl_k1), np.mean(-log_ratio), rtol=1e-5)
    np.testing.assert_allclose(float(out.approx_kl_k3),
                               np.mean(np.exp(log_ratio) - 1 - log_ratio), rtol=1e-4)
    np.testing.assert_allclose(float(out.ratio_max), np.exp(log_ratio).max(), rtol=1e-5)


def test_ppo_gradient_matches_numpy_and_is_zero_where_clipped():
    rng = np.random.default_rng(5)
    logprobs = rng.normal(size=(3, 8)).astype(np.float32) * 0.4
    old = rng.normal(size=(3, 8)).astype(np.float32) * 0.4
    adv = rng.normal(size=(3, 8)).astype(np.float32)
    mask = np.ones((3, 8), np.float32)
    grad = np.asarray(jax.grad(lambda lp: losses.ppo_policy_loss(lp, old, adv, mask).loss)(
        jnp.asarray(logprobs)))
    ratio = np.exp(logprobs - old)
    # d/dlogp of -min(rA, clip(r)A): -rA/N where the unclipped term is the minimum, else 0.
    active = ratio * adv <= np.clip(ratio, 0.8, 1.2) * adv
    np.testing.assert_allclose(grad, np.where(active, -ratio * adv / mask.sum(), 0.0), atol=1e-6)
    clipped_in_adv_direction = ((ratio > 1.2) & (adv > 0)) | ((ratio < 0.8) & (adv < 0))
    assert clipped_in_adv_direction.any()
    assert np.all(grad[clipped_in_adv_direction] == 0)


def test_dual_clip_caps_negative_advantages():
    out = losses.ppo_policy_loss(jnp.log(jnp.array([[10.0]])), jnp.zeros((1, 1)),
                                 -jnp.ones((1, 1)), jnp.ones((1, 1)), dual_clip=3.0)
    assert float(out.loss) == pytest.approx(3.0)  # -min(-10, -1.2) = 10, capped at 3


def test_value_loss_matches_numpy():
    rng = np.random.default_rng(6)
    v, old, ret = (rng.normal(size=(3, 5)).astype(np.float32) for _ in range(3))
    mask = np.ones((3, 5), np.float32)
    clipped = old + np.clip(v - old, -0.2, 0.2)
    ref = 0.5 * np.maximum((v - ret) ** 2, (clipped - ret) ** 2).mean()
    np.testing.assert_allclose(float(losses.ppo_value_loss(v, old, ret, mask, clip=0.2)), ref,
                               rtol=1e-5)
    np.testing.assert_allclose(float(losses.ppo_value_loss(v, old, ret, mask, clip=None)),
                               0.5 * ((v - ret) ** 2).mean(), rtol=1e-5)


def test_masked_positions_never_change_losses_or_stats():
    rng = np.random.default_rng(7)
    arrays = [rng.normal(size=(4, 7)).astype(np.float32) for _ in range(3)]
    mask = (rng.random((4, 7)) > 0.4).astype(np.float32)
    noisy = [np.where(mask > 0, a, rng.normal(size=a.shape) * 50) for a in arrays]
    for reduction in ("token_mean", "seq_mean", "sum"):
        a = losses.ppo_policy_loss(*arrays, mask, reduction=reduction)
        b = losses.ppo_policy_loss(*noisy, mask, reduction=reduction)
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5), a, b)
        np.testing.assert_allclose(losses.ppo_value_loss(*arrays, mask, reduction=reduction),
                                   losses.ppo_value_loss(*noisy, mask, reduction=reduction),
                                   rtol=1e-5)
    zero = losses.ppo_policy_loss(*arrays, np.zeros_like(mask))
    assert all(np.isfinite(np.asarray(x)) for x in zero)


def test_aggregations_by_hand():
    per_token = jnp.array([[1.0, 3.0, 0.0], [5.0, 0.0, 0.0]])
    mask = jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert float(losses.aggregate(per_token, mask, "token_mean")) == pytest.approx(3.0)
    assert float(losses.aggregate(per_token, mask, "seq_mean")) == pytest.approx(3.5)
    assert float(losses.aggregate(per_token, mask, "sum")) == pytest.approx(9.0)
    assert float(losses.aggregate(per_token, mask, "constant", 6.0)) == pytest.approx(1.5)
    with pytest.raises(ValueError, match="unknown reduction 'mean'"):
        losses.aggregate(per_token, mask, "mean")


def test_masked_whiten():
    values = jnp.array([[1.0, 2.0, 3.0, 100.0]])
    mask = jnp.array([[1.0, 1.0, 1.0, 0.0]])
    out = np.asarray(losses.masked_whiten(values, mask))
    np.testing.assert_allclose(out[0, :3], np.array([-1, 0, 1]) * np.sqrt(1.5), atol=1e-4)
    assert out[0, 3] == 0


def test_kl_estimators_converge_to_exact_kl():
    rng = np.random.default_rng(8)
    p = rng.dirichlet(np.ones(6))
    q = rng.dirichlet(np.ones(6))
    exact = float(np.sum(p * np.log(p / q)))
    samples = rng.choice(6, size=200_000, p=p)
    logp, logq = np.log(p[samples]), np.log(q[samples])
    assert float(jnp.mean(losses.kl_k1(logp, logq))) == pytest.approx(exact, abs=0.01)
    k3 = np.asarray(losses.kl_k3(logp, logq))
    assert float(k3.mean()) == pytest.approx(exact, abs=0.01)
    assert np.all(k3 >= 0) and np.all(np.asarray(losses.kl_k2(logp, logq)) >= 0)


def test_kl_penalized_rewards_and_adaptive_controller():
    out = losses.kl_penalized_rewards(jnp.array([1.0, 0.0]), jnp.array([-1.0, -2.0]),
                                      jnp.array([-1.5, -1.0]), kl_coef=0.2)
    np.testing.assert_allclose(np.asarray(out), [1.0 - 0.2 * 0.5, 0.0 + 0.2 * 1.0], rtol=1e-6)
    # Observed KL far above target: the error is clipped at +0.2.
    assert float(losses.adaptive_kl_update(0.1, 10.0, 1.0, 100.0, 50)) == pytest.approx(0.11)
    assert float(losses.adaptive_kl_update(0.1, 0.0, 1.0, 100.0, 50)) == pytest.approx(0.09)


def test_rloo_grpo_reinforce_by_hand():
    rewards = jnp.array([[1.0, 2.0, 3.0], [4.0, 4.0, 4.0]])
    rloo = np.asarray(losses.rloo_advantages(rewards))
    np.testing.assert_allclose(rloo[0], [1 - 2.5, 2 - 2.0, 3 - 1.5])
    np.testing.assert_allclose(rloo.sum(1), 0.0, atol=1e-6)
    grpo = np.asarray(losses.grpo_advantages(rewards))
    np.testing.assert_allclose(grpo[0], np.array([-1, 0, 1]) / (np.std([1, 2, 3]) + 1e-6),
                               rtol=1e-5)
    np.testing.assert_array_equal(grpo[1], 0.0)  # identical rewards: 0, not NaN
    np.testing.assert_allclose(np.asarray(losses.grpo_advantages(rewards, scale_by_std=False))[0],
                               [-1, 0, 1])
    np.testing.assert_allclose(np.asarray(losses.mean_baseline(rewards))[0], [2, 2, 2])
    logprobs = jnp.array([[-1.0, -2.0], [-0.5, 0.0]])
    mask = jnp.array([[1.0, 1.0], [1.0, 0.0]])
    loss = losses.reinforce_loss(logprobs, jnp.array([3.0, 1.0]), jnp.array([1.0, 2.0]), mask)
    assert float(loss) == pytest.approx((-(2) * -1 - 2 * -2 - (-1) * -0.5) / 3)
    for fn in (losses.rloo_advantages, losses.grpo_advantages):
        with pytest.raises(ValueError, match="k >= 2"):
            fn(jnp.ones((2, 1)))
