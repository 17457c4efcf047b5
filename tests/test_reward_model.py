"""The learned reward: padding-invariant scores, the Bradley-Terry loss of them, and training
that ranks a preferred response first."""

import functools

import jax
import numpy as np
import pytest
from flax import nnx

from jaxrl_llm import reward_model as rm
from jaxrl_llm.model import ModelConfig, Transformer, causal_mask, positions_from_mask
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
    narrow = rm.value_scores(model, *rm.sequence_arrays(PROMPTS, CHOSEN, 6, 0))
    wide = rm.value_scores(model, *rm.sequence_arrays(PROMPTS, CHOSEN, 12, 0))
    np.testing.assert_allclose(narrow, wide, rtol=1e-5, atol=1e-6)


def test_preference_loss_is_bradley_terry_of_the_scores():
    model = tiny_reward_model()
    # A nonzero head (it starts at 0), so that the two responses of a pair get different rewards.
    model.value_head.kernel.value = jax.random.normal(jax.random.key(1), (16,))
    batch = rm.pair_batch(PROMPTS, CHOSEN, REJECTED, 8, 0)
    chosen = np.asarray(rm.value_scores(model, *(batch[f"chosen_{p}"] for p in rm.PAIR_PARTS)))
    rejected = np.asarray(rm.value_scores(model,
                                           *(batch[f"rejected_{p}"] for p in rm.PAIR_PARTS)))
    loss, count, metrics = rm.preference_loss(model, batch)
    np.testing.assert_allclose(loss, np.sum(np.logaddexp(0, rejected - chosen)), rtol=1e-5)
    assert not np.allclose(chosen, rejected)
    assert float(count) == 2 and float(metrics["accuracy"]) == np.sum(chosen > rejected)


def test_likelihood_scores_are_mean_response_logprobs():
    lm = tiny_reward_model().lm
    tokens, mask, response_mask = rm.sequence_arrays(PROMPTS, CHOSEN, 8, 0)
    logits, _, _ = lm(tokens, positions_from_mask(mask), causal_mask(mask))
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    for row, (prompt, response) in enumerate(zip(PROMPTS, CHOSEN)):
        start = 8 - len(response)  # left-padded: the response is the last columns
        want = np.mean([logp[row, start + i - 1, t] for i, t in enumerate(response)])
        np.testing.assert_allclose(
            rm.likelihood_scores(lm, tokens, mask, response_mask)[row], want, rtol=1e-5)
    with pytest.raises(ValueError, match="reward model kind must be one of"):
        rm.reward_model_for(lm, "oracle")


@pytest.mark.parametrize("kind", ["value", "likelihood"])
def test_training_ranks_the_chosen_response_first(kind):
    model = rm.reward_model_for(tiny_reward_model().lm, kind)
    batch = rm.pair_batch(PROMPTS, CHOSEN, REJECTED, 8, 0)
    trainer = Trainer(model, make_optimizer(OptimConfig(learning_rate=3e-2)),
                      functools.partial(rm.preference_loss, kind=kind), trainable=nnx.Param)
    state = trainer.init()
    for _ in range(30):
        state, metrics = trainer.step(state, {k: v[None] for k, v in batch.items()})
    trained = trainer.model(state)
    assert rm.pair_accuracy(trained, batch, kind) == 1.0
    reward = rm.reward_fn(trained, 8, 0, kind)
    assert np.all(reward(PROMPTS, CHOSEN) > reward(PROMPTS, REJECTED))
