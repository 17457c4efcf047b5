"""SFT: batching keeps every example once, the loss is on completions only, and it learns."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxrl_llm.logprobs import score_responses, token_logprobs
from jaxrl_llm.model import ModelConfig, Transformer, causal_mask, positions_from_mask
from jaxrl_llm.model.lora import LoraConfig, apply_lora
from jaxrl_llm.packing import pack_episode
from jaxrl_llm.padding import bucket_length
from jaxrl_llm.train.sft import (SFTConfig, batches, completion_loss, episode_batches,
                                 packed_choice_loss, packed_completion_loss)
from jaxrl_llm.train.step import OptimConfig, Trainer, make_optimizer, micro_batches
from tests.test_packing import per_step_reference


def tiny_lora():
    model = Transformer(ModelConfig.tiny(), rngs=nnx.Rngs(0))
    return apply_lora(model, LoraConfig(rank=8, alpha=16), nnx.Rngs(1))


def examples(n, seed=0):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, 256, rng.integers(5, 40)).tolist() for _ in range(n)]
    completions = [rng.integers(3, 256, rng.integers(1, 6)).tolist() for _ in range(n)]
    return prompts, completions


def test_score_responses_equals_full_forward_slices():
    model = tiny_lora()
    prompts, completions = examples(3)
    config = SFTConfig(batch_size=3, micro_batch_size=3)
    batch = next(batches(prompts, completions, config, epoch=0))[0]
    logprobs, _, hidden = score_responses(model, *(jnp.asarray(batch[k]) for k in (
        "prompt", "prompt_mask", "completion", "completion_mask")))
    for row in range(3):
        p = batch["prompt"][row][batch["prompt_mask"][row]].tolist()
        c = batch["completion"][row][batch["completion_mask"][row]].tolist()
        seq = jnp.asarray([p + c])
        mask = jnp.ones(seq.shape, bool)
        logits, full_hidden, _ = model(seq, positions_from_mask(mask), causal_mask(mask))
        ref = token_logprobs(logits[:, len(p) - 1:-1], seq[:, len(p):])[0]
        np.testing.assert_allclose(np.asarray(logprobs[row, :len(c)]), np.asarray(ref), atol=1e-5)
        assert np.all(np.asarray(logprobs[row, len(c):]) == 0)
        np.testing.assert_allclose(np.asarray(hidden[row]), np.asarray(full_hidden[0, len(p) - 1]),
                                   atol=1e-5)


def test_batches_cover_every_example_once_with_padding_rows_masked():
    prompts, completions = examples(21)
    config = SFTConfig(batch_size=4, micro_batch_size=2)
    seen = []
    for batch in batches(prompts, completions, config, epoch=0):
        assert len(batch) == 2
        for micro in batch:
            assert micro["prompt"].shape[0] == 2
            # Each micro-batch is cut to the bucket of its own longest prompt.
            assert micro["prompt"].shape[1] == bucket_length(micro["prompt_mask"].sum(1).max())
            for row in range(2):
                if micro["completion_mask"][row].any():
                    seen.append((tuple(micro["prompt"][row][micro["prompt_mask"][row]]),
                                 tuple(micro["completion"][row][micro["completion_mask"][row]])))
    assert sorted(seen) == sorted((tuple(p), tuple(c)) for p, c in zip(prompts, completions))


def test_micro_batches_cut_to_their_own_width_give_the_padded_update():
    """Cutting each micro-batch's prompt padding changes no gradient: the same rows, all padded
    to the batch's full width and stacked, give the same update and metrics."""
    prompts, completions = examples(8, seed=3)
    prompts[0] = prompts[0] * 3  # one long prompt: the others are cut to a narrower bucket
    config = SFTConfig(batch_size=8, micro_batch_size=2, remat=False)
    cut = next(batches(prompts, completions, config, epoch=0))
    assert len({micro["prompt"].shape[1] for micro in cut}) > 1
    width = max(micro["prompt"].shape[1] for micro in cut)
    widen = lambda x: np.pad(x, ((0, 0), (width - x.shape[1], 0)))
    stacked = {k: np.stack([widen(m[k]) if k.startswith("prompt") else m[k] for m in cut])
               for k in cut[0]}
    results = []
    for batch in (cut, stacked):
        # Plain SGD: the update is the gradient itself (Adam's first step would amplify the
        # float noise of near-zero gradients to +-lr).
        trainer = Trainer(tiny_lora(), optax.sgd(1.0), completion_loss)
        state, metrics = trainer.step(trainer.init(), batch)
        results.append((state.trainable, metrics))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), *results)


def test_sft_learns_completions():
    prompts, completions = examples(8, seed=1)
    config = SFTConfig(batch_size=8, micro_batch_size=4, remat=False)
    trainer = Trainer(tiny_lora(), make_optimizer(OptimConfig(learning_rate=1e-2)),
                      completion_loss)
    state = trainer.init()
    first = last = None
    for epoch in range(25):
        for batch in batches(prompts, completions, config, epoch):
            state, metrics = trainer.step(state, jax.tree.map(jnp.asarray, batch))
            first = first if first is not None else float(metrics["loss"])
            last = float(metrics["loss"])
    assert last < 0.8 * first


def test_bad_sft_inputs():
    with pytest.raises(ValueError, match="multiple of micro_batch_size"):
        SFTConfig(batch_size=6, micro_batch_size=4)
    with pytest.raises(ValueError, match="exceed completion_len=2"):
        next(batches([[1, 2]], [[3, 4, 5]], SFTConfig(completion_len=2), 0))
    rows = dict(prompt=np.ones((4, 16), np.int32), prompt_mask=np.ones((4, 16), bool))
    for size in (0, 3):
        with pytest.raises(ValueError, match=f"micro-batches of {size}: use a size >= 1"):
            micro_batches(rows, size)


def random_games(n, seed=0, candidates=1):
    rng = np.random.default_rng(seed)
    ids = lambda lo, hi: rng.integers(3, 250, rng.integers(lo, hi)).tolist()
    games = []
    for _ in range(n):
        steps = int(rng.integers(2, 5))
        games.append(([ids(4, 20) for _ in range(steps)], [ids(1, 4) for _ in range(steps)],
                      [[ids(1, 5) for _ in range(candidates)] for _ in range(steps)]))
    return games


def test_packed_sft_gradient_equals_the_per_step_gradient():
    """The packed loss is the per-step completion loss with the history shared: same tokens,
    same contexts, same token weighting, so the same update."""
    games = random_games(3)
    packed = [pack_episode(*g) for g in games]
    prompts, completions = [], []
    for trunk, tails, leaves in games:
        for s in range(len(tails)):
            prompts.append([i for chunk in trunk[:s + 1] for i in chunk] + tails[s])
            completions.append(leaves[s][0])
    per_step = next(batches(prompts, completions, SFTConfig(batch_size=len(prompts),
                                                            micro_batch_size=len(prompts)), 0))
    packed_batch = next(episode_batches(packed, SFTConfig(batch_size=3, micro_batch_size=3), 0))
    results = []
    for loss_fn, batch in ((completion_loss, per_step), (packed_completion_loss, packed_batch)):
        trainer = Trainer(tiny_lora(), optax.sgd(1.0), loss_fn)
        state, metrics = trainer.step(trainer.init(), batch)
        results.append((state.trainable, metrics["loss"], metrics["tokens"]))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), *results)


def test_choice_loss_is_the_cross_entropy_over_candidates_plus_the_gold_nll():
    games = random_games(2, seed=4, candidates=3)
    packed = [pack_episode(*g) for g in games]
    gold = [[s % 3 for s in range(len(g[1]))] for g in games]
    gold[0][0] = -1  # a gold action that is not among the valid ones: skipped
    model = tiny_lora()
    (batch,) = next(episode_batches(packed, SFTConfig(batch_size=2, micro_batch_size=2), 0,
                                    gold=gold))
    loss, count, metrics = packed_choice_loss(model, jax.tree.map(jnp.asarray, batch))
    expected, correct = 0.0, 0
    for game, steps in zip(games, gold):
        for scores, g in zip(per_step_reference(model, *game)[0], steps):
            if g < 0:
                continue
            scores = np.array(scores)
            log_pi = scores - np.log(np.exp(scores - scores.max()).sum()) - scores.max()
            expected += -log_pi[g] - scores[g]
            correct += int(np.argmax(scores) == g)
    assert float(count) == sum(g >= 0 for steps in gold for g in steps)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert float(metrics["choice_accuracy"]) == correct


def test_gold_action_accuracy_per_group_is_counted_by_hand():
    from types import SimpleNamespace

    from jaxrl_llm.train.sft import gold_action_accuracy

    # A scorer that always prefers leaf 0: a step is right iff its gold index is 0.
    prefer_first = lambda batch: SimpleNamespace(scores=np.where(
        batch["leaf_lengths"] > 0, -np.arange(batch["leaf_lengths"].shape[-1]), -1e9))
    episodes = [pack_episode([[1, 2], [3]], [[4], [5]], [[[6], [7]], [[8], [9], [10]]]),
                pack_episode([[1]], [[4]], [[[6], [7]]])]
    gold, verbs = [[0, 2], [0]], [["take", "cook"], ["cook"]]
    result = gold_action_accuracy(prefer_first, episodes, gold, groups=verbs)
    assert result["action_accuracy"] == pytest.approx(2 / 3) and result["steps"] == 3
    assert (result["accuracy/take"], result["steps/take"]) == (1.0, 1)
    assert (result["accuracy/cook"], result["steps/cook"]) == (0.5, 2)
    assert not any(k.startswith("accuracy/") for k in gold_action_accuracy(
        prefer_first, episodes, gold))
    with pytest.raises(ValueError, match="one label per step"):
        gold_action_accuracy(prefer_first, episodes, gold, groups=[["take"], ["cook"]])
