"""Step-level PPO for LLM agents (Schulman et al. 2017; notebook 000's recipe, corrected).

One PPO iteration, in paper order:
  1. collect episodes with the sampling policy (`agent.play`, generate mode): per step the prompt
     and action tokens and the summed log-prob of the action under the policy that sampled it;
  2. score every transition once more in a batched forward: the value of its state (value head
     on the last prompt token) and the reference log-prob (frozen warm-start adapters), plus the
     value of the state a truncated episode was cut at (bootstrap);
  3. rewards minus the KL penalty (k1 per action, "in reward" as the notebook) -> GAE with
     gamma, lambda at step level (terminated: no future; truncated: bootstrap);
  4. several epochs of shuffled minibatch updates of LoRA + value head from the **stored**
     log-probs (never re-sampled: the ratio is exactly 1 before the first update).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrl_llm import losses
from jaxrl_llm.agent import Transition
from jaxrl_llm.checks import (require_at_least_one, require_micro_batches,
                              require_ppo_hyperparameters)
from jaxrl_llm.generation import bucket_length, pad_left, pad_right
from jaxrl_llm.logprobs import score_responses
from jaxrl_llm.train.step import micro_batches


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """PPO hyperparameters; defaults are notebook 000's where it sets them.

    Attributes:
      learning_rate: Adam step size (1.41e-5, from Hugging Face's PPO trainer).
      clip_eps: policy ratio clip (0.2).
      value_clip: clip of the value change around the stored value (0.2; 0 = unclipped).
      vf_coef: value-loss weight (0.1).
      entropy_coef: entropy bonus weight (0).
      gamma, lam: discount and GAE lambda (1.0, 0.95).
      kl_coef: KL-to-reference weight (0.2).
      kl_in: "reward" (penalty subtracted from each step's reward) or "loss" (k3 term added to
        the loss).
      epochs: passes over the collected transitions per iteration.
      minibatch_size: transitions per optimizer step; micro_batch_size: per forward/backward.
      whiten_advantages: normalise advantages over the iteration's transitions.
    """

    learning_rate: float = 1.41e-5
    clip_eps: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.1
    entropy_coef: float = 0.0
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.2
    kl_in: str = "reward"
    epochs: int = 2
    minibatch_size: int = 8
    micro_batch_size: int = 2
    whiten_advantages: bool = True

    def __post_init__(self):
        if self.kl_in not in losses.KL_MODES:
            raise ValueError(f"PPOConfig.kl_in must be one of {losses.KL_MODES}, got "
                             f"{self.kl_in!r}")
        require_ppo_hyperparameters(self)
        require_at_least_one(self, ("epochs", "minibatch_size", "micro_batch_size"))
        require_micro_batches(self, "minibatch_size")


def action_scores(actor_critic, batch, remat: bool = False):
    """`(action logprob [b], mean token entropy [b], value [b])` of a batch of transitions.

    The action log-prob is the sum over its tokens (stop token included), the quantity the
    sampler reported; the value is read on the last prompt token (the state before acting).
    """
    logprobs, entropy, hidden = score_responses(
        actor_critic.lm, batch["prompt"], batch["prompt_mask"], batch["action"],
        batch["action_mask"], remat=remat)
    mask = batch["action_mask"].astype(jnp.float32)
    mean_entropy = jnp.sum(entropy * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0)
    return jnp.sum(logprobs, -1), mean_entropy, actor_critic.value_head(hidden)


@jax.jit
def _scores_jit(graphdef, state, batch):
    return action_scores(nnx.merge(graphdef, state), batch)


def score_all(actor_critic, arrays: dict[str, np.ndarray], chunk: int = 8):
    """`action_scores` over all rows of `arrays`, in input order.

    Rows run in chunks of similar prompt length, each cut to its own length bucket
    (`train.step.micro_batches`): one compile per bucket width, and short prompts skip the
    padding of the longest.
    """
    graphdef, state = nnx.split(actor_critic)
    n = len(arrays["prompt"])
    order = np.argsort(arrays["prompt_mask"].sum(axis=1), kind="stable")
    rows = {k: v[order] for k, v in arrays.items()}
    short = -n % chunk
    if short:  # pad the last chunk to the common row count with all-masked rows
        rows = {k: np.concatenate([v, np.zeros((short,) + v.shape[1:], v.dtype)])
                for k, v in rows.items()}
        rows["prompt_mask"][n:, -1] = True  # a row needs one visible token
    outputs = [jax.tree.map(np.asarray, _scores_jit(graphdef, state,
                                                     jax.tree.map(jnp.asarray, part)))
               for part in micro_batches(rows, chunk)]
    inverse = np.argsort(order)
    return tuple(np.concatenate(parts)[:n][inverse] for parts in zip(*outputs))


def transition_arrays(prompts, actions, pad_id: int, action_len: int) -> dict[str, np.ndarray]:
    """Token lists -> left-padded prompts and right-padded actions (bucketed prompt width)."""
    prompt, prompt_mask = pad_left(prompts, bucket_length(max(map(len, prompts))), pad_id)
    action, action_mask = pad_right(actions, action_len, pad_id)
    return dict(prompt=prompt, prompt_mask=prompt_mask, action=action, action_mask=action_mask)


def step_advantages(transitions: list[Transition], rewards: np.ndarray, values: np.ndarray,
                    bootstrap: dict[int, float], gamma: float, lam: float):
    """GAE per episode at step level; returns `(advantages [N], returns [N])` in input order.

    `bootstrap[game]` is V(s_T) for a truncated episode (the state it was cut at); a terminated
    episode has no future value. Transitions of one game must be in step order.
    """
    games = sorted({t.game for t in transitions})
    length = max(t.step for t in transitions) + 1
    index = {g: i for i, g in enumerate(games)}
    shape = (len(games), length)
    r, v, next_v, terminated, mask = (np.zeros(shape, np.float32) for _ in range(5))
    for n, t in enumerate(transitions):
        i = index[t.game]
        r[i, t.step], v[i, t.step], mask[i, t.step] = rewards[n], values[n], 1.0
        terminated[i, t.step] = float(t.terminated)
    for i, g in enumerate(games):
        steps = int(mask[i].sum())
        next_v[i, :steps - 1] = v[i, 1:steps]
        next_v[i, steps - 1] = bootstrap.get(g, 0.0)
    advantages, returns = losses.gae(
        jnp.asarray(r), jnp.asarray(v), jnp.asarray(next_v), jnp.asarray(terminated),
        jnp.asarray(mask), gamma=gamma, lam=lam)
    advantages, returns = np.asarray(advantages), np.asarray(returns)
    rows = [index[t.game] for t in transitions]
    cols = [t.step for t in transitions]
    return advantages[rows, cols], returns[rows, cols]


def ppo_loss(actor_critic, batch, config: PPOConfig, remat: bool = False):
    """Clipped policy + clipped value (+ KL-in-loss, - entropy) loss summed over transitions.

    Returns `(loss_sum, count, metric_sums)` for `train.step.Trainer`; padding rows (weight 0)
    count for nothing.
    """
    logprob, entropy, value = action_scores(actor_critic, batch, remat=remat)
    weight = batch["weight"]
    policy = losses.ppo_policy_loss(logprob[:, None], batch["old_logprob"][:, None],
                                    batch["advantage"][:, None], weight[:, None],
                                    clip_eps=config.clip_eps, reduction="sum")
    value_loss = losses.ppo_value_loss(value[:, None], batch["old_value"][:, None],
                                       batch["return"][:, None], weight[:, None],
                                       clip=config.value_clip or None, reduction="sum")
    kl = losses.kl_k3(logprob, batch["ref_logprob"])
    loss = policy.loss + config.vf_coef * value_loss - config.entropy_coef * jnp.sum(
        entropy * weight)
    if config.kl_in == "loss":
        loss = loss + config.kl_coef * jnp.sum(kl * weight)
    metrics = dict(loss=loss, policy_loss=policy.loss, value_loss=value_loss,
                   entropy=jnp.sum(entropy * weight), kl_ref_k3=jnp.sum(kl * weight),
                   clip_fraction=policy.clip_fraction * jnp.sum(weight),
                   approx_kl=policy.approx_kl_k3 * jnp.sum(weight),
                   ratio_max=policy.ratio_max * jnp.sum(weight))
    return loss, jnp.sum(weight), metrics


def minibatches(arrays: dict[str, np.ndarray], config: PPOConfig, rng: np.random.Generator):
    """Shuffled minibatches, each a list of micro-batches (`train.step.micro_batches`); the last
    one padded with weight-0 rows (they contribute nothing to the summed loss or the count).

    Rows of a minibatch are ordered by prompt length, so that each micro-batch is cut to a
    bucket near its own rows' lengths (the minibatch's gradient is a sum: order is free).
    """
    n = len(arrays["prompt"])
    order = rng.permutation(n)
    lengths = arrays["prompt_mask"].sum(axis=1)
    for start in range(0, n, config.minibatch_size):
        rows = order[start:start + config.minibatch_size]
        rows = rows[np.argsort(lengths[rows], kind="stable")]
        batch = {k: v[rows] for k, v in arrays.items()}
        short = config.minibatch_size - len(rows)
        if short:
            batch = {k: np.concatenate([v[:1].repeat(short, 0), v]) for k, v in batch.items()}
            batch["weight"][:short] = 0.0
        yield micro_batches(batch, config.micro_batch_size)


def prepare_rollout(transitions: list[Transition], final_prompts: dict[int, list[int]],
                    actor_critic, reference, config: PPOConfig, pad_id: int, action_len: int
                    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Training arrays for one iteration, from the stored transitions.

    Args:
      transitions: collected with `agent.play(..., value_head=...)` (log-probs and values of
        the sampling policy are stored there and used as-is).
      final_prompts: game -> prompt ids of the state a *truncated* episode was cut at (its
        value is the bootstrap); terminated episodes have no entry.
      actor_critic: the current policy + value head (for the bootstrap values).
      reference: the frozen warm-start policy (same structure) for the KL term.
      config: PPO hyperparameters; pad_id / action_len: padding of the arrays.
    Returns:
      `(arrays, stats)`: arrays with prompt/action tokens and masks, old_logprob, ref_logprob,
      old_value, advantage, return, weight (all `[N, ...]`), and rollout statistics.
    """
    arrays = transition_arrays([t.prompt_ids for t in transitions],
                               [t.action_ids for t in transitions], pad_id, action_len)
    old_logprob = np.array([t.logprob for t in transitions], np.float32)
    old_value = np.array([t.value for t in transitions], np.float32)
    ref_logprob = score_all(reference, arrays)[0]
    bootstrap = {}
    if final_prompts:
        games = sorted(final_prompts)
        ends = transition_arrays([final_prompts[g] for g in games], [[pad_id]] * len(games),
                                 pad_id, action_len)
        bootstrap = dict(zip(games, score_all(actor_critic, ends)[2].tolist()))
    env_reward = np.array([t.reward for t in transitions], np.float32)
    kl = np.asarray(losses.kl_k1(old_logprob, ref_logprob))
    reward = (np.asarray(losses.kl_penalized_rewards(env_reward, old_logprob, ref_logprob,
                                                     config.kl_coef))
              if config.kl_in == "reward" else env_reward)
    advantage, returns = step_advantages(transitions, reward, old_value, bootstrap,
                                         config.gamma, config.lam)
    if config.whiten_advantages:
        advantage = np.asarray(losses.masked_whiten(advantage[None], np.ones((1, len(advantage)))))[0]
    arrays.update(old_logprob=old_logprob, ref_logprob=ref_logprob, old_value=old_value,
                  advantage=advantage.astype(np.float32), **{"return": returns.astype(np.float32)},
                  weight=np.ones(len(transitions), np.float32))
    explained = 1 - np.var(returns - old_value) / max(float(np.var(returns)), 1e-8)
    stats = dict(env_reward=float(env_reward.sum()), kl_ref=float(kl.mean()),
                 explained_variance=float(explained), transitions=len(transitions),
                 valid_action_rate=float(np.mean([t.valid for t in transitions])))
    return arrays, stats
