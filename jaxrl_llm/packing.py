"""A game as one packed sequence: its history once, each step's question and answers as branches.

Per-step prompts repeat the whole history at every step; a packed row holds it once. The row is
a *trunk* -- the instruction and each step's observation block and action suffix, exactly the
ids `agent.play` feeds its cache -- and, after the trunk prefix of step s, a *branch*: the
per-step tail (the question) and one or more *leaves* (the gold action for SFT; every valid
action for the action-level policy). `model.llama.BranchMask` lets a branch see only its own
history prefix and shared tail, and leaves of one branch never see each other; branch
positions continue from the prefix. So every token's RoPE position and visible context equal
those of the per-step prompt it stands for, and one forward of the row gives every step's leaf
log-probs and decision-token hidden state (the last tail token: where play reads V(s) and
predicts the first action token).

Layout of a row (`|` marks where step s's branch starts):
    trunk[0] | tail[0] leaf[0][0] leaf[0][1] ... trunk[1] | tail[1] leaf[1][0] ...
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrl_llm.logprobs import head_logprobs
from jaxrl_llm.model.llama import BranchMask
from jaxrl_llm.padding import bucket_length


@dataclasses.dataclass(frozen=True)
class PackedEpisode:
    """One packed game (host arrays). T tokens, N scored (leaf) tokens, S steps.

    Attributes:
      tokens, positions, branch, leaf: `[T]` int32 ids, RoPE positions, branch id (the step, -1
        on the trunk) and leaf id (-1 on trunk and tails).
      targets: `[N]` index of each leaf token; predictors: `[N]` index of the token whose
        output predicts it (the previous token of its leaf, or the step's decision token).
      target_step, target_leaf: `[N]` the (step, leaf) each scored token belongs to.
      decisions: `[S]` index of each step's last tail token.
      leaf_lengths: `[S, C]` tokens of each leaf (0 past a step's last leaf), C = most leaves.
    """

    tokens: np.ndarray
    positions: np.ndarray
    branch: np.ndarray
    leaf: np.ndarray
    targets: np.ndarray
    predictors: np.ndarray
    target_step: np.ndarray
    target_leaf: np.ndarray
    decisions: np.ndarray
    leaf_lengths: np.ndarray

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def max_position(self) -> int:
        return int(self.positions.max())


def pack_episode(trunk: Sequence[Sequence[int]], tails: Sequence[Sequence[int]],
                 leaves: Sequence[Sequence[Sequence[int]]]) -> PackedEpisode:
    """Pack S steps: `trunk[s]` (ids appended to the history before step s), `tails[s]` (>= 1
    id) and `leaves[s]` (lists of >= 1 id; the last step alone may have none: a state whose
    value is read but where no action is scored, e.g. the state a truncated game was cut at)."""
    if not len(trunk) == len(tails) == len(leaves) or not tails:
        raise ValueError(f"pack_episode needs one trunk chunk, tail and leaf list per step, got "
                         f"{len(trunk)}, {len(tails)} and {len(leaves)} steps")
    tokens, positions, branch, leaf = [], [], [], []
    targets, predictors, target_step, target_leaf, decisions = [], [], [], [], []
    history = 0  # trunk tokens so far: the position where a branch starts
    for step, (chunk, tail, step_leaves) in enumerate(zip(trunk, tails, leaves)):
        if not tail:
            raise ValueError(f"step {step} has an empty tail: a branch needs a token to "
                             "condition its actions on")
        if not step_leaves and step < len(tails) - 1:
            raise ValueError(f"step {step} has no actions: only the last step may be a "
                             "bare state")
        if empty := [c for c, ids in enumerate(step_leaves) if not ids]:
            raise ValueError(f"step {step} has actions {empty} with no tokens: every action "
                             "branch needs at least one token (e.g. its EOS)")
        _append(tokens, positions, branch, leaf, chunk, history, -1, -1)
        history += len(chunk)
        _append(tokens, positions, branch, leaf, tail, history, step, -1)
        decisions.append(len(tokens) - 1)
        for c, ids in enumerate(step_leaves):
            start = len(tokens)
            _append(tokens, positions, branch, leaf, ids, history + len(tail), step, c)
            targets += range(start, start + len(ids))
            predictors += [decisions[-1]] + list(range(start, start + len(ids) - 1))
            target_step += [step] * len(ids)
            target_leaf += [c] * len(ids)
    width = max((len(s) for s in leaves), default=0)
    leaf_lengths = np.zeros((len(tails), max(width, 1)), np.int32)
    for step, step_leaves in enumerate(leaves):
        leaf_lengths[step, :len(step_leaves)] = [len(ids) for ids in step_leaves]
    as_int = lambda x: np.asarray(x, np.int32)
    return PackedEpisode(*map(as_int, (tokens, positions, branch, leaf, targets, predictors,
                                       target_step, target_leaf, decisions)), leaf_lengths)


def _append(tokens, positions, branch, leaf, ids, start, branch_id, leaf_id) -> None:
    tokens += ids
    positions += range(start, start + len(ids))
    branch += [branch_id] * len(ids)
    leaf += [leaf_id] * len(ids)


def check_episodes(episodes: Sequence[PackedEpisode], max_seq_len: int, vocab_size: int) -> None:
    """Raise (before any compile) if an episode does not fit the model or its ids its vocab."""
    for i, e in enumerate(episodes):
        if e.max_position >= max_seq_len:
            raise ValueError(f"packed episode {i} reaches position {e.max_position} but the "
                             f"model's max_seq_len is {max_seq_len}: play shorter games or "
                             "keep a sliding history (max_history)")
        if e.tokens.size and (e.tokens.min() < 0 or e.tokens.max() >= vocab_size):
            raise ValueError(f"packed episode {i} has token ids outside [0, {vocab_size}): it "
                             "was encoded with another tokenizer than the model's")


def collate(episodes: Sequence[PackedEpisode], pad_id: int = 0,
            at_least: tuple[int, int, int, int] = (0, 0, 0, 0)) -> dict[str, np.ndarray]:
    """Packed episodes -> one batch of `[B, ...]` host arrays, widths bucketed.

    `at_least` are lower bounds of the T, N, S and C widths. Batches of one dataset padded to
    its widest N, S and C (`widths`, T left free) differ only in T: a run compiles one program
    per token bucket instead of one per combination of buckets, and that padding costs next to
    nothing. With T too, every batch has one shape (one program for a small dataset, e.g. a PPO
    iteration's games, at the price of padding short rows).

    Keys: tokens, positions, branch, leaf `[B, T]`; targets, predictors, target_slot (flat
    step * C + leaf, -1 on padding) `[B, N]`; decisions, step_mask `[B, S]`; leaf_lengths
    `[B, S, C]`. Padded tokens sit after every real one (nothing real sees them), padded
    targets and steps are masked out.
    """
    # Every width is bucketed, so that a run compiles a few programs, not one per game.
    t, n, s, c = (bucket_length(max(w, least)) for w, least in zip(widths(episodes), at_least))
    b = len(episodes)
    batch = dict(tokens=np.full((b, t), pad_id, np.int32), positions=np.zeros((b, t), np.int32),
                 branch=np.full((b, t), -1, np.int32), leaf=np.full((b, t), -1, np.int32),
                 targets=np.zeros((b, n), np.int32), predictors=np.zeros((b, n), np.int32),
                 target_slot=np.full((b, n), -1, np.int32), decisions=np.zeros((b, s), np.int32),
                 step_mask=np.zeros((b, s), bool), leaf_lengths=np.zeros((b, s, c), np.int32))
    for row, e in enumerate(episodes):
        for key in ("tokens", "positions", "branch", "leaf"):
            batch[key][row, :e.num_tokens] = getattr(e, key)
        k = len(e.targets)
        batch["targets"][row, :k], batch["predictors"][row, :k] = e.targets, e.predictors
        batch["target_slot"][row, :k] = e.target_step * c + e.target_leaf
        steps = len(e.decisions)
        batch["decisions"][row, :steps], batch["step_mask"][row, :steps] = e.decisions, True
        batch["leaf_lengths"][row, :steps, :e.leaf_lengths.shape[1]] = e.leaf_lengths
    return batch


def widths(episodes: Sequence[PackedEpisode]) -> tuple[int, int, int, int]:
    """The most tokens, scored tokens, steps and leaves per step of any of `episodes`
    (T, N, S, C)."""
    return (max(e.num_tokens for e in episodes), max(len(e.targets) for e in episodes),
            max(len(e.decisions) for e in episodes),
            max(e.leaf_lengths.shape[1] for e in episodes))


class PackedOutput(NamedTuple):
    """What `packed_forward` returns (float32).

    token_logprobs: `[B, N]` log-prob of each leaf token given its context (0 on padding).
    scores: `[B, S, C]` summed token log-prob of each leaf (0 where there is no leaf).
    entropy_sums: `[B, S, C]` summed entropy of the next-token distributions predicting the
      tokens of each leaf.
    decision_hidden: `[B, S, D]` final hidden state of each step's decision token.
    """

    token_logprobs: jax.Array
    scores: jax.Array
    entropy_sums: jax.Array
    decision_hidden: jax.Array


def packed_forward(model, batch, *, remat: bool = False) -> PackedOutput:
    """One forward of packed rows (`collate`): every step's leaf scores and decision state.

    The LM head runs only at the N predicting positions, not at all T tokens, in chunks
    (`logprobs.head_logprobs`): every valid action of a game as a leaf is thousands of them.
    """
    hidden, _ = model.hidden_states(batch["tokens"], batch["positions"],
                                    BranchMask(batch["branch"], batch["leaf"]), remat=remat)
    take = lambda index: jnp.take_along_axis(hidden, index[..., None], axis=1)
    valid = (batch["target_slot"] >= 0).astype(jnp.float32)
    targets = jnp.take_along_axis(batch["tokens"], batch["targets"], axis=1)
    logprobs, entropy = head_logprobs(model, take(batch["predictors"]), targets)
    logprobs, entropy = logprobs * valid, entropy * valid
    b, s, c = batch["leaf_lengths"].shape
    # Padding (slot -1) is sent out of range and dropped.
    slot = jnp.where(batch["target_slot"] < 0, s * c, batch["target_slot"])
    per_leaf = lambda x: jnp.zeros((b, s * c), jnp.float32).at[
        jnp.arange(b)[:, None], slot].add(x, mode="drop").reshape(b, s, c)
    return PackedOutput(logprobs, per_leaf(logprobs), per_leaf(entropy),
                        take(batch["decisions"]))


def packed_scorer(model):
    """A jitted `packed_forward` of `model`'s current weights (no gradient): `batch -> output`."""
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, batch: packed_forward(nnx.merge(graphdef, state), batch))
    return lambda batch: forward(state, batch)
