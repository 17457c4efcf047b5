"""Action-level PPO on TextWorld with a tiny model: collection and update compute one policy."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrl_llm.agent import AgentConfig, Transition, play
from jaxrl_llm.envs.textworld import GameConfig, TextWorldBatch
from jaxrl_llm.model import ModelConfig, Transformer
from jaxrl_llm.model.lora import LoraConfig, apply_lora
from jaxrl_llm.model.value_head import ActorCritic
from jaxrl_llm.packing import collate, pack_episode, packed_forward, packed_scorer
from jaxrl_llm.scoring import action_logprobs, categorical_entropy, categorical_kl
from jaxrl_llm.text import ByteTokenizer
from jaxrl_llm.train.ppo import (PackedRollout, PPOConfig, collate_steps, minibatches, ppo_loss,
                                 group_advantages, prepare_rollout, step_advantages,
                                 top_candidates)
from jaxrl_llm.train.step import OptimConfig, Trainer, make_optimizer

CONFIG = PPOConfig(minibatch_size=2, micro_batch_size=1, epochs=1)


def tiny_actor_critic():
    lm = Transformer(ModelConfig.tiny(vocab_size=257, max_seq_len=8192), rngs=nnx.Rngs(0))
    apply_lora(lm, LoraConfig(rank=4), nnx.Rngs(1))
    actor_critic = ActorCritic(lm)
    actor_critic.value_head.kernel[...] = 0.1 * jax.random.normal(jax.random.key(2), (64,))
    return actor_critic


@pytest.fixture(scope="module", params=[None, 1], ids=["packed", "window"])
def rollout(request):
    actor_critic = tiny_actor_critic()
    agent = AgentConfig(mode="score", greedy=False, prompt_style="compact",
                        max_history=request.param, cache_len=8192)
    with TextWorldBatch(GameConfig(step_limit=3), 2) as games:
        episodes, transitions = play(actor_critic.lm, ByteTokenizer(), games, [4, 5], "train",
                                     jax.random.key(0), agent,
                                     value_head=actor_critic.value_head)
    packed, stats = prepare_rollout(transitions, request.param is None,
                                    packed_scorer(actor_critic.lm), CONFIG, 8192, pad_id=256)
    return actor_critic, episodes, transitions, packed, stats


def assert_update_recomputes(actor_critic, transitions, packed, stats):
    """The packed forward gives the stored log pi(choice) and values: a ratio of exactly 1
    before any update, and a zero KL to a reference that is the policy itself."""
    assert stats["valid_action_rate"] == 1.0
    batch = jax.tree.map(jnp.asarray, collate_steps(packed, list(range(len(packed.episodes)))))
    out = packed_forward(actor_critic.lm, batch)
    mask = batch["leaf_lengths"] > 0
    logpi = action_logprobs(out.scores, mask)
    chosen = jnp.take_along_axis(logpi, batch["choice"][..., None], axis=-1)[..., 0]
    weight = batch["weight"] > 0
    np.testing.assert_allclose(np.asarray(chosen)[weight], np.asarray(batch["old_logprob"])[weight],
                               atol=1e-4)
    value = actor_critic.value_head(out.decision_hidden)
    np.testing.assert_allclose(np.asarray(value)[weight], np.asarray(batch["old_value"])[weight],
                               atol=1e-4)
    _, count, metrics = ppo_loss(actor_critic, batch, CONFIG)
    assert float(count) == len(transitions)
    assert float(metrics["approx_kl"][0]) == pytest.approx(0.0, abs=1e-6)
    assert float(metrics["clip_fraction"][0]) == 0.0
    assert float(metrics["clip_fraction"][1]) == len(transitions)
    assert float(metrics["kl_ref"]) == pytest.approx(0.0, abs=1e-5)  # reference == policy


@pytest.mark.textworld
def test_update_recomputes_the_collected_policy_exactly(rollout):
    # Play scored candidates against its KV cache; the update scores them in a packed forward.
    actor_critic, _, transitions, packed, stats = rollout
    for t in transitions:  # play's log pi over the candidates, and the chosen one's
        assert len(t.candidate_logprobs) == len(t.candidate_ids)
        assert np.logaddexp.reduce(t.candidate_logprobs) == pytest.approx(0.0, abs=1e-5)
        assert t.logprob == pytest.approx(t.candidate_logprobs[t.choice], abs=1e-6)
    assert stats["kept_mass"] == 1.0
    assert_update_recomputes(actor_critic, transitions, packed, stats)


@pytest.mark.textworld
def test_top_k_update_recomputes_the_renormalised_policy_exactly(rollout):
    actor_critic, _, transitions, packed, _ = rollout
    config = dataclasses.replace(CONFIG, top_k=2)
    shared = len(packed.episodes) < len(transitions)  # a packed game holds several steps
    small, stats = prepare_rollout(transitions, shared, packed_scorer(actor_critic.lm), config,
                                   8192, pad_id=256)
    assert max(len(t.candidate_ids) for t in transitions) > 3  # some steps lose candidates
    assert max(int((s > 0).sum()) for e in small.episodes for s in e.leaf_lengths) <= 3
    assert sum(e.num_tokens for e in small.episodes) < sum(e.num_tokens for e in packed.episodes)
    assert 0.0 < stats["kept_mass"] < 1.0
    assert_update_recomputes(actor_critic, transitions, small, stats)


def test_top_candidates_keep_the_likeliest_and_the_choice():
    probs = np.array([0.5, 0.05, 0.3, 0.1, 0.05])
    step = lambda choice: Transition(0, 0, "a", True, logprob=float(np.log(probs[choice])),
                                     choice=choice, candidate_ids=[[i] for i in range(5)],
                                     candidate_logprobs=np.log(probs).tolist())
    (kept, top), mass = top_candidates([step(3), step(0)], 2)
    assert kept.candidate_ids == [[0], [2], [3]] and kept.choice == 2
    assert kept.logprob == pytest.approx(np.log(0.1 / 0.9))
    np.testing.assert_allclose(np.exp(kept.candidate_logprobs), [0.5 / 0.9, 0.3 / 0.9, 0.1 / 0.9])
    assert top.candidate_ids == [[0], [2]] and top.choice == 0
    assert top.logprob == pytest.approx(np.log(0.5 / 0.8))
    np.testing.assert_allclose(mass, [0.9, 0.8])
    (same,), mass = top_candidates([step(1)], 5)  # k >= the candidates: nothing dropped
    assert same == step(1) and mass[0] == 1.0
    with pytest.raises(ValueError, match="candidate log-probs"):
        top_candidates([dataclasses.replace(step(1), candidate_logprobs=[0.0])], 2)


@pytest.mark.textworld
def test_rewards_land_on_their_step(rollout):
    _, episodes, transitions, _, stats = rollout
    for t in transitions:
        assert t.reward == episodes[t.game].rewards[t.step]
        assert t.logprob <= 0
    assert stats["transitions"] == sum(e.num_steps for e in episodes)
    # Every truncated game got the value of the state it was cut at.
    for g, e in enumerate(episodes):
        last = max((t for t in transitions if t.game == g), key=lambda t: t.step)
        assert (last.next_value != 0.0) == e.truncated


@pytest.mark.textworld
def test_padded_steps_and_candidates_never_reach_the_loss(rollout):
    actor_critic, _, _, packed, _ = rollout
    batch = jax.tree.map(jnp.asarray, collate_steps(packed, list(range(len(packed.episodes)))))
    padding = batch["weight"] == 0
    assert bool(padding.any())
    noise = lambda x, k: jnp.where(padding if x.ndim == 2 else padding[..., None],
                                   jax.random.normal(jax.random.key(k), x.shape) * 1e3, x)
    garbage = dict(batch, advantage=noise(batch["advantage"], 0),
                   old_logprob=noise(batch["old_logprob"], 1), ref_logpi=noise(batch["ref_logpi"], 2),
                   old_value=noise(batch["old_value"], 3),
                   **{"return": noise(batch["return"], 4)})
    # Padded candidate slots of real steps carry garbage reference log-probs too.
    no_leaf = ~(batch["leaf_lengths"] > 0)
    garbage["ref_logpi"] = jnp.where(no_leaf, 77.0, garbage["ref_logpi"])
    loss_fn = jax.jit(lambda b: ppo_loss(actor_critic, b, PPOConfig(kl_in="loss")))
    for a, b in zip(loss_fn(batch), loss_fn(garbage)):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5), a, b)
    graphdef, state = nnx.split(actor_critic)
    g = jax.jit(lambda b: jax.grad(lambda s: ppo_loss(nnx.merge(graphdef, s), b,
                                                      PPOConfig(kl_in="loss"))[0])(state))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-7),
                 g(batch), g(garbage))


@pytest.mark.textworld
def test_ppo_update_moves_only_adapters_and_value_head(rollout):
    actor_critic, _, _, packed, _ = rollout
    trainer = Trainer(actor_critic, make_optimizer(OptimConfig(learning_rate=1e-3)),
                      functools.partial(ppo_loss, config=CONFIG))
    state = trainer.init()
    before = jax.tree.map(np.asarray, state.trainable)
    for batch in minibatches(packed, CONFIG, jax.random.key(1), pad_id=256):
        state, metrics = trainer.step(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), before,
                           state.trainable)
    assert any(jax.tree.leaves(changed))


def test_action_update_raises_the_probability_of_a_rewarded_candidate():
    actor_critic = tiny_actor_critic()
    rng = np.random.default_rng(0)
    ids = lambda n: rng.integers(3, 250, n).tolist()
    episode = pack_episode([ids(20)], [ids(3)], [[ids(3), ids(4), ids(2)]])
    forward = packed_scorer(actor_critic.lm)

    def prob_of_one():
        b = collate([episode])
        logpi = action_logprobs(packed_scorer(trainer.model(state).lm)(b).scores, b["leaf_lengths"] > 0)
        return float(jnp.exp(logpi[0, 0, 1]))

    b = collate([episode])
    logpi = np.asarray(action_logprobs(forward(b).scores, b["leaf_lengths"] > 0))
    rollout = PackedRollout([episode], [dict(
        choice=np.array([1], np.int32), old_logprob=logpi[0, :1, 1],
        ref_logprob=logpi[0, :1, 1], ref_logpi=logpi[0, :1], old_value=np.zeros(1, np.float32),
        advantage=np.ones(1, np.float32), **{"return": np.ones(1, np.float32)})])
    config = PPOConfig(minibatch_size=1, micro_batch_size=1, kl_coef=0.0)
    trainer = Trainer(actor_critic, make_optimizer(OptimConfig(learning_rate=1e-2)),
                      functools.partial(ppo_loss, config=config))
    state = trainer.init()
    before = prob_of_one()
    for _ in range(3):
        (update,) = minibatches(rollout, config, jax.random.key(0))
        state, _ = trainer.step(state, update)
    assert prob_of_one() > 1.5 * before  # (clipped: at most ~1.2x per fresh ratio, 3 steps)


def test_categorical_entropy_and_kl_equal_numpy_with_padded_slots():
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(5, 7)).astype(np.float32) * 2
    ref_scores = rng.normal(size=(5, 7)).astype(np.float32) * 2
    mask = rng.random((5, 7)) < 0.7
    mask[:, 0] = True
    scores[~mask], ref_scores[~mask] = 1e9, -1e9  # padded slots hold garbage
    logpi = action_logprobs(jnp.asarray(scores), mask, temperature=0.7)
    ref = action_logprobs(jnp.asarray(ref_scores), mask, temperature=0.7)
    for row in range(5):
        s, r = scores[row][mask[row]] / 0.7, ref_scores[row][mask[row]] / 0.7
        lp = s - np.log(np.exp(s - s.max()).sum()) - s.max()
        lr = r - np.log(np.exp(r - r.max()).sum()) - r.max()
        np.testing.assert_allclose(np.asarray(logpi[row])[mask[row]], lp, rtol=1e-5, atol=1e-5)
        assert np.all(np.isneginf(np.asarray(logpi[row])[~mask[row]]))
        p = np.exp(lp)
        assert float(categorical_entropy(logpi, mask)[row]) == pytest.approx(-(p * lp).sum(),
                                                                             rel=1e-4, abs=1e-6)
        assert float(categorical_kl(logpi, ref, mask)[row]) == pytest.approx(
            (p * (lp - lr)).sum(), rel=1e-4, abs=1e-5)


def test_length_norm_divides_scores_by_token_counts():
    scores = jnp.asarray([[-4.0, -3.0]])
    lengths = jnp.asarray([[4, 1]])
    mask = jnp.asarray([[True, True]])
    normed = action_logprobs(scores, mask, lengths=lengths)
    np.testing.assert_allclose(np.asarray(normed), np.asarray(
        jax.nn.log_softmax(jnp.asarray([[-1.0, -3.0]]))), rtol=1e-6)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        action_logprobs(scores, mask, temperature=0.0)


def test_group_advantages_leave_one_out_per_game():
    # Games 0, 1 are two plays of one game, 2, 3 of another; steps come interleaved.
    games = [0, 1, 2, 3, 0, 3, 2, 0]
    rewards = np.array([0.5, 0.0, 0.25, 0.5, 0.0, 0.0, 0.25, 0.5], np.float32)
    transitions = [Transition(g, 0, "a", True) for g in games]
    # Totals: game 0 1.0, game 1 0.0 -> +1, -1; games 2 and 3 both 0.5 -> no signal.
    np.testing.assert_allclose(group_advantages(transitions, rewards, 2),
                               [1.0, -1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0], atol=1e-6)
    with pytest.raises(ValueError, match="4 games do not form groups of 3 plays"):
        group_advantages(transitions, rewards, 3)
    with pytest.raises(ValueError, match="group_size must be >= 2 with advantage 'rloo'"):
        PPOConfig(advantage="rloo")
    with pytest.raises(ValueError, match="advantage must be one of"):
        PPOConfig(advantage="vtrace")


@pytest.mark.textworld
def test_rloo_rollout_gives_every_step_of_a_play_its_advantage(rollout):
    actor_critic, _, transitions, _, _ = rollout
    # Four plays in groups of two: the fixture's games and copies of them as games 2 and 3,
    # game 1 one step shorter. Game 0 scores 1 at its first step, the others nothing.
    plays = transitions + [dataclasses.replace(t, game=t.game + 2) for t in transitions]
    last = max(t.step for t in plays if t.game == 1)
    plays = [dataclasses.replace(t, reward=float(t.game == 0 and t.step == 0)) for t in plays
             if not (t.game == 1 and t.step == last)]
    # Whitening left on only scales RLOO's advantages: not shifted by the steps' mean, the
    # tied group (games 2, 3) keeps exactly 0 although game 1 is shorter than game 0.
    config = dataclasses.replace(CONFIG, advantage="rloo", group_size=2, kl_coef=0.0)
    assert config.whiten_advantages
    packed, _ = prepare_rollout(plays, False, packed_scorer(actor_critic.lm), config, 8192,
                                pad_id=256)
    advantage = np.concatenate([s["advantage"] for s in packed.steps])
    game = np.array([t.game for t in plays])  # one step per sequence, in input order
    loo = np.select([game == 0, game == 1], [1.0, -1.0], 0.0)  # RLOO: +-1 and 0
    np.testing.assert_allclose(advantage, loo / loo.std(), atol=1e-5)
    assert (advantage[game >= 2] == 0).all()


def test_step_advantages_bootstrap_only_truncated_episodes():
    make = lambda game, step, value, terminated=False, truncated=False, next_value=0.0: Transition(
        game, step, "a", True, value=value, reward=1.0, terminated=terminated,
        truncated=truncated, next_value=next_value)
    transitions = [make(0, 0, 0.5), make(1, 0, 0.5), make(0, 1, 0.25, terminated=True),
                   make(1, 1, 0.25, truncated=True, next_value=10.0)]
    rewards = np.ones(4, np.float32)
    advantages, returns = step_advantages(transitions, rewards, 1.0, 1.0)
    # Game 0 terminated: returns 2, 1. Game 1 truncated with bootstrap 10: returns 12, 11.
    np.testing.assert_allclose(returns, [2.0, 12.0, 1.0, 11.0], atol=1e-5)
    values = np.array([t.value for t in transitions])
    np.testing.assert_allclose(advantages, returns - values, atol=1e-5)


def test_bad_ppo_config():
    with pytest.raises(ValueError, match="kl_in must be one of"):
        PPOConfig(kl_in="both")
    with pytest.raises(ValueError, match="top_k"):
        PPOConfig(top_k=-1)
    with pytest.raises(ValueError, match="multiple of micro_batch_size"):
        PPOConfig(minibatch_size=6, micro_batch_size=4)
    with pytest.raises(ValueError, match="policy must be one of"):
        PPOConfig(policy="token")
    with pytest.raises(ValueError, match="learning_rate and temperature must be > 0"):
        PPOConfig(learning_rate=0.0)


def test_a_game_longer_than_the_context_is_cut_with_its_whole_history():
    from jaxrl_llm.train.ppo import pack_rollout

    rng = np.random.default_rng(5)
    ids = lambda n: rng.integers(3, 250, n).tolist()
    transitions = [Transition(0, s, "a", True, context_ids=ids(10), tail_ids=ids(2),
                              candidate_ids=[ids(3), ids(4)]) for s in range(6)]
    (whole,), _ = pack_rollout(transitions, True, max_len=10_000)
    episodes, members = pack_rollout(transitions, True, max_len=80)
    assert len(episodes) == 2 and all(e.num_tokens <= 80 for e in episodes)
    assert [n for m in members for n in m] == list(range(6))
    # Step s of a cut sequence sees the same tokens at the same positions as in the whole one.
    for episode, group in zip(episodes, members):
        for local, s in enumerate(group):
            view = lambda e, b: (e.tokens[:e.decisions[b] + 1][
                (e.branch[:e.decisions[b] + 1] == -1) | (e.branch[:e.decisions[b] + 1] == b)])
            assert view(episode, local).tolist() == view(whole, s).tolist()
            assert episode.positions[episode.decisions[local]] == whole.positions[whole.decisions[s]]
    with pytest.raises(ValueError, match="more than the model's 50"):
        pack_rollout(transitions, True, max_len=50)
