"""Step-level PPO for LLM agents (Schulman et al. 2017; notebook 000's recipe, corrected).

One PPO iteration, in paper order:
  1. collect episodes with the sampling policy (`agent.play`): per step the new history ids,
     the tail, the candidates chosen among, the choice, log pi(choice | s) of the distribution
     it was drawn from, V(s), and for a truncated episode V(s') of the state it was cut at;
  2. pack each game into one sequence (`jaxrl_llm.packing`; a sliding-window history gives one
     sequence per step) and score it once with the frozen warm start (the KL reference);
  3. rewards minus the KL penalty (k1 of the taken action, "in reward" as the notebook) -> GAE
     with gamma, lambda at step level (terminated: no future; truncated: bootstrap), or RLOO
     over several plays of the same game (`PPOConfig.advantage`);
  4. several epochs of shuffled minibatch updates of LoRA + value head, each packed game in one
     forward, from the **stored** log-probs (never re-sampled: the ratio is exactly 1 before
     the first update).

Two policies over the same packed rows (`PPOConfig.policy`):
  * "action": pi(a_k | s) = softmax over the state's valid actions of their summed log-probs
    (`scoring.action_logprobs`); entropy and the exact KL are over those candidates.
  * "sequence": the free-text policy of generate mode, log pi(a | s) = the summed token log-prob
    of the sampled action (its one candidate); entropy is the mean token entropy, KL is k3.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_llm import losses
from jaxrl_llm.packing import PackedEpisode, collate, pack_episode, packed_forward, widths
from jaxrl_llm.scoring import action_logprobs, categorical_entropy, categorical_kl
from jaxrl_llm.train.hparams import PPOHyperparams, minibatch_rows

POLICIES = ("action", "sequence")
ADVANTAGES = ("gae", "rloo")


@dataclasses.dataclass(frozen=True)
class PPOConfig(PPOHyperparams):
    """Step-level PPO: the shared `PPOHyperparams` (defaults notebook 000's where it sets them)
    and what this trainer adds.

    Attributes:
      learning_rate: Adam step size (1.41e-5, from Hugging Face's PPO trainer).
      kl_coef: KL-to-reference weight (0.2).
      kl_in: "reward" (k1 penalty subtracted from each step's reward) or "loss" (the exact KL
        over the candidates, or k3 for the sequence policy, added to the loss).
      epochs: passes over the collected games per iteration (2).
      minibatch_size: packed sequences (games) per optimizer step; micro_batch_size: per
        forward/backward.
      policy: "action" (softmax over valid actions) or "sequence" (free text), see module doc.
      temperature, length_norm: the action policy's softmax temperature and per-token scores
        (must equal the collecting agent's: `agent.AgentConfig`).
      advantage: "gae" (step-level GAE from the value head) or "rloo": every step of a play
        gets the play's total reward minus the mean total of the other plays of the same game
        (`group_advantages`; no critic needed, the value head still trains); whitening only
        scales them, so a play tied with its group keeps 0.
      group_size: plays of each game per iteration, consecutive in the batch (rloo: >= 2).
      top_k: score only each step's k likeliest candidates under the sampling policy (and the
        chosen one) in the reference and the update, pi renormalised over them
        (`top_candidates`); 0 keeps every candidate. A state offers ~35 valid actions, most
        of them with almost no mass, and their tokens are about half of a packed game.
    """

    learning_rate: float = 1.41e-5
    kl_in: str = "reward"
    epochs: int = 2
    policy: str = "action"
    temperature: float = 1.0
    length_norm: bool = False
    advantage: str = "gae"
    group_size: int = 1
    top_k: int = 0

    def __post_init__(self):
        super().__post_init__()
        if self.kl_in not in losses.KL_MODES:
            raise ValueError(f"PPOConfig.kl_in must be one of {losses.KL_MODES}, got "
                             f"{self.kl_in!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"PPOConfig.policy must be one of {POLICIES}, got {self.policy!r}")
        if self.advantage not in ADVANTAGES:
            raise ValueError(f"PPOConfig.advantage must be one of {ADVANTAGES}, got "
                             f"{self.advantage!r}")
        if self.group_size < (2 if self.advantage == "rloo" else 1):
            raise ValueError(f"PPOConfig.group_size must be >= 2 with advantage 'rloo' (>= 1 "
                             f"otherwise), got {self.group_size}")
        if self.top_k < 0:
            raise ValueError(f"PPOConfig.top_k must be >= 0 (0: every candidate), got "
                             f"{self.top_k}")
        if not self.learning_rate > 0 or not self.temperature > 0:
            raise ValueError(f"PPOConfig.learning_rate and temperature must be > 0, got "
                             f"{self.learning_rate} and {self.temperature}")


def step_logprobs(out, batch, config: PPOConfig):
    """Per-step policy quantities of packed rows: `(log pi(choice) [B, S], entropy [B, S],
    log pi over candidates [B, S, C] (action policy; None for the sequence policy))`."""
    choice = batch["choice"][..., None]
    if config.policy == "sequence":
        length = jnp.maximum(batch["leaf_lengths"][..., 0], 1).astype(jnp.float32)
        return out.scores[..., 0], out.entropy_sums[..., 0] / length, None
    mask = batch["leaf_lengths"] > 0
    logpi = action_logprobs(out.scores, mask, config.temperature,
                            batch["leaf_lengths"] if config.length_norm else None)
    # Padded steps have no candidate (all -inf): zeroed so that no NaN reaches a gradient.
    logpi = jnp.where(mask, logpi, 0.0)
    return (jnp.take_along_axis(logpi, choice, axis=-1)[..., 0],
            categorical_entropy(logpi, mask), logpi)


def ppo_loss(actor_critic, batch, config: PPOConfig, remat: bool = False):
    """Clipped policy + clipped value (+ KL-in-loss, - entropy) loss summed over steps.

    Returns `(loss_sum, step_count, metrics)` for `train.step.Trainer`: sums over the steps,
    clip_fraction and approx_kl as `(sum, count)` pairs; padded steps (weight 0) count for
    nothing.
    """
    out = packed_forward(actor_critic.lm, batch, remat=remat)
    logprob, entropy, logpi = step_logprobs(out, batch, config)
    value = actor_critic.value_head(out.decision_hidden)
    weight = batch["weight"]
    policy = losses.ppo_policy_loss(logprob, batch["old_logprob"], batch["advantage"], weight,
                                    clip_eps=config.clip_eps, return_sum_count=True)
    policy_loss, count = policy.loss  # count: the real steps of the micro-batch
    value_loss, _ = losses.ppo_value_loss(value, batch["old_value"], batch["return"], weight,
                                          clip=config.value_clip or None, return_sum_count=True)
    if logpi is None:
        kl = losses.kl_k3(logprob, batch["ref_logprob"])
    else:
        kl = categorical_kl(logpi, batch["ref_logpi"], batch["leaf_lengths"] > 0)
    total = lambda x: jnp.sum(x * weight)
    loss = policy_loss + config.vf_coef * value_loss - config.entropy_coef * total(entropy)
    if config.kl_in == "loss":
        loss = loss + config.kl_coef * total(kl)
    metrics = dict(loss=loss, policy_loss=policy_loss, value_loss=value_loss,
                   entropy=total(entropy), kl_ref=total(kl),
                   clip_fraction=policy.clip_fraction, approx_kl=policy.approx_kl_k3)
    return loss, count, metrics


@dataclasses.dataclass
class PackedRollout:
    """The update's data: packed sequences and per sequence its steps' arrays `[S]` (`[S, C]`
    for ref_logpi): choice, old_logprob, ref_logprob, ref_logpi, old_value, advantage, return.
    Batches of it are padded to its widest T, N, S and C (`packing.widths`): the update and
    the reference scoring compile one program each per iteration shape."""

    episodes: list[PackedEpisode]
    steps: list[dict[str, np.ndarray]]

    @property
    def widths(self) -> tuple[int, int, int, int]:
        return widths(self.episodes)


def pack_rollout(transitions, shared_history: bool, max_len: int
                 ) -> tuple[list[PackedEpisode], list[list[int]]]:
    """Transitions (`agent.play`, any game order, step order within a game) -> packed sequences
    and, per sequence, the indices of its transitions in step order.

    `shared_history` (play kept the whole history): one sequence per game, its trunk the
    concatenated `context_ids`; otherwise (a sliding window) one sequence per step. A game
    whose sequence would pass `max_len` tokens is cut into several, each later one starting
    with the whole history before its first step (so every step still sees all of it).
    """
    groups: dict = {}
    for n, t in enumerate(transitions):
        groups.setdefault(t.game if shared_history else n, []).append(n)
    episodes, members = [], []
    for group in groups.values():
        group = sorted(group, key=lambda n: transitions[n].step)
        history: list[int] = []
        start = 0
        for i in range(1, len(group)):
            if _packed_len(transitions, group[start:i + 1], history) > max_len:
                episodes.append(_pack(transitions, group[start:i], history))
                members.append(group[start:i])
                history = history + [x for m in group[start:i] for x in transitions[m].context_ids]
                start = i
        episodes.append(_pack(transitions, group[start:], history))
        members.append(group[start:])
    if too_long := [e.num_tokens for e in episodes if e.num_tokens > max_len]:
        raise ValueError(f"a step with its whole history needs {max(too_long)} tokens, more than "
                         f"the model's {max_len}: play shorter games (step limit) or keep a "
                         "sliding history (max_history)")
    return episodes, members


def _packed_len(transitions, group, history) -> int:
    return len(history) + sum(len(transitions[n].context_ids) + len(transitions[n].tail_ids)
                              + sum(map(len, transitions[n].candidate_ids)) for n in group)


def _pack(transitions, group, history) -> PackedEpisode:
    trunk = [transitions[n].context_ids for n in group]
    trunk[0] = history + trunk[0]
    return pack_episode(trunk, [transitions[n].tail_ids for n in group],
                        [transitions[n].candidate_ids for n in group])


def prepare_rollout(transitions, shared_history: bool, reference_forward, config: PPOConfig,
                    max_len: int, pad_id: int = 0) -> tuple[PackedRollout, dict[str, float]]:
    """The update's data for one iteration, from the stored transitions.

    Args:
      transitions: collected with `agent.play(..., value_head=...)`; their log-probs, values
        and bootstrap values are of the sampling policy and used as-is (the log-probs
        renormalised over the kept candidates with `config.top_k`).
      shared_history, max_len: see `pack_rollout` (max_len: the model's context).
      reference_forward: collated batch -> `packing.PackedOutput` of the frozen warm start.
      config: PPO hyperparameters; pad_id: padding token of the packed rows.
    Returns:
      `(rollout, stats)`.
    """
    kept_mass = np.ones(len(transitions))
    if config.top_k:
        transitions, kept_mass = top_candidates(transitions, config.top_k)
    episodes, members = pack_rollout(transitions, shared_history, max_len)
    ref_logprob = np.zeros(len(transitions), np.float32)
    ref_logpi = []
    at_least = widths(episodes)  # the update's batch shape: one program
    for episode, group in zip(episodes, members):
        batch = collate([episode], pad_id, at_least)
        batch["choice"] = np.zeros(batch["step_mask"].shape, np.int32)
        batch["choice"][0, :len(group)] = [transitions[n].choice for n in group]
        logprob, _, logpi = step_logprobs(reference_forward(batch), batch, config)
        ref_logprob[group] = np.asarray(logprob[0, :len(group)])
        ref_logpi.append(None if logpi is None else np.asarray(logpi[0, :len(group)]))
    old_logprob = np.array([t.logprob for t in transitions], np.float32)
    env_reward = np.array([t.reward for t in transitions], np.float32)
    kl = np.asarray(losses.kl_k1(old_logprob, ref_logprob))
    reward = (np.asarray(losses.kl_penalized_rewards(env_reward, old_logprob, ref_logprob,
                                                     config.kl_coef))
              if config.kl_in == "reward" else env_reward)
    old_value = np.array([t.value for t in transitions], np.float32)
    advantage, returns = step_advantages(transitions, reward, config.gamma, config.lam)
    if config.advantage == "rloo":
        advantage = group_advantages(transitions, reward, config.group_size)
        if config.whiten_advantages:
            # Scaled only: centred per game already, while shifted by the steps' mean a tied
            # group (no signal) would push on every action it took.
            advantage = advantage / np.sqrt(advantage.var() + 1e-8)
    elif config.whiten_advantages:
        advantage = np.asarray(losses.masked_whiten(advantage[None],
                                                    np.ones((1, len(advantage)))))[0]
    steps = []
    for group, logpi in zip(members, ref_logpi):
        steps.append(dict(
            choice=np.array([transitions[n].choice for n in group], np.int32),
            old_logprob=old_logprob[group], ref_logprob=ref_logprob[group],
            old_value=old_value[group], advantage=advantage[group].astype(np.float32),
            **{"return": returns[group].astype(np.float32)},
            **({} if logpi is None else {"ref_logpi": logpi})))
    explained = losses.explained_variance(old_value, returns, np.ones_like(returns))
    stats = dict(env_reward=float(env_reward.sum()), kl_ref_k1=float(kl.mean()),
                 explained_variance=float(explained), transitions=len(transitions),
                 valid_action_rate=float(np.mean([t.valid for t in transitions])),
                 candidates=float(np.mean([len(t.candidate_ids) for t in transitions])),
                 kept_mass=float(kept_mass.mean()))
    return PackedRollout(episodes, steps), stats


def top_candidates(transitions, k: int):
    """Each step restricted to its k likeliest candidates under the sampling policy, plus the
    chosen one, in their original order: `(transitions, kept mass [N])`.

    The policy the update then trains is pi renormalised over the kept candidates: the stored
    log pi(choice) becomes `log pi(choice) - log(kept mass)`, which is exactly what a forward
    over the kept leaves computes with the sampling parameters (the ratio stays 1 before the
    first update). The kept mass (`exp` of the kept candidates' logsumexp) says how much of
    pi the update no longer sees.
    """
    restricted, kept_mass = [], np.ones(len(transitions))
    for n, t in enumerate(transitions):
        logpi = np.asarray(t.candidate_logprobs, np.float64)
        if len(logpi) != len(t.candidate_ids):
            raise ValueError(f"transition {n} has {len(logpi)} candidate log-probs for "
                             f"{len(t.candidate_ids)} candidates: collect with `agent.play`")
        if len(logpi) <= k:
            restricted.append(t)
            continue
        keep = np.zeros(len(logpi), bool)
        keep[np.argsort(-logpi, kind="stable")[:k]] = True
        keep[t.choice] = True
        index = np.flatnonzero(keep)
        log_mass = float(np.logaddexp.reduce(logpi[index]))
        kept_mass[n] = np.exp(log_mass)
        restricted.append(dataclasses.replace(
            t, choice=int(np.searchsorted(index, t.choice)), logprob=t.logprob - log_mass,
            candidate_ids=[t.candidate_ids[i] for i in index],
            candidate_logprobs=(logpi[index] - log_mass).tolist()))
    return restricted, kept_mass


def step_advantages(transitions, rewards: np.ndarray, gamma: float, lam: float):
    """GAE per episode at step level; returns `(advantages [N], returns [N])` in input order.

    Values are the transitions' `value`; a truncated episode bootstraps from its last
    transition's `next_value` (V of the state it was cut at), a terminated one has no future.
    """
    num_games, rows = _game_rows(transitions)
    shape = (num_games, max(t.step for t in transitions) + 1)
    r, v, next_v, terminated, mask = (np.zeros(shape, np.float32) for _ in range(5))
    for n, (i, t) in enumerate(zip(rows, transitions)):
        r[i, t.step], v[i, t.step], mask[i, t.step] = rewards[n], t.value, 1.0
        terminated[i, t.step] = float(t.terminated)
        next_v[i, t.step] = t.next_value
    # Within an episode the next value is the next step's value; the last step keeps its own
    # next_value (the bootstrap of a truncated episode, 0 for a terminated one).
    inside = mask[:, 1:] > 0
    next_v[:, :-1] = np.where(inside, v[:, 1:], next_v[:, :-1])
    advantages, returns = losses.gae(
        jnp.asarray(r), jnp.asarray(v), jnp.asarray(next_v), jnp.asarray(terminated),
        jnp.asarray(mask), gamma=gamma, lam=lam)
    advantages, returns = np.asarray(advantages), np.asarray(returns)
    cols = [t.step for t in transitions]
    return advantages[rows, cols], returns[rows, cols]


def group_advantages(transitions, rewards: np.ndarray, group_size: int) -> np.ndarray:
    """RLOO over plays of the same game (`losses.rloo_advantages`): games `0..G*k-1` are G groups
    of k = `group_size` consecutive plays; every step of a play gets the play's summed reward
    minus the mean sum of the group's other plays. Returns `[N]` in input order."""
    num_games, rows = _game_rows(transitions)
    if num_games % group_size:
        raise ValueError(f"{num_games} games do not form groups of {group_size} plays")
    totals = np.zeros(num_games, np.float32)
    np.add.at(totals, rows, rewards)
    return np.asarray(losses.rloo_advantages(totals.reshape(-1, group_size))).reshape(-1)[rows]


def _game_rows(transitions) -> tuple[int, list[int]]:
    """The number of games in `transitions` and each transition's game row (games in order)."""
    index = {g: i for i, g in enumerate(sorted({t.game for t in transitions}))}
    return len(index), [index[t.game] for t in transitions]


def collate_steps(rollout: PackedRollout, rows: Sequence[int], pad_id: int = 0
                  ) -> dict[str, np.ndarray]:
    """Packed sequences `rows` of a rollout as one training batch: `packing.collate` plus the
    step arrays padded to its `[B, S]` (`[B, S, C]`) and a `weight` that is 0 on padded steps."""
    batch = collate([rollout.episodes[r] for r in rows], pad_id, rollout.widths)
    b, s, c = batch["leaf_lengths"].shape
    for key in rollout.steps[rows[0]]:
        shape = (b, s, c) if key == "ref_logpi" else (b, s)
        batch[key] = np.zeros(shape, rollout.steps[rows[0]][key].dtype)
        for i, r in enumerate(rows):
            value = rollout.steps[r][key]
            batch[key][(i, slice(0, len(value))) + ((slice(0, value.shape[1]),)
                                                    if value.ndim == 2 else ())] = value
    batch["weight"] = batch["step_mask"].astype(np.float32)
    return batch


def minibatches(rollout: PackedRollout, config: PPOConfig, key: jax.Array, pad_id: int = 0):
    """Shuffled minibatches of `minibatch_size` packed sequences (`hparams.minibatch_rows`),
    each a list of collated micro-batches. A last short minibatch has fewer micro-batches; the
    loss is a step mean either way."""
    for rows in minibatch_rows(len(rollout.episodes), config.minibatch_size, key):
        yield [collate_steps(rollout, rows[i:i + config.micro_batch_size], pad_id)
               for i in range(0, len(rows), config.micro_batch_size)]
