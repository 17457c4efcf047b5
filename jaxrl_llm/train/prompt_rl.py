"""Prompt-level RL: prompt -> k sampled responses -> one scalar reward each, one trainer for PPO,
REINFORCE, RLOO, GRPO and Dr. GRPO (chosen by name).

One iteration (`iteration`), in paper order:
  1. sample k responses per prompt with the jitted sampler and keep its per-token log-probs: they
     are the old log-probs of every ratio (never re-sampled: notebook 001 re-samples inside its
     PPO epochs, so its ratios compare different responses);
  2. score the responses with the user's batched `reward_fn` (checked: shape, finite);
  3. reference log-probs from the frozen initial policy (and, for PPO, per-token values);
  4. advantages by algorithm:
       ppo        the reward on the last real response token minus a per-token KL penalty
                  (Ziegler et al. 2019, eq. 2), token-level GAE, whitened (Schulman et al. 2017);
       reinforce  r - mean of the prompt's k rewards (Williams 1992; notebook 003);
       rloo       r - mean of the other k - 1 rewards (Ahmadian et al. 2024, eq. 6);
       grpo       (r - mean) / std over the prompt's group (Shao et al. 2024, sec. 4.1.2);
       dr_grpo    r - mean, no std, no per-response length normalisation (Liu et al. 2025);
  5. epochs of shuffled minibatch updates through `train.step.Trainer`: the clipped surrogate for
     ppo / grpo / dr_grpo, the plain policy gradient for reinforce / rloo (one epoch);
  6. optionally adapt the KL coefficient (Ziegler et al. 2019, sec. 2.2).

Rows of a rollout are prompt-major: rows i*k .. i*k + k - 1 answer prompt i.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxrl_llm import losses
from jaxrl_llm.checks import require_at_least_one
from jaxrl_llm.generation import generate
from jaxrl_llm.logprobs import entropy_from_logits, response_hidden_states, token_logprobs
from jaxrl_llm.model.lora import TRAINABLE
from jaxrl_llm.model.value_head import ActorCritic
from jaxrl_llm.padding import pad_left
from jaxrl_llm.sampling import SamplingConfig
from jaxrl_llm.train.hparams import PPOHyperparams, minibatch_rows
from jaxrl_llm.train.step import Trainer, TrainState

ALGORITHMS = ("ppo", "reinforce", "rloo", "grpo", "dr_grpo")
CLIPPED = ("ppo", "grpo", "dr_grpo")  # ratio-clipped surrogate: several epochs are sound
# Each paper's loss reduction and place of the KL term (config fields left at None get these).
# REINFORCE/RLOO differentiate the response's summed log-prob; "seq_sum_norm" divides it by the
# constant max_new_tokens, the normalisation of Dr. GRPO, so learning rates carry over.
PAPER_DEFAULTS = dict(ppo=("token_mean", "reward"), reinforce=("seq_sum_norm", "reward"),
                      rloo=("seq_sum_norm", "reward"), grpo=("seq_mean_token_mean", "loss"),
                      dr_grpo=("seq_sum_norm", "loss"))

# reward_fn(prompts_tokens, responses_tokens) -> [N] rewards, one per response; responses hold
# the sampled ids up to and including the stop / EOS token.
RewardFn = Callable[[list[list[int]], list[list[int]]], np.ndarray]


@dataclasses.dataclass(frozen=True)
class PromptRLConfig(PPOHyperparams):
    """One prompt-level RL algorithm: the shared `PPOHyperparams` (clip_eps, value_clip and
    vf_coef, gamma and lam, whiten_advantages for ppo; entropy_coef, kl_coef, epochs and the
    batch sizes for all) and what this trainer adds.

    Attributes:
      algorithm: one of `ALGORITHMS`.
      num_samples: k responses per prompt (>= 2 except for ppo, whose baseline is the critic).
      sampling: the sampler. Drawing from the policy itself (temperature 1, no top-k / top-p)
        is on-policy and its log-probs are the ratio's old ones. With top_k / top_p the old
        log-probs are recomputed under the unfiltered policy by a forward pass (trlX's rule,
        notebook 002): ratios start at 1, the samples are slightly off-policy.
      epochs: passes over an iteration's responses (1 for reinforce / rloo: on-policy losses).
      minibatch_size: responses per optimizer step (16); micro_batch_size: per forward/backward.
      kl_coef: initial weight beta of the KL to the reference (0.05).
      kl_in: "reward" (k1 penalty in the reward: per token for ppo, summed over the response
        otherwise) or "loss" (k3 term in the loss, GRPO); None: the paper's (`PAPER_DEFAULTS`).
      kl_target: adaptive KL (Ziegler et al. 2019): target KL per response in nats; None: fixed.
      kl_horizon: the controller's horizon in responses (10000 in the paper).
      reduction: loss aggregation (`losses.REDUCTIONS`); None: the paper's.
      remat: recompute activations in the backward pass (long prompts, little memory).
    """

    kl_coef: float = 0.05
    minibatch_size: int = 16
    micro_batch_size: int = 8
    algorithm: str = "rloo"
    num_samples: int = 4
    sampling: SamplingConfig = SamplingConfig()
    kl_in: str | None = None
    kl_target: float | None = None
    kl_horizon: float = 10_000.0
    reduction: str | None = None
    remat: bool = False

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"PromptRLConfig.algorithm must be one of {', '.join(ALGORITHMS)}, "
                             f"got {self.algorithm!r}")
        if self.algorithm != "ppo" and self.num_samples < 2:
            raise ValueError(f"PromptRLConfig.num_samples must be >= 2 for {self.algorithm} (its "
                             f"baseline comes from the other samples of a prompt), got "
                             f"{self.num_samples}")
        require_at_least_one(self, ("num_samples",))
        super().__post_init__()
        if self.algorithm not in CLIPPED and self.epochs != 1:
            raise ValueError(f"PromptRLConfig.epochs must be 1 for {self.algorithm} (an on-policy "
                             f"gradient); use grpo, dr_grpo or ppo for several epochs")
        s = self.sampling
        if s.greedy or s.temperature != 1.0:
            raise ValueError("PromptRLConfig.sampling must sample at temperature 1 "
                             "(greedy=False): a policy gradient needs the policy's own "
                             f"distribution; got {s}")
        if self.kl_target is not None and not self.kl_target > 0:
            raise ValueError(f"PromptRLConfig.kl_target must be > 0 (None: fixed kl_coef), got "
                             f"{self.kl_target}")
        if not self.kl_horizon > 0:
            raise ValueError(f"PromptRLConfig.kl_horizon must be > 0, got {self.kl_horizon}")
        reduction, kl_in = PAPER_DEFAULTS[self.algorithm]
        object.__setattr__(self, "reduction", self.reduction or reduction)
        object.__setattr__(self, "kl_in", self.kl_in or kl_in)
        if self.kl_in not in losses.KL_MODES:
            raise ValueError(f"PromptRLConfig.kl_in must be one of "
                             f"{', '.join(losses.KL_MODES)} (or None for the paper's), got "
                             f"{self.kl_in!r}")
        if self.reduction not in losses.REDUCTIONS:
            raise ValueError(f"PromptRLConfig.reduction must be one of "
                             f"{', '.join(losses.REDUCTIONS)}, got {self.reduction!r}")

    @property
    def filtered(self) -> bool:
        """Whether the sampler truncates the policy (top-k / top-p)."""
        return bool(self.sampling.top_k) or self.sampling.top_p < 1.0

    @property
    def norm_constant(self) -> float:
        """Dr. GRPO's constant divisor for "seq_sum_norm": the generation budget."""
        return float(self.sampling.max_new_tokens)


def policy_lm(model: nnx.Module) -> nnx.Module:
    """The language model of a policy (the `lm` of an `ActorCritic`, else the model itself)."""
    return model.lm if isinstance(model, ActorCritic) else model


def make_trainer(model: nnx.Module, config: PromptRLConfig,
                 optimizer: optax.GradientTransformation, trainable=TRAINABLE) -> Trainer:
    """A `Trainer` of `prompt_rl_loss`; for ppo the model first gets a value head (critic).

    `trainable` picks what trains: `lora.TRAINABLE` (adapters + value head) or `nnx.Param`
    (every weight of a small float model).
    """
    if config.algorithm == "ppo":
        model = ActorCritic(model)
    return Trainer(model, optimizer, functools.partial(prompt_rl_loss, config=config),
                   trainable=trainable)


def call_reward_fn(reward_fn: RewardFn, prompts: list[list[int]],
                   responses: list[list[int]]) -> np.ndarray:
    """`reward_fn(prompts, responses)` as `[N]` float32, or a ValueError naming the function."""
    name = getattr(reward_fn, "__name__", type(reward_fn).__name__)  # a partial has no name
    output = reward_fn(prompts, responses)
    try:
        rewards = np.asarray(output, np.float32)
    except (TypeError, ValueError) as error:
        raise ValueError(f"reward_fn {name} must return {len(responses)} numbers: {error}") \
            from error
    if rewards.shape != (len(responses),):
        raise ValueError(f"reward_fn {name} returned shape {rewards.shape}, expected "
                         f"({len(responses)},): one reward per response")
    if not np.all(np.isfinite(rewards)):
        bad = np.flatnonzero(~np.isfinite(rewards))
        raise ValueError(f"reward_fn {name} returned {len(bad)} non-finite rewards (NaN/inf), "
                         f"e.g. response {bad[0]}: {rewards[bad[0]]}")
    return rewards


def sample_responses(lm: nnx.Module, prompts: Sequence[Sequence[int]], key: jax.Array,
                     config: PromptRLConfig) -> dict[str, np.ndarray]:
    """k sampled responses per prompt, with the sampler's log-probs (the ratio's old ones).

    Returns arrays with N = len(prompts) * k rows: `prompt [N, P]` (left-padded, bucketed),
    `prompt_mask`, `response [N, R]` (right-padded, R = max_new_tokens), `response_mask`,
    `old_logprobs [N, R]` (0 where masked).
    """
    rows = [list(p) for p in prompts for _ in range(config.num_samples)]
    prompt, prompt_mask = pad_left(rows, pad_id=config.sampling.pad_id)
    out = generate(lm, prompt, prompt_mask, key, config.sampling)
    return dict(prompt=prompt, prompt_mask=prompt_mask, response=np.asarray(out.tokens),
                response_mask=np.asarray(out.mask), old_logprobs=np.asarray(out.logprobs))


def policy_scores(model: nnx.Module, batch, remat: bool = False):
    """`(logprobs [b, R], entropy [b, R], values [b, R] or None)` of the batch's responses.

    Log-probs (float32, unmasked) of each response token and the entropy of the distribution it
    was drawn from; values V(s_t) from an `ActorCritic`'s head on the hidden state that
    predicts token t (the state after the prompt and tokens < t), None for a bare model.
    """
    lm = policy_lm(model)
    hidden = response_hidden_states(lm, batch["prompt"], batch["prompt_mask"], batch["response"],
                                    batch["response_mask"], remat=remat)
    logits = lm.logits(hidden)  # [b, R, V]
    values = model.value_head(hidden) if isinstance(model, ActorCritic) else None
    return token_logprobs(logits, batch["response"]), entropy_from_logits(logits), values


@jax.jit
def _scores_jit(graphdef, state, batch):
    logprobs, _, values = policy_scores(nnx.merge(graphdef, state), batch)
    return logprobs, values


def score_rollout(model: nnx.Module, arrays: dict[str, np.ndarray], chunk: int):
    """`(logprobs [N, R], values [N, R] or None)` of all rows, `chunk` rows per jitted call;
    both 0 where the response is masked."""
    graphdef, state = nnx.split(model)
    n, mask = len(arrays["prompt"]), arrays["response_mask"]
    parts = []
    for start in range(0, n, chunk):
        part = {k: arrays[k][start:start + chunk]
                for k in ("prompt", "prompt_mask", "response", "response_mask")}
        rows = len(part["prompt"])
        # The last chunk is filled up with copies of its first row: one compiled shape.
        part = {k: np.concatenate([v, v[:1].repeat(chunk - rows, 0)]) for k, v in part.items()}
        parts.append(jax.tree.map(lambda x: np.asarray(x)[:rows], _scores_jit(graphdef, state,
                                                                              part)))
    logprobs = np.where(mask, np.concatenate([p[0] for p in parts]), 0.0)
    values = None if parts[0][1] is None else np.where(mask, np.concatenate(
        [p[1] for p in parts]), 0.0)
    return logprobs, values


def last_token_rewards(rewards: jax.Array, mask: jax.Array) -> jax.Array:
    """Each response's scalar reward on its last real token, 0 elsewhere (never on padding).

    Args: rewards `[N]`; mask `[N, R]` right-padded (True up to the stop token).
    Returns: `[N, R]` float32; an all-False row gets no reward.
    Raises: on a concrete mask that is not right-padded (the reward would land on padding).
    """
    if not isinstance(mask, jax.core.Tracer):
        host = np.asarray(mask, bool)
        if np.any(host != (np.arange(host.shape[1]) < host.sum(1, keepdims=True))):
            raise ValueError("last_token_rewards needs right-padded masks (each row's real "
                             "tokens first); a left-padded row would get its reward on padding")
    lengths = jnp.sum(jnp.asarray(mask, jnp.int32), axis=1)
    # one_hot of -1 is all zeros: an empty row gets nothing.
    return jax.nn.one_hot(lengths - 1, mask.shape[1]) * jnp.asarray(rewards, jnp.float32)[:, None]


def group_advantages(rewards: jax.Array, algorithm: str) -> jax.Array:
    """`[P, k]` rewards of k responses per prompt -> `[P, k]` advantages of `algorithm`."""
    if algorithm == "reinforce":
        return rewards - losses.mean_baseline(rewards)
    if algorithm == "rloo":
        return losses.rloo_advantages(rewards)
    return losses.grpo_advantages(rewards, scale_by_std=algorithm == "grpo")


def collect(policy: nnx.Module, reference: nnx.Module, prompts: Sequence[Sequence[int]],
            reward_fn: RewardFn, key: jax.Array, kl_coef: float, config: PromptRLConfig
            ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Sample, reward, score and compute advantages: the arrays one iteration trains on.

    Args:
      policy: the current policy (an `ActorCritic` for ppo); reference: the frozen initial one.
      prompts: token lists; reward_fn: see `RewardFn`; key: PRNG key of the sampler.
      kl_coef: beta now (a float, adapted between iterations).
    Returns:
      `(arrays, stats)`: `[N, ...]` arrays (`sample_responses`' plus `ref_logprobs`,
      `advantages [N, R]` (0 on padding), `kl_coef [N]`, and for ppo `old_values`, `returns`),
      and rollout statistics (reward mean/std, KL to the reference per response, lengths).
    """
    arrays = sample_responses(policy_lm(policy), prompts, key, config)
    mask = arrays["response_mask"]
    rewards = call_reward_fn(reward_fn, [list(p) for p in prompts for _ in
                                         range(config.num_samples)],
                             [r[m].tolist() for r, m in zip(arrays["response"], mask)])
    ref_logprobs, _ = score_rollout(reference, arrays, config.minibatch_size)
    if config.algorithm == "ppo" or config.filtered:  # one policy pass: values and log-probs
        policy_logprobs, values = score_rollout(policy, arrays, config.minibatch_size)
        if config.filtered:  # the sampler's log-probs are of the truncated distribution
            arrays["old_logprobs"] = policy_logprobs
    old_logprobs = arrays["old_logprobs"]
    # k1 on samples of the policy: the unbiased per-response KL(pi || ref) (Ziegler et al.).
    kl = np.asarray(losses.masked_sum(losses.kl_k1(old_logprobs, ref_logprobs), mask, axis=1))
    stats = dict(reward_mean=float(rewards.mean()), reward_std=float(rewards.std()),
                 kl_ref=float(kl.mean()), kl_coef=kl_coef,
                 ref_logprob=float(ref_logprobs[mask].mean()),  # fluency under the reference
                 response_length=float(mask.sum(1).mean()))
    if config.algorithm == "ppo":
        token_rewards = last_token_rewards(rewards, mask)
        if config.kl_in == "reward":
            token_rewards = losses.kl_penalized_rewards(token_rewards, old_logprobs, ref_logprobs,
                                                        kl_coef)
        advantages, returns = losses.gae(
            token_rewards, values, losses.next_step_values(values, mask),
            jnp.zeros(mask.shape), mask, gamma=config.gamma, lam=config.lam)
        if config.whiten_advantages:
            advantages = losses.masked_whiten(advantages, mask)
        returns = np.asarray(returns)
        arrays.update(old_values=values.astype(np.float32), returns=returns)
        stats.update(value_mean=float(values[mask].mean()), explained_variance=float(
            losses.explained_variance(values, returns, mask)))
    else:
        sequence_rewards = rewards - kl_coef * kl if config.kl_in == "reward" else rewards
        advantages = group_advantages(jnp.asarray(sequence_rewards).reshape(
            -1, config.num_samples), config.algorithm).reshape(-1, 1) * mask
    arrays.update(ref_logprobs=ref_logprobs.astype(np.float32),
                  advantages=np.asarray(advantages, np.float32),
                  kl_coef=np.full(len(mask), kl_coef, np.float32))
    return arrays, stats


def prompt_rl_loss(model: nnx.Module, batch, config: PromptRLConfig):
    """The algorithm's loss summed over a micro-batch, for `train.step.Trainer`.

    Policy term (clipped surrogate for `CLIPPED`, else REINFORCE), plus for ppo `vf_coef` x the
    clipped value loss, plus `kl_coef` x the k3 KL to the reference if kl_in == "loss", minus
    `entropy_coef` x the entropy; every term aggregated with the same `reduction`, so they share
    one count. Masked positions (padding after the stop token, all-masked filler rows) never
    reach the loss.

    Args:
      model: the policy (an `ActorCritic` for ppo).
      batch: `collect`'s arrays for b rows (`kl_coef [b]`: an array, so an adapted beta does not
        recompile the step).
    Returns:
      `(loss_sum, count, metric_sums)`; entropy, clip_fraction and approx_kl are
      `(token sum, token count)` pairs: exact token means whatever the loss's reduction.
    """
    mask = batch["response_mask"]
    logprobs, entropy, values = policy_scores(model, batch, remat=config.remat)
    reduce = dict(reduction=config.reduction, norm_constant=config.norm_constant,
                  return_sum_count=True)
    if config.algorithm in CLIPPED:
        policy_loss, count = losses.ppo_policy_loss(
            logprobs, batch["old_logprobs"], batch["advantages"], mask,
            clip_eps=config.clip_eps, **reduce).loss
    else:
        policy_loss, count = losses.reinforce_loss(logprobs, batch["advantages"], None, mask,
                                                   **reduce)
    loss, metrics = policy_loss, dict(policy_loss=policy_loss)
    if config.algorithm == "ppo":
        value_loss, _ = losses.ppo_value_loss(values, batch["old_values"], batch["returns"], mask,
                                              clip=config.value_clip or None, **reduce)
        loss, metrics["value_loss"] = loss + config.vf_coef * value_loss, value_loss
    if config.kl_in == "loss":
        kl_loss, _ = losses.kl_loss(logprobs, batch["ref_logprobs"], mask, **reduce)
        loss, metrics["kl_loss"] = loss + batch["kl_coef"][0] * kl_loss, kl_loss
    if config.entropy_coef:
        loss = loss - config.entropy_coef * losses.aggregate_loss(entropy, mask, **reduce)[0]
    ratios = losses.ratio_stats(logprobs, batch["old_logprobs"], mask, config.clip_eps,
                                return_sum_count=True)
    tokens = jnp.sum(mask.astype(jnp.float32))
    metrics.update(entropy=(losses.masked_sum(jax.lax.stop_gradient(entropy), mask), tokens),
                   clip_fraction=ratios.clip_fraction, approx_kl=ratios.approx_kl_k3, loss=loss)
    return loss, count, metrics


def minibatches(arrays: dict[str, np.ndarray], config: PromptRLConfig, key: jax.Array
                ) -> Iterator[dict[str, np.ndarray]]:
    """Shuffled minibatches (`hparams.minibatch_rows`), leaves `[M, micro_batch_size, ...]`; the
    last one filled up with rows whose response mask is all False (they count for nothing)."""
    size = config.minibatch_size
    for rows in minibatch_rows(len(arrays["prompt"]), size, key):
        short = size - len(rows)
        batch = {k: v[np.concatenate([rows, rows[:1].repeat(short)])] for k, v in arrays.items()}
        if short:
            batch["response_mask"][-short:] = False
        yield jax.tree.map(lambda x: x.reshape(size // config.micro_batch_size,
                                               config.micro_batch_size, *x.shape[1:]), batch)


def update(trainer: Trainer, state: TrainState, arrays: dict[str, np.ndarray],
           config: PromptRLConfig, key: jax.Array) -> tuple[TrainState, dict[str, float]]:
    """`config.epochs` passes of minibatch steps over the stored rollout; mean step metrics."""
    steps = []
    for epoch_key in jax.random.split(key, config.epochs):
        for batch in minibatches(arrays, config, epoch_key):
            state, metrics = trainer.step(state, batch)
            steps.append({k: float(v) for k, v in metrics.items()})
    return state, {k: float(np.mean([s[k] for s in steps])) for k in steps[0] if k != "tokens"}


def iteration(trainer: Trainer, state: TrainState, reference: nnx.Module,
              prompts: Sequence[Sequence[int]], reward_fn: RewardFn, key: jax.Array,
              kl_coef: float, config: PromptRLConfig) -> tuple[TrainState, float, dict]:
    """One RL iteration on `prompts`; returns `(state, next kl_coef, metrics record)`.

    `state` is donated to the updates (use the returned one); `reference` is the frozen initial
    policy, e.g. `trainer.model(trainer.init())` taken before training.
    """
    sample_key, update_key = jax.random.split(key)
    arrays, stats = collect(trainer.model(state), reference, prompts, reward_fn, sample_key,
                            kl_coef, config)
    state, update_stats = update(trainer, state, arrays, config, update_key)
    if config.kl_target is not None:
        kl_coef = float(losses.adaptive_kl_update(
            jnp.float32(kl_coef), jnp.float32(stats["kl_ref"]), config.kl_target,
            config.kl_horizon, len(arrays["prompt"])))
    return state, kl_coef, {**stats, **update_stats}
