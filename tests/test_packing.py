"""Packed episodes: every step's leaf scores and decision state equal the per-step prompt's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrl_llm.logprobs import token_logprobs
from jaxrl_llm.model import ModelConfig, Transformer, causal_mask, positions_from_mask
from jaxrl_llm.model.lora import LoraConfig, apply_lora
from jaxrl_llm.packing import (check_episodes, collate, pack_episode, packed_forward,
                               packed_scorer)


def tiny_lora(seed=0):
    model = Transformer(ModelConfig.tiny(), rngs=nnx.Rngs(seed))
    model = apply_lora(model, LoraConfig(rank=4, alpha=8), nnx.Rngs(seed + 1))
    # Nonzero adapters (B starts at zero): the packed path must carry the adapters too.
    for _, variable in nnx.iter_graph(model):
        if type(variable).__name__ == "LoraB":
            variable[...] = 0.05 * jax.random.normal(jax.random.key(7), variable.shape)
    return model


def random_game(rng, steps, max_leaves=4):
    ids = lambda lo, hi: rng.integers(3, 250, rng.integers(lo, hi)).tolist()
    trunk = [ids(5, 30) for _ in range(steps)]
    tails = [ids(1, 6) for _ in range(steps)]
    leaves = [[ids(1, 5) for _ in range(rng.integers(1, max_leaves + 1))] for _ in range(steps)]
    return trunk, tails, leaves


def per_step_reference(model, trunk, tails, leaves):
    """Step s as its own prompt (history + tail), each leaf a separate row of one batch."""
    prompts = [[i for chunk in trunk[:s + 1] for i in chunk] + tails[s] for s in range(len(tails))]
    rows = [(s, prompts[s], ids) for s in range(len(tails)) for ids in leaves[s]]
    rows += [(s, prompts[s], []) for s in range(len(tails))]  # bare prompts: decision states
    width = max(len(p) + len(ids) for _, p, ids in rows)
    seq = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), bool)
    for r, (_, p, ids) in enumerate(rows):
        seq[r, :len(p) + len(ids)], mask[r, :len(p) + len(ids)] = p + ids, True
    seq, mask = jnp.asarray(seq), jnp.asarray(mask)
    logits, h, _ = jax.jit(lambda s, m: model(s, positions_from_mask(m), causal_mask(m)))(seq, mask)
    logprobs = np.asarray(token_logprobs(logits[:, :-1], seq[:, 1:]))
    scores = [[] for _ in tails]
    hidden = [None] * len(tails)
    for r, (s, p, ids) in enumerate(rows):
        if ids:
            scores[s].append(float(logprobs[r, len(p) - 1:len(p) + len(ids) - 1].sum()))
        else:
            hidden[s] = np.asarray(h[r, len(p) - 1])
    return scores, hidden


@pytest.mark.parametrize("at_least", [(0, 0, 0, 0), (300, 100, 9, 7)])
def test_packed_forward_equals_per_step_prompts(at_least):
    """Also when collated wider than needed (`at_least`): the extra slots are inert."""
    model = tiny_lora()
    rng = np.random.default_rng(0)
    games = [random_game(rng, steps) for steps in (5, 3)]
    batch = collate([pack_episode(*g) for g in games], at_least=at_least)
    assert all(w >= least for w, least in zip(
        (batch["tokens"].shape[1], batch["targets"].shape[1], *batch["leaf_lengths"].shape[1:]),
        at_least))
    out = packed_forward(model, jax.tree.map(jnp.asarray, batch))
    for row, game in enumerate(games):
        scores, hidden = per_step_reference(model, *game)
        for s, step_scores in enumerate(scores):
            np.testing.assert_allclose(np.asarray(out.scores[row, s, :len(step_scores)]),
                                       step_scores, rtol=1e-5, atol=1e-5)
            assert np.all(np.asarray(out.scores[row, s, len(step_scores):]) == 0)
            np.testing.assert_allclose(np.asarray(out.decision_hidden[row, s]), hidden[s],
                                       atol=1e-5)


def test_changing_a_branch_changes_nothing_outside_it():
    model = tiny_lora()
    trunk, tails, leaves = random_game(np.random.default_rng(1), 4)
    packed = pack_episode(trunk, tails, leaves)
    changed_leaves = [list(map(list, s)) for s in leaves]
    changed_leaves[1][0][0] = (changed_leaves[1][0][0] + 17) % 250 + 3
    changed_tails = [list(t) for t in tails]
    changed_tails[2][0] = (changed_tails[2][0] + 5) % 250 + 3
    forward = lambda p: model(jnp.asarray(p.tokens[None]), jnp.asarray(p.positions[None]),
                              _mask(p))[0][0]
    base = np.asarray(forward(packed))
    for tails_, leaves_, step in ((tails, changed_leaves, 1), (changed_tails, leaves, 2)):
        other = pack_episode(trunk, tails_, leaves_)
        diff = np.abs(np.asarray(forward(other)) - base).max(-1)
        inside = packed.branch == step
        if step == 1:  # only leaf 0 of step 1 changed: its sibling leaves must not see it
            inside = inside & ((packed.leaf == 0) | (packed.leaf == -1))
        assert diff[inside].max() > 0
        assert diff[~inside].max() == 0


def _mask(packed):
    from jaxrl_llm.model import BranchMask

    return BranchMask(jnp.asarray(packed.branch[None]), jnp.asarray(packed.leaf[None]))


def test_long_rows_use_query_blocks_and_stay_exact():
    # Past 256 tokens attention runs in query blocks, each building its own mask block.
    model = tiny_lora()
    rng = np.random.default_rng(2)
    trunk, tails, leaves = random_game(rng, 14)
    trunk = [chunk * 2 for chunk in trunk]
    packed = pack_episode(trunk, tails, leaves)
    assert packed.num_tokens > 600
    out = packed_forward(model, jax.tree.map(jnp.asarray, collate([packed])))
    scores, _ = per_step_reference(model, trunk, tails, leaves)
    for s in (0, 7, 13):
        np.testing.assert_allclose(np.asarray(out.scores[0, s, :len(scores[s])]), scores[s],
                                   rtol=1e-5, atol=1e-5)


def test_positions_of_a_branch_continue_from_its_history():
    packed = pack_episode([[5, 6, 7], [8, 9]], [[10], [11, 12]], [[[13, 14], [15]], [[16]]])
    np.testing.assert_array_equal(packed.tokens,
                                  [5, 6, 7, 10, 13, 14, 15, 8, 9, 11, 12, 16])
    np.testing.assert_array_equal(packed.positions, [0, 1, 2, 3, 4, 5, 4, 3, 4, 5, 6, 7])
    np.testing.assert_array_equal(packed.branch, [-1, -1, -1, 0, 0, 0, 0, -1, -1, 1, 1, 1])
    np.testing.assert_array_equal(packed.leaf, [-1, -1, -1, -1, 0, 0, 1, -1, -1, -1, -1, 0])
    np.testing.assert_array_equal(packed.predictors, [3, 4, 3, 10])
    np.testing.assert_array_equal(packed.decisions, [3, 10])
    np.testing.assert_array_equal(packed.leaf_lengths, [[2, 1], [1, 0]])
    assert collate([packed])["leaf_lengths"].shape == (1, 16, 16)  # bucketed: few programs


def test_bad_episodes_are_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="no tokens"):
        pack_episode([[1]], [[2]], [[[]]])
    with pytest.raises(ValueError, match="no actions"):
        pack_episode([[1], [2]], [[2], [3]], [[], [[4]]])
    with pytest.raises(ValueError, match="empty tail"):
        pack_episode([[1]], [[]], [[[4]]])
    packed = pack_episode([[1] * 40], [[2]], [[[3]]])
    with pytest.raises(ValueError, match="max_seq_len"):
        check_episodes([packed], max_seq_len=32, vocab_size=256)
    with pytest.raises(ValueError, match="another tokenizer"):
        check_episodes([pack_episode([[300]], [[2]], [[[3]]])], max_seq_len=64, vocab_size=256)


@pytest.mark.real_model
@pytest.mark.textworld
def test_packed_gold_game_equals_play_on_the_default_model():
    """SmolLM2 int8 + nonzero LoRA, float32, a whole gold game with every valid action as a
    candidate: the packed forward's action scores, values and argmax equal those of play's
    path (each step's new history text and tail scored against the KV cache of the steps
    before, the new text kept in it)."""
    from jaxrl_llm.data import encode_episode, expert_episodes
    from jaxrl_llm.envs.textworld import GameConfig
    from jaxrl_llm.generation import DecodeState, score_continuations
    from jaxrl_llm.padding import pad_right
    from jaxrl_llm.model import load_model
    from jaxrl_llm.model.value_head import ValueHead

    _, model, tokenizer = load_model(quantize="int8")
    model = apply_lora(model, LoraConfig(rank=8, alpha=32), nnx.Rngs(0))
    for _, variable in nnx.iter_graph(model):
        if type(variable).__name__ == "LoraB":
            variable[...] = 0.02 * jax.random.normal(jax.random.key(3), variable.shape)
    head = ValueHead(model.config.d_model)
    head.kernel[...] = 0.05 * jax.random.normal(jax.random.key(4), head.kernel.shape)
    rows = expert_episodes(GameConfig(), range(8), "train", progress=False)
    row = next(r for r in rows if len(r["actions"]) >= 18)
    (packed,), gold = encode_episode(tokenizer, row, "compact", candidates=True)
    out = packed_scorer(model)(jax.tree.map(jnp.asarray, collate([packed], pad_id=0)))
    state, kept = DecodeState.empty(model.config, 1, 2048), 0
    for s in range(len(packed.decisions)):
        seen = (packed.branch == -1) & (np.arange(packed.num_tokens) < packed.decisions[s])
        new = packed.tokens[seen][kept:].tolist()
        kept += len(new)
        tail = packed.tokens[(packed.branch == s) & (packed.leaf == -1)].tolist()
        leaves = [packed.tokens[(packed.branch == s) & (packed.leaf == c)].tolist()
                  for c in range(int((packed.leaf_lengths[s] > 0).sum()))]
        candidates = np.zeros((1, len(leaves), 16), np.int32)
        mask = np.zeros(candidates.shape, bool)
        for c, ids in enumerate(leaves):
            candidates[0, c, :len(ids)], mask[0, c, :len(ids)] = ids, True
        (scores, hidden), state = score_continuations(model, state, *pad_right([new + tail]),
                                                      candidates, mask, keep=[len(new)])
        np.testing.assert_allclose(np.asarray(out.scores[0, s, :len(leaves)]),
                                   np.asarray(scores[0]), atol=1e-4, rtol=0)
        assert int(np.argmax(out.scores[0, s, :len(leaves)])) == int(np.argmax(scores[0]))
        np.testing.assert_allclose(float(head(out.decision_hidden[0, s])), float(head(hidden[0])),
                                   atol=1e-4)
    assert len(packed.decisions) >= 18 and sum(g >= 0 for g in gold) >= 17
