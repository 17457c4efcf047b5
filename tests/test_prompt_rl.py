"""Prompt-level RL on a tiny random model with a programmatic reward: it learns, the first ratio is
exactly 1 (stored log-probs, never re-sampled), padding never reaches a loss, bad input fails."""

import dataclasses
import functools

import jax
import numpy as np
import pytest
from flax import nnx

from jaxrl_llm.model import ModelConfig, Transformer
from jaxrl_llm.model.lora import TRAINABLE, LoraConfig, apply_lora
from jaxrl_llm.sampling import SamplingConfig
from jaxrl_llm.train.prompt_rl import (PromptRLConfig, call_reward_fn, collect, group_advantages,
                                       iteration, last_token_rewards, make_trainer, minibatches,
                                       policy_scores)
from jaxrl_llm.train.step import OptimConfig, make_optimizer

VOCAB, EOS = 16, 1
TARGETS = np.array([7, 8, 9, 10])
SAMPLING = SamplingConfig(max_new_tokens=8, eos_ids=(EOS,), pad_id=0)
PROMPTS = [[2, 3, 4], [5, 6], [8, 9, 10, 11, 12], [13]]  # ragged: left padding is exercised


def target_fraction(prompts, responses):
    """The fraction of a response's tokens (stop token included) in TARGETS.

    A set rather than one token: LoRA on a tiny random model cannot raise one token's
    probability above ~0.2 (its frozen tied embeddings, std 0.02, bound every logit near 1.3).
    """
    return np.array([np.mean(np.isin(r, TARGETS)) for r in responses], np.float32)


def tiny_model(seed=0, lora=True):
    model = Transformer(ModelConfig.tiny(vocab_size=VOCAB, max_seq_len=64), rngs=nnx.Rngs(seed))
    return apply_lora(model, LoraConfig(rank=8, alpha=16), nnx.Rngs(seed + 1)) if lora else model


# rloo trains every weight of the tiny model (the Trainer's `trainable=nnx.Param`), the others
# LoRA adapters (+ the value head for ppo).
SETUPS = dict(
    ppo=dict(epochs=2, learning_rate=3e-3, lora=True),
    rloo=dict(epochs=1, learning_rate=3e-3, lora=False),
    grpo=dict(epochs=2, learning_rate=3e-3, lora=True),
)


@functools.lru_cache(maxsize=None)
def setup(algorithm):
    """(trainer, frozen reference, config): one compiled train step per algorithm for the file."""
    spec = SETUPS[algorithm]
    config = PromptRLConfig(algorithm=algorithm, num_samples=8, sampling=SAMPLING,
                            epochs=spec["epochs"], minibatch_size=16, micro_batch_size=8,
                            kl_coef=0.01)
    optimizer = make_optimizer(OptimConfig(learning_rate=spec["learning_rate"], weight_decay=0.0))
    trainer = make_trainer(tiny_model(lora=spec["lora"]), config, optimizer,
                           trainable=TRAINABLE if spec["lora"] else nnx.Param)
    return trainer, trainer.model(trainer.init()), config


@pytest.mark.parametrize("algorithm", ["rloo", "ppo"])
def test_reward_increases(algorithm):
    trainer, reference, config = setup(algorithm)
    state, kl_coef, key, rewards = trainer.init(), config.kl_coef, jax.random.key(0), []
    for _ in range(8):
        key, step_key = jax.random.split(key)
        state, kl_coef, record = iteration(trainer, state, reference, PROMPTS, target_fraction,
                                           step_key, kl_coef, config)
        rewards.append(record["reward_mean"])
    for name in ("kl_ref", "entropy", "clip_fraction", "response_length", "reward_std", "loss"):
        assert np.isfinite(record[name])
    # The untrained policy scores ~0.16 (4 of 16 tokens, EOS counted); measured after 8
    # iterations: ~0.4 (ppo, LoRA, near its ceiling) and ~0.85 (rloo, every weight).
    assert np.mean(rewards[-2:]) > rewards[0] + 0.15, rewards
    assert record["kl_ref"] > 0  # it moved away from the reference


@pytest.mark.parametrize("algorithm, top_k", [("ppo", 0), ("grpo", 0), ("ppo", 4)])
def test_ratio_is_exactly_one_on_the_first_minibatch(algorithm, top_k):
    trainer, reference, config = setup(algorithm)
    # top_k: samples of the truncated policy, old log-probs recomputed under the full one (trlX).
    config = dataclasses.replace(config, sampling=dataclasses.replace(SAMPLING, top_k=top_k))
    state = trainer.init()
    arrays, _ = collect(trainer.model(state), reference, PROMPTS, target_fraction,
                        jax.random.key(1), config.kl_coef, config)
    batch = next(minibatches(arrays, config, jax.random.key(2)))
    micro = jax.tree.map(lambda x: x[0], batch)
    logprobs, _, _ = policy_scores(trainer.model(state), micro)
    mask = micro["response_mask"]
    # The stored sampler log-probs are those of the stored tokens under the current policy.
    np.testing.assert_allclose(np.asarray(logprobs)[mask], micro["old_logprobs"][mask],
                               atol=2e-5)
    _, metrics = trainer.step(state, batch)
    assert float(metrics["clip_fraction"]) == 0.0
    assert float(metrics["approx_kl"]) == pytest.approx(0.0, abs=1e-8)


@pytest.mark.parametrize("algorithm", ["ppo", "rloo", "grpo"])
def test_padding_never_reaches_the_loss(algorithm):
    trainer, reference, config = setup(algorithm)
    arrays, _ = collect(trainer.model(trainer.init()), reference, PROMPTS, target_fraction,
                        jax.random.key(3), config.kl_coef, config)
    # 12 of 32 rows: the minibatch is filled up with 4 all-masked rows.
    clean = next(minibatches({k: v[:12] for k, v in arrays.items()}, config, jax.random.key(4)))
    padding = ~clean["response_mask"]
    assert padding.any() and (~padding).any()
    rng = np.random.default_rng(0)
    garbage = dict(clean, response=np.where(padding, rng.integers(0, VOCAB, padding.shape),
                                            clean["response"]))
    for name in ("old_logprobs", "ref_logprobs", "advantages", "old_values", "returns"):
        if name in clean:
            garbage[name] = np.where(padding, np.nan, clean[name]).astype(np.float32)
    state_a, metrics_a = trainer.step(trainer.init(), clean)
    state_b, metrics_b = trainer.step(trainer.init(), garbage)
    for name in metrics_a:
        np.testing.assert_allclose(float(metrics_b[name]), float(metrics_a[name]), rtol=1e-6,
                                   err_msg=name)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(b), np.asarray(a),
                                                         rtol=1e-6, atol=1e-7),
                 state_a.trainable, state_b.trainable)


def test_ppo_reward_on_the_last_real_token_minus_per_token_kl():
    trainer, _, config = setup("ppo")
    config = dataclasses.replace(config, lam=1.0, whiten_advantages=False)
    other = tiny_model(seed=5)  # a reference that differs from the policy: KL != 0
    kl_coef = 0.3
    arrays, stats = collect(trainer.model(trainer.init()), other, PROMPTS, target_fraction,
                            jax.random.key(6), kl_coef, config)
    mask = arrays["response_mask"]
    rewards = target_fraction(None, [r[m] for r, m in zip(arrays["response"], mask)])
    kl = np.where(mask, arrays["old_logprobs"] - arrays["ref_logprobs"], 0.0)
    # gamma = lam = 1 and a fresh (zero) critic: the return at token t is the response's reward
    # minus beta times the KL of tokens t.. (a reversed cumulative sum); 0 on padding.
    expected = np.where(mask, rewards[:, None] - kl_coef * np.cumsum(kl[:, ::-1], 1)[:, ::-1],
                        0.0)
    np.testing.assert_allclose(arrays["returns"], expected, atol=1e-5)
    np.testing.assert_allclose(arrays["advantages"], expected, atol=1e-5)
    assert stats["kl_ref"] == pytest.approx(kl.sum(1).mean(), rel=1e-4)


def test_last_token_rewards_hand_case():
    mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], bool)
    out = last_token_rewards(np.array([2.0, -1.0, 5.0]), mask)
    np.testing.assert_array_equal(np.asarray(out), [[0, 0, 2, 0], [-1, 0, 0, 0], [0, 0, 0, 0]])
    with pytest.raises(ValueError, match="needs right-padded masks"):
        last_token_rewards(np.array([1.0]), np.array([[0, 1, 1]], bool))


def test_group_advantages_against_numpy():
    rewards = np.array([[1.0, 0.0, 0.0, 3.0], [0.5, 0.5, 0.5, 0.5]], np.float32)
    mean = rewards.mean(1, keepdims=True)
    others = (rewards.sum(1, keepdims=True) - rewards) / 3
    std = rewards.std(1, ddof=1, keepdims=True)
    expected = dict(reinforce=rewards - mean, rloo=rewards - others, dr_grpo=rewards - mean,
                    grpo=np.where(std > 0, (rewards - mean) / (std + 1e-6), 0.0))
    for algorithm, reference in expected.items():
        np.testing.assert_allclose(np.asarray(group_advantages(rewards, algorithm)), reference,
                                   atol=1e-6, err_msg=algorithm)
    # RLOO is REINFORCE with the self-inclusive mean baseline scaled by k / (k - 1): under Adam
    # (scale-invariant) without gradient clipping the two train identically (docs/prompt_rl.md, text_rloo).
    np.testing.assert_allclose(np.asarray(group_advantages(rewards, "rloo")),
                               4 / 3 * np.asarray(group_advantages(rewards, "reinforce")),
                               atol=1e-6)


def test_adaptive_kl_coefficient():
    trainer, reference, config = setup("ppo")
    # kl_target only steers `iteration` (not the loss), so the trainer built for `config` serves.
    config = dataclasses.replace(config, kl_target=1.0, kl_horizon=32.0)
    _, kl_coef, record = iteration(trainer, trainer.init(), reference, PROMPTS, target_fraction,
                                   jax.random.key(7), 0.5, config)
    # First iteration: policy == reference, KL ~ 0 < target: e = clip(0 / 1 - 1) = -0.2 and
    # beta <- beta * (1 - 0.2 * 32 responses / 32).
    assert abs(record["kl_ref"]) < 1e-3
    assert kl_coef == pytest.approx(0.5 * 0.8, rel=1e-3)


def wrong_shape(prompts, responses):
    return np.zeros((len(responses), 2))


def not_finite(prompts, responses):
    rewards = np.zeros(len(responses))
    rewards[1] = np.inf
    return rewards


def test_bad_rewards_name_the_function():
    prompts, responses = [[1]] * 3, [[2, 1]] * 3
    with pytest.raises(ValueError, match=r"reward_fn wrong_shape returned shape \(3, 2\)"):
        call_reward_fn(wrong_shape, prompts, responses)
    with pytest.raises(ValueError, match="reward_fn not_finite returned 1 non-finite"):
        call_reward_fn(not_finite, prompts, responses)
    with pytest.raises(ValueError, match="reward_fn <lambda> must return 3 numbers"):
        call_reward_fn(lambda p, r: ["good"] * 3, prompts, responses)


@pytest.mark.parametrize("kwargs, message", [
    (dict(algorithm="ppo2"), "algorithm must be one of ppo, reinforce, rloo, grpo, dr_grpo"),
    (dict(algorithm="rloo", num_samples=1), "num_samples must be >= 2 for rloo"),
    (dict(algorithm="grpo", num_samples=1), "num_samples must be >= 2 for grpo"),
    (dict(algorithm="dr_grpo", num_samples=1), "num_samples must be >= 2 for dr_grpo"),
    (dict(algorithm="rloo", epochs=2), "epochs must be 1 for rloo"),
    (dict(sampling=SamplingConfig(temperature=0.7)), "must sample at temperature 1"),
    (dict(minibatch_size=12, micro_batch_size=8), "multiple of micro_batch_size=8"),
    (dict(kl_in="both"), "kl_in must be one of reward, loss"),
    (dict(kl_target=0.0), "kl_target must be > 0"),
])
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PromptRLConfig(**kwargs)


def test_paper_defaults():
    assert PromptRLConfig(algorithm="ppo", num_samples=1).reduction == "token_mean"
    grpo = PromptRLConfig(algorithm="grpo")
    assert (grpo.reduction, grpo.kl_in) == ("seq_mean_token_mean", "loss")
    assert PromptRLConfig(algorithm="dr_grpo").reduction == "seq_sum_norm"
