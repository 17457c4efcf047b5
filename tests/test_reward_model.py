"""The learned reward: padding-invariant scores, the Bradley-Terry loss of them, and training
that ranks a preferred response first."""

import jax
import numpy as np
from flax import nnx

from jaxrl_llm import reward_model as rm
from jaxrl_llm.model import ModelConfig, Transformer
from jaxrl_llm.model.value_head import ActorCritic
from jaxrl_llm.train.step import OptimConfig, Trainer, make_optimizer

jax.config.update("jax_numpy_rank_promotion", "raise")


def tiny_reward_model(seed=0):
    config = ModelConfig(vocab_size=16, d_model=16, num_layers=1, num_heads=2, num_kv_heads=2,
                         ffn_dim=32, max_seq_len=32)
    return ActorCritic(Transformer(config, rngs=nnx.Rngs(seed)))


PROMPTS = [[3, 4, 5], [6, 7]]
CHOSEN = [[8, 1], [9, 9, 1]]
REJECTED = [[10, 1], [11, 1]]


def test_scores_do_not_depend_on_padding_width():
    model = tiny_reward_model()
    narrow = rm.reward_scores(model, *rm.sequence_arrays(PROMPTS, CHOSEN, 6, 0))
    wide = rm.reward_scores(model, *rm.sequence_arrays(PROMPTS, CHOSEN, 12, 0))
    np.testing.assert_allclose(narrow, wide, rtol=1e-5, atol=1e-6)


def test_preference_loss_is_bradley_terry_of_the_scores():
    model = tiny_reward_model()
    # A nonzero head (it starts at 0), so that the two responses of a pair get different rewards.
    model.value_head.kernel.value = jax.random.normal(jax.random.key(1), (16,))
    batch = rm.pair_batch(PROMPTS, CHOSEN, REJECTED, 8, 0)
    chosen = np.asarray(rm.reward_scores(model, *(batch[f"chosen_{p}"] for p in rm.PAIR_PARTS)))
    rejected = np.asarray(rm.reward_scores(model,
                                           *(batch[f"rejected_{p}"] for p in rm.PAIR_PARTS)))
    loss, count, metrics = rm.preference_loss(model, batch)
    np.testing.assert_allclose(loss, np.sum(np.logaddexp(0, rejected - chosen)), rtol=1e-5)
    assert not np.allclose(chosen, rejected)
    assert float(count) == 2 and float(metrics["accuracy"]) == np.sum(chosen > rejected)


def test_training_ranks_the_chosen_response_first():
    model = tiny_reward_model()
    batch = rm.pair_batch(PROMPTS, CHOSEN, REJECTED, 8, 0)
    trainer = Trainer(model, make_optimizer(OptimConfig(learning_rate=3e-2)), rm.preference_loss,
                      trainable=nnx.Param)
    state = trainer.init()
    for _ in range(30):
        state, metrics = trainer.step(state, {k: v[None] for k, v in batch.items()})
    trained = trainer.model(state)
    assert rm.pair_accuracy(trained, batch) == 1.0
    reward = rm.reward_fn(trained, 8, 0)
    assert np.all(reward(PROMPTS, CHOSEN) > reward(PROMPTS, REJECTED))
