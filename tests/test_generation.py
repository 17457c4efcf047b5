"""Generation: cache == no cache, log-probs == a full forward, masking, keys, filters, buckets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrl_llm import generation, padding
from jaxrl_llm.generation import DecodeState, extend, generate, generate_from
from jaxrl_llm.logprobs import token_logprobs
from jaxrl_llm.model import ModelConfig, Transformer, causal_mask, positions_from_mask
from jaxrl_llm.padding import pad_candidates, pad_right
from jaxrl_llm.sampling import SamplingConfig, top_p_filter


@pytest.fixture(scope="module")
def model():
    return Transformer(ModelConfig.tiny(), rngs=nnx.Rngs(0))


@nnx.jit
def _forward(model, tokens, mask):
    return model(tokens, positions_from_mask(mask), causal_mask(mask))[0]


def full_logits(model, tokens):
    """Logits of `tokens [B, T]` by one forward without a cache, right-padded to a bucketed
    width (causal: the padding changes no real position) so few programs compile."""
    tokens = np.asarray(tokens).tolist()
    padded, mask = pad_right(tokens)
    return np.asarray(_forward(model, jnp.asarray(padded), jnp.asarray(mask)))[:, :len(tokens[0])]


def greedy_reference(model, prompt, num_new):
    """Greedy decoding by full forwards without a cache, at one right-padded width (causal)."""
    width = len(prompt) + num_new
    step = jax.jit(lambda t: model(t, jnp.arange(width)[None], causal_mask(jnp.ones_like(t)))[0])
    tokens = np.zeros((1, width), np.int32)
    tokens[0, :len(prompt)] = prompt
    for n in range(len(prompt), width):
        tokens[0, n] = int(np.argmax(step(jnp.asarray(tokens))[0, n - 1]))
    return tokens[0, len(prompt):]


def random_prompts(lengths, vocab, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, n).tolist() for n in lengths]


def test_greedy_equals_no_cache_loop(model):
    prompts = random_prompts([9, 4, 15], model.config.vocab_size)
    tokens, mask = pad_right(prompts)
    out = generate(model, tokens, mask, jax.random.key(0), SamplingConfig(8, greedy=True))
    for row, prompt in enumerate(prompts):
        np.testing.assert_array_equal(np.asarray(out.tokens[row]), greedy_reference(model, prompt, 8))
    assert np.all(np.asarray(out.mask)) and np.all(np.asarray(out.lengths) == 8)


def test_sampled_logprobs_equal_full_forward(model):
    prompts = random_prompts([6, 11], model.config.vocab_size, seed=1)
    tokens, mask = pad_right(prompts)
    out = generate(model, tokens, mask, jax.random.key(3), SamplingConfig(10))
    for row, prompt in enumerate(prompts):
        seq = prompt + np.asarray(out.tokens[row]).tolist()
        logits = full_logits(model, [seq])[:, len(prompt) - 1:-1]
        ref = token_logprobs(jnp.asarray(logits), jnp.asarray([seq[len(prompt):]]))
        np.testing.assert_allclose(np.asarray(out.logprobs[row]), np.asarray(ref[0]), atol=1e-4)


def test_temperature_logprobs_are_of_the_scaled_distribution(model):
    tokens, mask = pad_right(random_prompts([7], model.config.vocab_size, seed=2))
    out = generate(model, tokens, mask, jax.random.key(0), SamplingConfig(1, temperature=0.5))
    logits = full_logits(model, tokens[:, :7])[:, -1:]
    ref = token_logprobs(jnp.asarray(logits) / 0.5, out.tokens[:, :1])
    np.testing.assert_allclose(np.asarray(out.logprobs[:, 0]), np.asarray(ref[:, 0]), atol=1e-5)


def test_tokens_after_stop_are_masked(model):
    tokens, mask = pad_right(random_prompts([5, 8, 3, 6], model.config.vocab_size, seed=4))
    # Half the vocabulary stops a row, so rows end at different steps.
    stop = tuple(range(0, model.config.vocab_size, 2))
    sampling = SamplingConfig(12, stop_ids=stop, pad_id=0)
    out = jax.tree.map(np.asarray, generate(model, tokens, mask, jax.random.key(5), sampling))
    for row in range(4):
        n = out.lengths[row]
        assert out.mask[row, :n].all() and not out.mask[row, n:].any()
        if n < 12:
            assert out.tokens[row, n - 1] in stop
        assert not np.isin(out.tokens[row, :n - 1], stop).any()
        assert (out.tokens[row, n:] == 0).all() and (out.logprobs[row, n:] == 0).all()
    assert len(set(out.lengths.tolist())) > 1


def test_same_key_same_tokens_different_keys_differ(model):
    tokens, mask = pad_right(random_prompts([5, 9], model.config.vocab_size, seed=6))
    sample = lambda k: np.asarray(generate(model, tokens, mask, jax.random.key(k),
                                           SamplingConfig(16)).tokens)
    np.testing.assert_array_equal(sample(1), sample(1))
    assert not np.array_equal(sample(1), sample(2))


def test_top_k_1_equals_greedy(model):
    tokens, mask = pad_right(random_prompts([5, 9], model.config.vocab_size, seed=7))
    greedy = generate(model, tokens, mask, jax.random.key(0), SamplingConfig(8, greedy=True))
    top1 = generate(model, tokens, mask, jax.random.key(9), SamplingConfig(8, top_k=1))
    np.testing.assert_array_equal(np.asarray(greedy.tokens), np.asarray(top1.tokens))
    np.testing.assert_allclose(np.asarray(top1.logprobs), 0.0, atol=1e-6)  # one token left


def test_top_p_filter_matches_numpy():
    logits = np.random.default_rng(0).normal(size=(5, 50)).astype(np.float32) * 3
    for top_p in (0.1, 0.5, 0.9, 1.0):
        ours = np.asarray(top_p_filter(jnp.asarray(logits), top_p))
        for row in range(5):
            probs = np.exp(logits[row] - logits[row].max())
            probs /= probs.sum()
            keep, mass = set(), 0.0
            for idx in np.argsort(-probs):
                keep.add(idx)
                mass += probs[idx]
                if mass >= top_p:
                    break
            assert set(np.flatnonzero(np.isfinite(ours[row]))) == keep
            np.testing.assert_array_equal(ours[row][list(keep)], logits[row][list(keep)])


def test_incremental_prefill_equals_full_prefill(model):
    vocab = model.config.vocab_size
    turns = [random_prompts([7, 3], vocab, seed=10), random_prompts([2, 9], vocab, seed=11),
             random_prompts([5, 5], vocab, seed=12)]
    tail = random_prompts([4, 2], vocab, seed=13)
    sampling = SamplingConfig(6, temperature=0.8)
    state = DecodeState.empty(model.config, 2, 64)
    for chunk in turns:
        state = extend(model, state, *pad_right(chunk))
    incremental, state = generate_from(model, state, *pad_right(tail), jax.random.key(4), sampling)
    full_rows = [sum((turn[row] for turn in turns), []) + tail[row] for row in range(2)]
    full = generate(model, *pad_right(full_rows), jax.random.key(4), sampling)
    np.testing.assert_array_equal(np.asarray(incremental.tokens), np.asarray(full.tokens))
    np.testing.assert_allclose(np.asarray(incremental.logprobs), np.asarray(full.logprobs),
                               atol=1e-5)
    # The tail was dropped: the same call again gives the same answer.
    again, _ = generate_from(model, state, *pad_right(tail), jax.random.key(4), sampling)
    np.testing.assert_array_equal(np.asarray(again.tokens), np.asarray(full.tokens))


def test_length_groups_split_only_when_padding_shrinks():
    groups = padding.length_groups([900, 20, 30, 850, 25, 40], group_rows=3)
    assert [sorted(g.tolist()) for g in groups] == [[1, 2, 4], [0, 3, 5]]
    # Similar lengths: one group, rows in order (one compiled program).
    np.testing.assert_array_equal(padding.length_groups([500, 510, 490, 505], 2)[0],
                                  np.arange(4))
    with pytest.raises(ValueError, match="group_rows must be >= 1"):
        padding.length_groups([3], 0)


def test_grouped_prefill_equals_one_batch(model):
    vocab = model.config.vocab_size
    history = random_prompts([5, 70, 3, 64, 9], vocab, seed=20)
    more = random_prompts([40, 2, 33, 1, 0], vocab, seed=21)
    tail = random_prompts([3, 4, 2, 5, 1], vocab, seed=22)
    sampling = SamplingConfig(5)
    outputs = []
    for group_rows in (1, 2, 64):  # 5, 3 and 1 groups
        state = DecodeState.empty(model.config, 5, 256)
        state = extend(model, state, *pad_right(history), group_rows=group_rows)
        state = extend(model, state, *pad_right(more), group_rows=group_rows)
        np.testing.assert_array_equal(np.asarray(state.lengths),
                                      [len(h) + len(m) for h, m in zip(history, more)])
        out, _ = generate_from(model, state, *pad_right(tail), jax.random.key(7), sampling)
        outputs.append(out)
    for out in outputs[:2]:
        np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(outputs[2].tokens))
        np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(outputs[2].logprobs),
                                   atol=1e-5)
        np.testing.assert_allclose(np.asarray(out.prompt_hidden),
                                   np.asarray(outputs[2].prompt_hidden), atol=1e-5)


# The second case fills the 48-slot cache exactly (32 prompt + 16 new tokens): the grouped
# prefill's one-token tail must not count as a bucket of 16 ("needs 63 cache slots").
@pytest.mark.parametrize("lengths, new_tokens", [([4, 90, 6, 80], 6), ([4, 6, 32, 30], 16)])
def test_generate_groups_prompts_by_length(model, lengths, new_tokens):
    prompts = random_prompts(lengths, model.config.vocab_size, seed=23)
    sampling = SamplingConfig(new_tokens, greedy=True)
    grouped = generate(model, *pad_right(prompts), jax.random.key(0), sampling, group_rows=2)
    whole = generate(model, *pad_right(prompts), jax.random.key(0), sampling, group_rows=4)
    np.testing.assert_array_equal(np.asarray(grouped.tokens), np.asarray(whole.tokens))
    np.testing.assert_allclose(np.asarray(grouped.logprobs), np.asarray(whole.logprobs),
                               atol=1e-5)
    assert len(padding.length_groups(lengths, 2)) == 2  # the grouped path ran


def test_left_padding_in_generate(model):
    prompts = random_prompts([3, 10], model.config.vocab_size, seed=14)
    tokens = np.zeros((2, 10), np.int32)
    mask = np.zeros((2, 10), bool)
    tokens[0, 7:], mask[0, 7:] = prompts[0], True
    tokens[1], mask[1] = prompts[1], True
    left = generate(model, tokens, mask, jax.random.key(0), SamplingConfig(5, greedy=True))
    right = generate(model, *pad_right(prompts), jax.random.key(0), SamplingConfig(5, greedy=True))
    np.testing.assert_array_equal(np.asarray(left.tokens), np.asarray(right.tokens))


def test_bucketing_bounds_compiles(model):
    sampling = SamplingConfig(4, greedy=True, eos_ids=(1,))
    before = generation.compile_count()
    for n in (17, 20, 23, 24):  # one bucket: 24-wide prompt, one 32-slot cache
        tokens, mask = pad_right(random_prompts([n, n - 5], model.config.vocab_size, seed=n))
        generate(model, tokens, mask, jax.random.key(n), sampling)
    assert generation.compile_count() - before == 1


def reference_scores(model, context, cands):
    out = []
    for ids in cands:
        logits = full_logits(model, [context + ids])[:, len(context) - 1:-1]
        out.append(float(jnp.sum(token_logprobs(jnp.asarray(logits), jnp.asarray([ids])))))
    return out


def test_score_continuations_prefills_kept_history_and_skips_other_rows(model):
    from jaxrl_llm.generation import score_continuations

    vocab = model.config.vocab_size
    history, new, tail = (random_prompts(n, vocab, seed) for n, seed in
                          (([9, 4, 6], 30), ([5, 12, 3], 31), ([2, 3, 1], 32)))
    cands = [random_prompts(n, vocab, 33 + b) for b, n in enumerate([[2, 3], [4, 1, 2], [3]])]
    state = extend(model, DecodeState.empty(model.config, 3, 96), *pad_right(history))
    # Rows 2 and 0 (in that order) feed new history + tail; row 1 is left alone.
    scored = [2, 0]
    (scores, _), state = score_continuations(
        model, state, *pad_right([new[b] + tail[b] for b in scored]),
        *pad_candidates([cands[b] for b in scored]), keep=[len(new[b]) for b in scored],
        rows=scored)
    for i, b in enumerate(scored):
        want = reference_scores(model, history[b] + new[b] + tail[b], cands[b])
        np.testing.assert_allclose(np.asarray(scores)[i, :len(want)], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(state.lengths), [9 + 5, 4, 6 + 3])
    # The kept text is history now (and row 1's is untouched): a plain scoring step agrees with
    # the full forward of every row's whole context.
    (scores, _), state = score_continuations(model, state, *pad_right(tail),
                                             *pad_candidates(cands))
    for b, kept in enumerate([history[0] + new[0], history[1], history[2] + new[2]]):
        want = reference_scores(model, kept + tail[b], cands[b])
        np.testing.assert_allclose(np.asarray(scores)[b, :len(want)], want, rtol=1e-5, atol=1e-5)
    # Every row at once (the cache is written in place) and keeping the tails: the next step
    # sees them as history.
    _, state = score_continuations(model, state, *pad_right(tail), *pad_candidates(cands),
                                   keep=[len(t) for t in tail])
    (scores, _), state = score_continuations(model, state, *pad_right(new),
                                             *pad_candidates(cands))
    for b, kept in enumerate([history[0] + new[0], history[1], history[2] + new[2]]):
        want = reference_scores(model, kept + tail[b] + new[b], cands[b])
        np.testing.assert_allclose(np.asarray(scores)[b, :len(want)], want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="keep must be"):
        score_continuations(model, state, *pad_right(tail), *pad_candidates(cands),
                            keep=[9, 0, 0])
    with pytest.raises(ValueError, match="distinct rows"):
        score_continuations(model, state, *pad_right(tail[:2]), *pad_candidates(cands[:2]),
                            rows=[1, 1])


def test_scoring_most_rows_computes_every_row_in_place_and_leaves_the_rest_intact(model):
    from jaxrl_llm.generation import score_continuations

    vocab = model.config.vocab_size
    history, new = (random_prompts(n, vocab, seed) for n, seed in
                    (([9, 4, 30, 6], 40), ([5, 12, 3, 2], 41)))
    cands = [random_prompts(n, vocab, 43 + b) for b, n in enumerate([[2, 3], [4, 1], [3], [2]])]
    state = extend(model, DecodeState.empty(model.config, 4, 128), *pad_right(history))
    # 3 of 4 rows make a full group: row 2 (the longest history) is computed as a placeholder.
    scored = [3, 0, 1]
    (scores, _), state = score_continuations(
        model, state, *pad_right([new[b] for b in scored]),
        *pad_candidates([cands[b] for b in scored]), keep=[len(new[b]) for b in scored],
        rows=scored)
    for i, b in enumerate(scored):
        want = reference_scores(model, history[b] + new[b], cands[b])
        np.testing.assert_allclose(np.asarray(scores)[i, :len(want)], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(state.lengths), [9 + 5, 4 + 12, 30, 6 + 2])
    (scores, _), state = score_continuations(model, state, *pad_right(new),
                                             *pad_candidates(cands))
    for b in range(4):
        kept = history[b] + (new[b] if b != 2 else [])
        want = reference_scores(model, kept + new[b], cands[b])
        np.testing.assert_allclose(np.asarray(scores)[b, :len(want)], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs,message", [
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(temperature=-1.0), "temperature must be > 0"),
    (dict(top_k=-2), "top_k must be >= 0"),
])
def test_bad_sampling_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**kwargs)


def test_bad_prompts(model):
    tokens, mask = pad_right([[5, 6], [7]])
    mask[1] = False
    with pytest.raises(ValueError, match="empty prompt"):
        generate(model, tokens, mask, jax.random.key(0), SamplingConfig(2))
    state = DecodeState.empty(model.config, 1, 16)
    with pytest.raises(ValueError, match="cache holds 16"):
        generate_from(model, state, *pad_right([[3] * 14]), jax.random.key(0), SamplingConfig(4))
    long_prompt = [[3] * model.config.max_seq_len]
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, *pad_right(long_prompt), jax.random.key(0), SamplingConfig(4))
    with pytest.raises(ValueError, match="right-padded"):
        extend(model, DecodeState.empty(model.config, 1, 16), np.array([[0, 5]]),
               np.array([[False, True]]))


@pytest.mark.real_model
def test_real_model_greedy_equals_transformers(smollm2, smollm2_torch):
    import torch

    from tests.test_model import TEXTWORLD_PROMPT

    _, model, tokenizer = smollm2
    texts = [TEXTWORLD_PROMPT, "The capital of France is", "def add(a, b):\n    return"]
    prompts = [tokenizer(t).input_ids for t in texts]
    sampling = SamplingConfig(32, greedy=True, eos_ids=(tokenizer.eos_token_id,))
    out = generate(model, *pad_right(prompts), jax.random.key(0), sampling)
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            ref = smollm2_torch.generate(torch.tensor([prompt]), max_new_tokens=32,
                                         do_sample=False, attention_mask=torch.ones(1, len(prompt),
                                                                                    dtype=torch.long))
        ours = np.asarray(out.tokens[row, :out.lengths[row]])
        np.testing.assert_array_equal(ours, ref[0, len(prompt):].numpy())


def test_pack_candidates_shares_leading_tokens():
    prefix = pad_right([[5, 6], [7]])
    packed = padding.pack_candidates(*prefix, *pad_candidates(
        [[[1, 2], [1, 2, 3], [4], [1, 9]], [[8], [8], []]]))
    # Row 0: prefix 5 6, then the tree 1 -> (2 -> 3, 9), 4 in depth-first order.
    assert packed.tokens.shape == (2, 16)
    np.testing.assert_array_equal(packed.tokens[0, :7], [5, 6, 1, 2, 3, 9, 4])
    np.testing.assert_array_equal(packed.position[0, :7], [0, 1, 2, 3, 4, 3, 2])
    np.testing.assert_array_equal(packed.parent[0, 2:7], [1, 2, 3, 2, 1])
    np.testing.assert_array_equal(packed.end[0, :8], [16, 16, 6, 5, 5, 6, 7, 7])
    np.testing.assert_array_equal(packed.leaf, [[3, 4, 6, 5], [1, 1, -1, -1]])
    np.testing.assert_array_equal(packed.tokens[1, :2], [7, 8])
    assert not packed.tokens[1, 2:].any()


def test_score_continuations_equals_separate_forwards(model):
    from jaxrl_llm.generation import compile_count, score_continuations

    vocab = model.config.vocab_size
    history = random_prompts([9, 4], vocab, seed=20)
    tail = random_prompts([3, 5], vocab, seed=21)
    candidates = [random_prompts([2, 4, 1], vocab, seed=22),
                  random_prompts([3, 1, 2, 4], vocab, 23)]
    # Shared leading tokens share prefix-tree nodes: a candidate that is another's prefix ends
    # inside its path, a duplicate ends on the same node, and branches must not see each other.
    candidates[0][1][:2] = candidates[0][0]
    candidates[0][2] = candidates[0][0][:1] + random_prompts([2], vocab, seed=24)[0]
    candidates[1][1] = list(candidates[1][0])
    candidates[1][3][:2] = candidates[1][0][:2]
    cand = np.zeros((2, 4, 5), np.int32)  # row 0's 4th candidate is empty, L has spare padding
    cand_mask = np.zeros((2, 4, 5), bool)
    for b in range(2):
        for c, ids in enumerate(candidates[b]):
            cand[b, c, :len(ids)], cand_mask[b, c, :len(ids)] = ids, True
    state = extend(model, DecodeState.empty(model.config, 2, 64), *pad_right(history))
    (scores, _), state = score_continuations(model, state, *pad_right(tail), cand, cand_mask)
    assert scores.shape == (2, 4) and float(scores[0, 3]) == 0.0
    for b in range(2):
        context = history[b] + tail[b]
        for c, ids in enumerate(candidates[b]):
            seq = context + ids
            logits = full_logits(model, [seq])[:, len(context) - 1:-1]
            ref = float(jnp.sum(token_logprobs(jnp.asarray(logits), jnp.asarray([ids]))))
            np.testing.assert_allclose(float(scores[b, c]), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(state.lengths), [9, 4])  # history unchanged
    # Other candidate counts and widths that pack into the same bucket reuse the program.
    programs = compile_count()
    (again, _), state = score_continuations(model, state, *pad_right(tail), cand[:, :3, :4],
                                            cand_mask[:, :3, :4])
    np.testing.assert_allclose(np.asarray(again), np.asarray(scores)[:, :3], rtol=1e-5, atol=1e-6)
    assert compile_count() == programs
    # Nor is the number of candidates a static shape: 3 candidates of 7 tokens and 20 of one
    # token pack into the same 32-token bucket and share one program.
    programs = compile_count()
    for count, length in [(3, 7), (20, 1)]:
        many = np.arange(3, 3 + count * length, dtype=np.int32).reshape(1, count, length)
        many = np.repeat(many, 2, axis=0)
        _, state = score_continuations(model, state, *pad_right(tail), many, many.astype(bool))
    assert compile_count() == programs + 1
    # Empty candidates anywhere, more of them than packed slots: the others keep their scores.
    sparse, sparse_mask = np.zeros((2, 20, 5), np.int32), np.zeros((2, 20, 5), bool)
    sparse[:, [3, 19]], sparse_mask[:, [3, 19]] = cand[:, :2], cand_mask[:, :2]
    (spread, _), state = score_continuations(model, state, *pad_right(tail), sparse, sparse_mask)
    assert spread.shape == (2, 20) and not np.asarray(spread)[:, [0, 1, 2, 4, 18]].any()
    np.testing.assert_allclose(np.asarray(spread)[:, [3, 19]], np.asarray(scores)[:, :2],
                               rtol=1e-5, atol=1e-6)
    gap = cand_mask.copy()
    gap[0, 0, :2] = [False, True]
    with pytest.raises(ValueError, match="candidates must be right-padded"):
        score_continuations(model, state, *pad_right(tail), cand, gap)
