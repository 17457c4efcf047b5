"""Batched sampling with a preallocated KV cache: jitted prefill + `lax.while_loop` decode.

Two levels of API:
  * `generate(model, prompt_tokens, prompt_mask, key, sampling)`: one-shot, prompt in, response out.
  * `DecodeState` + `extend` + `generate_from`: multi-turn agents keep each game's history in the
    cache, `extend` it with only the new text, and sample from `history + tail` where the tail
    (e.g. "Valid actions: ... Action: ") is dropped again afterwards, so the cost of a step grows
    with the new text rather than with the whole prompt.

Shapes are bucketed (`padding.bucket_length`) so a run compiles a handful of programs, not one
per prompt length. Chunks fed to the cache are right-padded: row b's real tokens come first.
Long chunks of very different lengths are prefilled in groups of similar length
(`padding.length_groups`): padding every row to the longest would multiply the prefill work.
The sampling rule itself is `jaxrl_llm.sampling`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxrl_llm.logprobs import token_logprobs
from jaxrl_llm.model.config import ModelConfig
from jaxrl_llm.model.llama import KVCache, Transformer, check_tokens
from jaxrl_llm.padding import GROUP_ROWS, bucket_length, length_groups, pack_candidates, pad_right
from jaxrl_llm.sampling import SamplingConfig, sample_logits
from jaxrl_llm.sharding import batch_shardings, place_like


class GenerationOutput(NamedTuple):
    """What `generate` returns.

    tokens: `[B, N]` int32 sampled ids, `pad_id` after a row ended.
    logprobs: `[B, N]` float32 log-prob of each token under the distribution it was drawn from
      (temperature, top-k and top-p applied; for greedy, the model's own distribution), 0 where
      `mask` is False. With temperature 1 and no filtering these equal `token_logprobs` of a full
      forward, which is what the PPO ratio needs.
    mask: `[B, N]` bool, True up to and including the stop/EOS token.
    lengths: `[B]` int32, `mask.sum(1)`.
    prompt_hidden: `[B, D]` final hidden state of the last prompt token (a value head's input:
      the value of the state the response was sampled in, at no extra forward pass).
    """

    tokens: jax.Array
    logprobs: jax.Array
    mask: jax.Array
    lengths: jax.Array
    prompt_hidden: jax.Array


@flax.struct.dataclass
class DecodeState:
    """A batch of token histories in a KV cache: row b holds `lengths[b]` tokens at slots 0..."""

    cache: KVCache
    lengths: jax.Array  # [B] int32

    @classmethod
    def empty(cls, config: ModelConfig, batch_size: int, max_len: int,
              mesh: Mesh | None = None) -> "DecodeState":
        """An empty cache; with `mesh`, rows are split over its data-parallel axes (and the
        chunks later fed to this state follow the same split)."""
        if max_len > config.max_seq_len:
            raise ValueError(f"cache of {max_len} tokens exceeds the model's max_seq_len "
                             f"{config.max_seq_len}")
        make = lambda: cls(cache=KVCache.zeros(config, batch_size, max_len),
                           lengths=jnp.zeros((batch_size,), jnp.int32))
        if mesh is None:
            return make()
        # Created in place on the mesh: the full cache never sits on one device.
        return jax.jit(make, out_shardings=batch_shardings(mesh, jax.eval_shape(make)))()


def _feed(model: Transformer, state: DecodeState, tokens: jax.Array, key_width: int):
    """Write a right-padded chunk `[B, T]` after each row's history; returns hidden, cache.

    Chunk token t of row b sits at slot lengths[b] + t and sees the slots up to its own. Only
    the first `key_width` (static) slots are read: every filled slot must lie below it.
    """
    positions = state.lengths[:, None] + jnp.arange(tokens.shape[1])[None, :]
    attn_mask = jnp.arange(key_width)[None, None, :] <= positions[:, :, None]
    return model.hidden_states(tokens, positions, attn_mask, state.cache)


def _extend(model: Transformer, state: DecodeState, tokens, mask, key_width: int) -> DecodeState:
    _, cache = _feed(model, state, tokens, key_width)
    return DecodeState(cache=cache, lengths=state.lengths + mask.sum(1, dtype=jnp.int32))


@functools.partial(jax.jit, static_argnums=(0, 5), donate_argnums=2)
def _extend_jit(graphdef, params, state: DecodeState, tokens, mask, key_width: int):
    return _extend(nnx.merge(graphdef, params), state, tokens, mask, key_width)


def _take_rows(state: DecodeState, rows, key_width: int) -> DecodeState:
    """Rows `rows [G]` of `state`, their first `key_width` slots only: the copy is small next
    to the forward it serves."""
    return DecodeState(cache=jax.tree.map(lambda c: c[rows, :, :key_width], state.cache),
                       lengths=state.lengths[rows])


def _put_rows(state: DecodeState, rows, group: DecodeState, key_width: int) -> DecodeState:
    """`state` with `group` (from `_take_rows`) written back into its rows."""
    put = lambda c, g: c.at[rows, :, :key_width].set(g)
    return DecodeState(cache=jax.tree.map(put, state.cache, group.cache),
                       lengths=state.lengths.at[rows].set(group.lengths))


@functools.partial(jax.jit, static_argnums=(0, 6), donate_argnums=2)
def _extend_rows_jit(graphdef, params, state: DecodeState, rows, tokens, mask, key_width: int):
    """`_extend_jit` for the rows `rows [G]` only; tokens and mask are `[G, T]`."""
    group = _extend(nnx.merge(graphdef, params), _take_rows(state, rows, key_width), tokens,
                    mask, key_width)
    return _put_rows(state, rows, group, key_width)


@functools.partial(jax.jit, static_argnums=(0, 5, 7, 8), donate_argnums=2)
def _generate_jit(graphdef, params, state: DecodeState, tail, tail_mask,
                  sampling: SamplingConfig, key, prefill_width: int, key_width: int):
    model = nnx.merge(graphdef, params)
    batch = tail.shape[0]
    n_tail = tail_mask.sum(1, dtype=jnp.int32)
    hidden, cache = _feed(model, state, tail, prefill_width)
    last_hidden = jnp.take_along_axis(hidden, (n_tail - 1)[:, None, None], axis=1)[:, 0]
    stop_ids = jnp.asarray(sampling.eos_ids + sampling.stop_ids, jnp.int32)
    num_new = sampling.max_new_tokens

    def emit(i, token, logprob, carry):
        tokens, logprobs, mask, done = carry
        token = jnp.where(done, sampling.pad_id, token)
        tokens = tokens.at[:, i].set(token)
        logprobs = logprobs.at[:, i].set(jnp.where(done, 0.0, logprob))
        mask = mask.at[:, i].set(~done)
        return tokens, logprobs, mask, done | jnp.isin(token, stop_ids)

    key, first_key = jax.random.split(key)
    token, logprob = sample_logits(model.logits(last_hidden), first_key, sampling)
    out = emit(0, token, logprob, (jnp.zeros((batch, num_new), jnp.int32),
                                   jnp.zeros((batch, num_new), jnp.float32),
                                   jnp.zeros((batch, num_new), bool), jnp.zeros((batch,), bool)))

    def cond(carry):
        i, *_, out = carry
        return (i < num_new) & ~jnp.all(out[3])

    def body(carry):
        i, cache, lengths, key, out = carry
        step_state = DecodeState(cache=cache, lengths=lengths)
        previous = jax.lax.dynamic_slice_in_dim(out[0], i - 1, 1, axis=1)  # [B, 1]
        hidden, cache = _feed(model, step_state, previous, key_width)
        key, step_key = jax.random.split(key)
        token, logprob = sample_logits(model.logits(hidden[:, 0]), step_key, sampling)
        return i + 1, cache, lengths + 1, key, emit(i, token, logprob, out)

    _, cache, _, _, (tokens, logprobs, mask, _) = jax.lax.while_loop(
        cond, body, (jnp.int32(1), cache, state.lengths + n_tail, key, out))
    # The tail and the response are dropped: the history is what it was before the call.
    output = GenerationOutput(tokens, logprobs, mask, mask.sum(1, dtype=jnp.int32), last_hidden)
    return output, DecodeState(cache=cache, lengths=state.lengths)


@functools.partial(jax.jit, static_argnums=(0, 10, 11), donate_argnums=2)
def _score_jit(graphdef, params, state: DecodeState, rows, tokens, n_prefix, keep, position,
               parent, end, key_width: int, every_row: bool):
    """Rows `rows [G]` of `state`: each feeds its packed row (`padding.pack_candidates`: prefix,
    then the candidates' prefix tree) in one forward; the first `keep [G]` prefix tokens join
    its history. Returns each tree node's summed log-prob along its path `[G, W]`.

    `every_row` (rows = 0..B-1): the forward writes the state's own cache in place instead of
    a copy of the rows' first `key_width` slots written back after (a few % of a step).
    """
    model = nnx.merge(graphdef, params)
    group = state if every_row else _take_rows(state, rows, key_width)
    lengths = group.lengths
    index = jnp.arange(tokens.shape[1])[None]  # [1, W]
    # Flat token i goes to slot lengths + i, at RoPE position lengths + position[i] (a tree
    # node's depth after the prefix: each candidate is scored as if it were the only
    # continuation). Token i sees the history and every new token j <= i whose subtree holds
    # it (i < end[j]): the prefix up to itself, and its own ancestors in the tree.
    positions = lengths[:, None] + position
    relative = jnp.arange(key_width)[None, :] - lengths[:, None]  # [G, S]
    key_end = jnp.take_along_axis(end, jnp.clip(relative, 0, tokens.shape[1] - 1), axis=1)
    attn_mask = (relative[:, None] < 0) | ((relative[:, None] <= index[..., None])
                                           & (index[..., None] < key_end[:, None]))
    hidden, cache = model.hidden_states(tokens, positions, attn_mask, group.cache)
    decision = jnp.take_along_axis(hidden, (n_prefix - 1)[:, None, None], axis=1)  # [G, 1, D]
    predicting = jnp.take_along_axis(hidden, parent[..., None], axis=1)
    logprobs = token_logprobs(model.logits(predicting), tokens)
    # A node's path sum adds the log-probs of its tree ancestors (prefix tokens left out).
    ancestor = ((index[..., None] >= index[:, None, :]) & (index[..., None] < end[:, None])
                & (index >= n_prefix[:, None])[:, None])  # [G, W, W]: i is in j's subtree
    paths = jnp.einsum("gij,gj->gi", ancestor.astype(logprobs.dtype), logprobs)
    group = DecodeState(cache=cache, lengths=lengths + keep)
    state = group if every_row else _put_rows(state, rows, group, key_width)
    return (paths, decision[:, 0]), state


def _check_fits(slots: int, max_len: int) -> None:
    # XLA clamps an out-of-range cache write onto the last slots: it must never be reached.
    if slots > max_len:
        raise ValueError(f"prompt needs {slots} cache slots but the cache holds {max_len}: use "
                         "a larger max_len (or shorter history)")


def _check_chunk(model: Transformer, state: DecodeState, tokens, mask, extra: int = 0):
    """Validate a right-padded chunk; returns it as arrays with its real lengths and the static
    key widths to attend over while prefilling it and while decoding `extra` tokens after it."""
    tokens, mask = np.asarray(tokens), np.asarray(mask, bool)
    if tokens.ndim != 2 or tokens.shape != mask.shape:
        raise ValueError(f"tokens and mask must both be [B, T], got {tokens.shape} and "
                         f"{mask.shape}")
    if tokens.shape[0] != state.lengths.shape[0]:
        raise ValueError(f"batch of {tokens.shape[0]} rows for a decode state of "
                         f"{state.lengths.shape[0]} rows")
    n_real = mask.sum(1)
    if np.any(mask != (np.arange(mask.shape[1])[None] < n_real[:, None])):
        raise ValueError("chunks must be right-padded (each row's real tokens first); "
                         "use jaxrl_llm.padding.pad_right")
    check_tokens(np.where(mask, tokens, 0), model.config.vocab_size)
    used = int(np.max(np.asarray(state.lengths))) + tokens.shape[1]
    max_len = state.cache.max_len
    _check_fits(used + extra, max_len)
    # Attend to a bucketed filled prefix, not the whole cache: a long-lived multi-turn cache is
    # mostly empty, and reading it would cost as much as the new tokens themselves.
    widths = (min(bucket_length(used), max_len), min(bucket_length(used + extra), max_len))
    return *place_like(state.lengths, tokens, mask), n_real, widths


def extend(model: Transformer, state: DecodeState, tokens, mask,
           group_rows: int = GROUP_ROWS) -> DecodeState:
    """Append a right-padded chunk `tokens [B, T]` (`mask [B, T]`) to each row's history.

    Rows of very different chunk lengths are prefilled in groups (`length_groups`, at most
    `group_rows` rows each), every group padded only to its own longest row. On a multi-device
    state the batch stays whole (groups would not divide the data-parallel axes).
    The input `state` is donated (its buffers are reused): use only the returned state.
    """
    host_tokens, host_mask = np.asarray(tokens), np.asarray(mask, bool)
    tokens, mask, n_real, (key_width, _) = _check_chunk(model, state, tokens, mask)
    graphdef, params = nnx.split(model)
    groups = ([np.arange(len(n_real))] if len(state.lengths.sharding.device_set) > 1
              else length_groups(n_real, group_rows))
    if len(groups) == 1:
        return _extend_jit(graphdef, params, state, tokens, mask, key_width)
    history = np.asarray(state.lengths)
    for rows in groups:
        width = min(bucket_length(max(int(n_real[rows].max()), 1)), host_tokens.shape[1])
        group_width = min(bucket_length(int(history[rows].max()) + width), state.cache.max_len)
        state = _extend_rows_jit(graphdef, params, state, jnp.asarray(rows, jnp.int32),
                                 host_tokens[rows, :width], host_mask[rows, :width], group_width)
    return state


def generate_from(model: Transformer, state: DecodeState, tail_tokens, tail_mask,
                  key: jax.Array, sampling: SamplingConfig
                  ) -> tuple[GenerationOutput, DecodeState]:
    """Sample a response to `history + tail` for every row; the history is left unchanged.

    Args:
      model: the decoder (LoRA / int8 variants included).
      state: histories in the cache (donated: use the returned state).
      tail_tokens: `[B, T]` right-padded per-step tail; every row needs >= 1 real token.
      tail_mask: `[B, T]` bool.
      key: PRNG key; the same key gives the same tokens.
      sampling: the sampling rule (static: one compiled program per distinct config).
    Returns:
      `(GenerationOutput, state)` where `state` holds the same histories as the input.
    """
    tail_tokens, tail_mask, n_real, (prefill_width, key_width) = _check_chunk(
        model, state, tail_tokens, tail_mask, extra=sampling.max_new_tokens)
    if np.any(n_real == 0):
        raise ValueError(f"rows {np.flatnonzero(n_real == 0).tolist()} have an empty prompt/tail: "
                         "every row needs at least one token to condition on")
    graphdef, params = nnx.split(model)
    return _generate_jit(graphdef, params, state, tail_tokens, tail_mask, sampling, key,
                         prefill_width, key_width)


def score_continuations(model: Transformer, state: DecodeState, tail_tokens, tail_mask,
                        candidates, candidate_mask, keep=None, rows=None
                        ) -> tuple[tuple[jax.Array, jax.Array], DecodeState]:
    """Summed log-prob of each candidate continuation of `history + tail`, one forward pass.

    This is how an agent picks among valid actions: every candidate is scored against the
    cached history without copying the cache per candidate, and tail and candidates are packed
    in one row, the candidates as a prefix tree (`padding.pack_candidates`), so neither padding
    nor the leading tokens candidates share cost compute. A step's new
    history text can lead the tail (`keep`): it is prefilled in the same call.

    Args:
      model: the decoder.
      state: histories in the cache (donated: use the returned state).
      tail_tokens: `[G, T]` right-padded tail (>= 1 real token per row); tail_mask `[G, T]`.
      candidates: `[G, C, L]` right-padded candidate token ids (e.g. " take knife" + EOS).
      candidate_mask: `[G, C, L]` bool; an all-False candidate scores 0 (mask it out after).
      keep: `[G]` leading tail tokens of each row that stay in its history (default none: the
        history is left unchanged).
      rows: `[G]` the state rows these are (default all, G = B); the other rows are untouched,
        and cost nothing.
    Returns:
      `((scores [G, C] float32, prompt_hidden [G, D]), state)`: prompt_hidden is the final
      hidden state of the last tail token (a value head's input).
    """
    candidates, candidate_mask = np.asarray(candidates), np.asarray(candidate_mask, bool)
    tail_tokens, tail_mask = np.asarray(tail_tokens), np.asarray(tail_mask, bool)
    if candidates.ndim != 3 or candidates.shape != candidate_mask.shape:
        raise ValueError(f"candidates and candidate_mask must both be [G, C, L], got "
                         f"{candidates.shape} and {candidate_mask.shape}")
    if tail_tokens.ndim != 2 or tail_tokens.shape != tail_mask.shape:
        raise ValueError(f"tail_tokens and tail_mask must both be [G, T], got "
                         f"{tail_tokens.shape} and {tail_mask.shape}")
    batch = state.lengths.shape[0]
    rows = np.arange(batch) if rows is None else np.asarray(rows, np.int32)
    if not len(tail_tokens) == len(candidates) == len(rows):
        raise ValueError(f"{len(tail_tokens)} tails and {len(candidates)} candidate sets for "
                         f"{len(rows)} rows of a state of {batch}")
    if len(rows) and (rows.min() < 0 or rows.max() >= batch or len(set(rows)) < len(rows)):
        raise ValueError(f"rows must be distinct rows of the state's {batch}, got "
                         f"{rows.tolist()}")
    check_tokens(np.where(candidate_mask, candidates, 0), model.config.vocab_size)
    check_tokens(np.where(tail_mask, tail_tokens, 0), model.config.vocab_size)
    packed = pack_candidates(tail_tokens, tail_mask, candidates, candidate_mask)
    tokens, n_prefix = packed.tokens, packed.n_prefix
    keep = np.zeros(len(rows), np.int32) if keep is None else np.asarray(keep, np.int32)
    if keep.shape != (len(rows),) or np.any(keep < 0) or np.any(keep > n_prefix):
        raise ValueError(f"keep must be [G] counts within each row's tail, got {keep.tolist()} "
                         f"for tails of {n_prefix.tolist()} tokens")
    lengths = np.asarray(state.lengths)
    used = int(lengths[rows].max()) + tokens.shape[1]
    _check_fits(used, state.cache.max_len)
    # A power-of-two number of rows (at most B), the last real one repeated: finished games
    # cost no compute, and a run compiles few programs. Copies of a row are computed alike, so
    # writing them back agrees. A group of every row is computed in the state's own cache:
    # a row not scored repeats a scored row's input, keeps none of it and writes only past its
    # own history (so only where that fits in the cache), and its output is dropped.
    group = min(1 << (len(rows) - 1).bit_length(), batch)
    every_row = group == batch and int(lengths.max()) + tokens.shape[1] <= state.cache.max_len
    if every_row:
        source = np.full(batch, len(rows) - 1)
        source[rows] = np.arange(len(rows))
        kept = np.zeros(batch, np.int32)
        kept[rows] = keep
        arrays = [np.arange(batch, dtype=np.int32), tokens[source], n_prefix[source], kept,
                  packed.position[source], packed.parent[source], packed.end[source]]
        picked = rows
    else:
        fill = lambda x: np.concatenate([x, np.repeat(x[-1:], group - len(rows), axis=0)])
        arrays = [fill(x) for x in (rows, tokens, n_prefix, keep, packed.position, packed.parent,
                                    packed.end)]
        picked = np.arange(len(rows))
    graphdef, params = nnx.split(model)
    (paths, hidden), state = _score_jit(graphdef, params, state,
                                        *place_like(state.lengths, *arrays),
                                        min(bucket_length(used), state.cache.max_len), every_row)
    paths, hidden = paths[picked], hidden[picked]
    leaf = jnp.asarray(packed.leaf)
    scores = jnp.where(leaf >= 0, jnp.take_along_axis(paths, jnp.maximum(leaf, 0), axis=1), 0.0)
    return (scores, hidden), state


def generate(model: Transformer, prompt_tokens, prompt_mask, key: jax.Array,
             sampling: SamplingConfig, mesh: Mesh | None = None,
             group_rows: int = GROUP_ROWS) -> GenerationOutput:
    """Sample responses for a batch of prompts.

    Args:
      model: the decoder.
      prompt_tokens: `[B, P]` ids; padding may be on either side (`prompt_mask` says which).
      prompt_mask: `[B, P]` bool, True on real tokens (contiguous within a row).
      key: PRNG key.
      sampling: the sampling rule.
      mesh: split the batch (and KV cache) over this mesh's data-parallel axes; place the
        model's params with `sharding.shard_model` first.
      group_rows: prompts of very different lengths are prefilled in length groups of at most
        this many rows (see `extend`).
    Returns:
      `GenerationOutput` with `[B, N]` tokens, log-probs and response mask, `N = max_new_tokens`.
    """
    prompt_tokens, prompt_mask = np.asarray(prompt_tokens), np.asarray(prompt_mask, bool)
    if prompt_tokens.ndim != 2 or prompt_tokens.shape != prompt_mask.shape:
        raise ValueError(f"prompt_tokens and prompt_mask must both be [B, P], got "
                         f"{prompt_tokens.shape} and {prompt_mask.shape}")
    rows = [t[m].tolist() for t, m in zip(prompt_tokens, prompt_mask)]
    if empty := [i for i, r in enumerate(rows) if not r]:
        raise ValueError(f"rows {empty} have an empty prompt: every row needs at least one token")
    tokens, mask = pad_right(rows)
    max_len = bucket_length(tokens.shape[1] + sampling.max_new_tokens)
    if max_len > model.config.max_seq_len:
        raise ValueError(f"prompt of {tokens.shape[1]} tokens + {sampling.max_new_tokens} new "
                         f"tokens is longer than the model's max_seq_len {model.config.max_seq_len}")
    state = DecodeState.empty(model.config, len(rows), max_len, mesh)
    if mesh is None and len(length_groups(mask.sum(1), group_rows)) > 1:
        # Grouped prefill of all but the last token; sampling conditions on the last one.
        state = extend(model, state, *pad_right([r[:-1] for r in rows]), group_rows)
        tokens, mask = pad_right([r[-1:] for r in rows], width=1)
    output, _ = generate_from(model, state, tokens, mask, key, sampling)
    return output


def compile_count() -> int:
    """Programs compiled so far by `extend`, `generate_from` and `score_continuations`."""
    jitted = (_extend_jit, _extend_rows_jit, _generate_jit, _score_jit)
    return sum(f._cache_size() for f in jitted)
