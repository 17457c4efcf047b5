"""PPO on TextWorld with a tiny model: the notebook's bugs must not come back."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrl_llm import text
from jaxrl_llm.agent import AgentConfig, play
from jaxrl_llm.envs.textworld import GameConfig, TextWorldBatch, prompt_pieces, step_tail
from jaxrl_llm.model import ModelConfig, Transformer
from jaxrl_llm.model.lora import LoraConfig, apply_lora
from jaxrl_llm.model.value_head import ActorCritic
from jaxrl_llm.text import ByteTokenizer
from jaxrl_llm.train.ppo import (PPOConfig, action_scores, minibatches, ppo_loss,
                                 prepare_rollout, score_all, step_advantages)
from jaxrl_llm.train.step import OptimConfig, Trainer, make_optimizer

pytestmark = pytest.mark.textworld
CONFIG = PPOConfig(minibatch_size=4, micro_batch_size=2, epochs=1)


@pytest.fixture(scope="module")
def rollout():
    lm = Transformer(ModelConfig.tiny(vocab_size=257, max_seq_len=4096), rngs=nnx.Rngs(0))
    apply_lora(lm, LoraConfig(rank=4), nnx.Rngs(1))
    actor_critic = ActorCritic(lm)
    actor_critic.value_head.kernel[...] = 0.1 * jax.random.normal(jax.random.key(2), (64,))
    tokenizer = ByteTokenizer()
    with TextWorldBatch(GameConfig(step_limit=3), 2) as games:
        episodes, transitions = play(lm, tokenizer, games, [4, 5], "train", jax.random.key(0),
                                     AgentConfig(mode="generate", greedy=False,
                                                 max_action_tokens=6, cache_len=4096),
                                     value_head=actor_critic.value_head)
    finals = {g: text.encode_prompt(tokenizer, prompt_pieces(e), step_tail(e.valid_actions))
              for g, e in enumerate(episodes) if e.truncated}
    arrays, stats = prepare_rollout(transitions, finals, actor_critic, actor_critic, CONFIG,
                                    pad_id=tokenizer.eos_token_id, action_len=8)
    return actor_critic, episodes, transitions, arrays, stats


def test_stored_logprobs_and_values_equal_a_fresh_forward(rollout):
    actor_critic, _, _, arrays, _ = rollout
    logprob, _, value = action_scores(actor_critic, jax.tree.map(jnp.asarray, arrays))
    np.testing.assert_allclose(np.asarray(logprob), arrays["old_logprob"], atol=1e-4)
    np.testing.assert_allclose(np.asarray(value), arrays["old_value"], atol=1e-4)
    # `score_all` (the reference log-probs; here the reference is the policy itself) runs
    # length-sorted chunks cut to their own widths: row by row, the same as one full forward.
    np.testing.assert_allclose(arrays["ref_logprob"], np.asarray(logprob), atol=1e-5)
    chunked_logprob, _, chunked_value = score_all(actor_critic, arrays, chunk=2)
    np.testing.assert_allclose(chunked_logprob, np.asarray(logprob), atol=1e-5)
    np.testing.assert_allclose(chunked_value, np.asarray(value), atol=1e-5)


def test_ratio_is_one_on_the_first_minibatch(rollout):
    actor_critic, _, _, arrays, _ = rollout
    batch = next(minibatches(arrays, CONFIG, np.random.default_rng(0)))
    micro = jax.tree.map(jnp.asarray, batch[0])
    _, count, metrics = ppo_loss(actor_critic, micro, CONFIG)
    assert float(metrics["ratio_max"] / count) == pytest.approx(1.0, abs=1e-4)
    assert float(metrics["clip_fraction"]) == 0.0
    assert float(metrics["kl_ref_k3"]) == pytest.approx(0.0, abs=1e-5)  # reference == policy


def test_rewards_land_on_their_step(rollout):
    _, episodes, transitions, _, stats = rollout
    for t in transitions:
        assert t.reward == episodes[t.game].rewards[t.step]
    assert stats["transitions"] == sum(e.num_steps for e in episodes)


def test_step_advantages_bootstrap_only_truncated_episodes():
    from jaxrl_llm.agent import Transition

    make = lambda game, step, terminated=False, truncated=False: Transition(
        game, step, [1], [2], 0.0, "a", True, reward=1.0, terminated=terminated,
        truncated=truncated)
    transitions = [make(0, 0), make(1, 0), make(0, 1, terminated=True), make(1, 1, truncated=True)]
    values = np.array([0.5, 0.5, 0.25, 0.25], np.float32)
    rewards = np.ones(4, np.float32)
    advantages, returns = step_advantages(transitions, rewards, values, {1: 10.0}, 1.0, 1.0)
    # Game 0 terminated: returns 2, 1. Game 1 truncated with bootstrap 10: returns 12, 11.
    np.testing.assert_allclose(returns, [2.0, 12.0, 1.0, 11.0], atol=1e-5)
    np.testing.assert_allclose(advantages, returns - values, atol=1e-5)


def test_padding_rows_never_reach_the_loss(rollout):
    actor_critic, _, _, arrays, _ = rollout
    n = len(arrays["prompt"])
    config = PPOConfig(minibatch_size=n + 2, micro_batch_size=n + 2, epochs=1)
    (batch,) = jax.tree.map(jnp.asarray, next(minibatches(arrays, config,
                                                          np.random.default_rng(0))))
    padding = batch["weight"] == 0
    assert int(padding.sum()) == 2
    garbage = dict(batch, advantage=jnp.where(padding, 1e6, batch["advantage"]),
                   old_logprob=jnp.where(padding, -1e6, batch["old_logprob"]))
    for a, b in zip(ppo_loss(actor_critic, batch, config), ppo_loss(actor_critic, garbage, config)):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), a, b)


def test_ppo_update_moves_only_adapters_and_value_head(rollout):
    actor_critic, _, _, arrays, _ = rollout
    trainer = Trainer(actor_critic, make_optimizer(OptimConfig(learning_rate=1e-3)),
                      functools.partial(ppo_loss, config=CONFIG))
    state = trainer.init()
    before = jax.tree.map(np.asarray, state.trainable)
    for batch in minibatches(arrays, CONFIG, np.random.default_rng(1)):
        state, metrics = trainer.step(state, jax.tree.map(jnp.asarray, batch))
    assert np.isfinite(float(metrics["loss"]))
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), before,
                           state.trainable)
    assert any(jax.tree.leaves(changed))


def test_bad_ppo_config():
    with pytest.raises(ValueError, match="kl_in must be one of"):
        PPOConfig(kl_in="both")
    with pytest.raises(ValueError, match="multiple of micro_batch_size"):
        PPOConfig(minibatch_size=6, micro_batch_size=4)
