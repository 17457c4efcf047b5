"""Supervised fine-tuning of LoRA adapters on (prompt -> completion) pairs, loss on completions.

Examples are grouped by prompt length into buckets, so a run compiles one train step per bucket
rather than per length; the loss is the true token mean over each batch (see `train.step`).
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import jax.numpy as jnp
import numpy as np

from jaxrl_llm.checks import require_at_least_one, require_micro_batches
from jaxrl_llm.generation import bucket_length, pad_left, pad_right
from jaxrl_llm.logprobs import score_responses
from jaxrl_llm.train.step import micro_batches


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """Attributes:
      epochs: passes over the training examples.
      batch_size: examples per optimizer step (micro_batch_size x accumulation steps).
      micro_batch_size: examples per forward/backward (memory knob).
      completion_len: padded completion width R; longer completions are an error.
      remat: recompute activations in the backward pass (long prompts, little memory).
      seed: shuffling seed.
    """

    epochs: int = 2
    batch_size: int = 8
    micro_batch_size: int = 1
    completion_len: int = 16
    remat: bool = False
    seed: int = 0

    def __post_init__(self):
        require_at_least_one(self, ("epochs", "batch_size", "micro_batch_size", "completion_len"))
        require_micro_batches(self, "batch_size")


def completion_loss(model, batch, remat: bool = False):
    """Summed negative log-likelihood of completion tokens, for `train.step.Trainer`.

    Args:
      model: the decoder with adapters.
      batch: dict of `prompt [b, P]` (left-padded), `prompt_mask`, `completion [b, R]`
        (right-padded), `completion_mask`.
    Returns:
      `(nll_sum, token_count, {"loss": nll_sum, "accuracy": correct-token count})`.
    """
    logprobs, _, _ = score_responses(model, batch["prompt"], batch["prompt_mask"],
                                     batch["completion"], batch["completion_mask"], remat=remat)
    mask = batch["completion_mask"].astype(jnp.float32)
    nll = -jnp.sum(logprobs)
    # log p > log 0.5 means the target was the argmax: a cheap token-accuracy proxy.
    correct = jnp.sum((logprobs > jnp.log(0.5)) * mask)
    return nll, jnp.sum(mask), {"loss": nll, "token_accuracy": correct}


def batches(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
            config: SFTConfig, epoch: int, pad_id: int = 0
            ) -> Iterator[list[dict[str, np.ndarray]]]:
    """Shuffled, length-bucketed batches, each a list of micro-batches (`train.step.micro_batches`).

    Examples are sorted by prompt length and cut into groups of `batch_size` so that padding is
    small; the order of the groups is shuffled per epoch (seeded). A last incomplete group is
    kept, padded with zero-mask rows that count for nothing in the loss.
    """
    if too_long := [i for i, c in enumerate(completion_ids) if len(c) > config.completion_len]:
        raise ValueError(f"{len(too_long)} completions exceed completion_len="
                         f"{config.completion_len} (e.g. example {too_long[0]}); raise it")
    order = np.argsort([len(p) for p in prompt_ids], kind="stable")
    groups = [order[i:i + config.batch_size] for i in range(0, len(order), config.batch_size)]
    rng = np.random.default_rng((config.seed, epoch))
    for group in (groups[i] for i in rng.permutation(len(groups))):
        rows = list(group) + [None] * (config.batch_size - len(group))
        prompts = [prompt_ids[i] if i is not None else [pad_id] for i in rows]
        completions = [completion_ids[i] if i is not None else [] for i in rows]
        width = bucket_length(max(len(p) for p in prompts))
        prompt, prompt_mask = pad_left(prompts, width, pad_id)
        completion, completion_mask = pad_right(completions, config.completion_len, pad_id)
        completion_mask &= np.array([i is not None for i in rows])[:, None]
        yield micro_batches(dict(prompt=prompt, prompt_mask=prompt_mask, completion=completion,
                                 completion_mask=completion_mask), config.micro_batch_size)
