"""What both PPO trainers (step level and prompt level) share: the clipped-PPO hyperparameters
and the shuffled minibatch order."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from jaxrl_llm.checks import require_at_least_one, require_micro_batches


@dataclasses.dataclass(frozen=True)
class PPOHyperparams:
    """What every clipped-PPO update is tuned by; `train.ppo.PPOConfig` and
    `train.prompt_rl.PromptRLConfig` extend it (and set their own defaults for the last four).

    Attributes:
      clip_eps: policy ratio clip (0.2).
      value_clip: clip of the value change around the stored value (0.2; 0 = unclipped).
      vf_coef: value-loss weight (0.1, notebook 000).
      entropy_coef: entropy bonus weight (0).
      gamma, lam: discount and GAE lambda (1.0, 0.95).
      whiten_advantages: normalise advantages over the iteration.
      kl_coef: weight of the KL to the frozen reference.
      epochs: passes over an iteration's data.
      minibatch_size: rows per optimizer step; micro_batch_size: rows per forward/backward.
    """

    clip_eps: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.1
    entropy_coef: float = 0.0
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    kl_coef: float = 0.2
    epochs: int = 1
    minibatch_size: int = 2
    micro_batch_size: int = 1

    def __post_init__(self):
        name = type(self).__name__
        if not self.clip_eps > 0:
            raise ValueError(f"{name}.clip_eps must be > 0, got {self.clip_eps}")
        if not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise ValueError(f"{name}.gamma and lam must be in [0, 1], got {self.gamma}, "
                             f"{self.lam}")
        if min(self.value_clip, self.vf_coef, self.kl_coef, self.entropy_coef) < 0:
            raise ValueError(f"{name}.value_clip, vf_coef, kl_coef and entropy_coef must be >= 0")
        require_at_least_one(self, ("epochs", "minibatch_size", "micro_batch_size"))
        require_micro_batches(self, "minibatch_size")


def minibatch_rows(n: int, minibatch_size: int, key: jax.Array) -> list[np.ndarray]:
    """A permutation of the rows `0..n-1` drawn with `key` (the shuffle is part of the run's
    checkpointed randomness), cut into minibatches of `minibatch_size` (the last may be short)."""
    order = np.asarray(jax.random.permutation(key, n))
    return [order[i:i + minibatch_size] for i in range(0, n, minibatch_size)]
