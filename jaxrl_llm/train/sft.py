"""Supervised fine-tuning of LoRA adapters, loss on completions only.

Two data layouts, one loss (the true token mean over each batch, see `train.step`):
  * (prompt -> completion) pairs, grouped by prompt length into buckets (`batches`,
    `completion_loss`), so a run compiles one train step per bucket rather than per length;
  * packed episodes (`jaxrl_llm.packing`): a whole game in one row, the loss on every step's
    action tokens (`episode_batches`, `packed_completion_loss`); the same tokens with the same
    contexts as the per-step pairs, without repeating the history at every step.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import jax.numpy as jnp
import numpy as np

from jaxrl_llm.checks import require_at_least_one, require_micro_batches
from jaxrl_llm.logprobs import score_responses
from jaxrl_llm.packing import PackedEpisode, collate, packed_forward, widths
from jaxrl_llm.padding import bucket_length, pad_left, pad_right
from jaxrl_llm.scoring import action_logprobs
from jaxrl_llm.train.step import micro_batches


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """Attributes:
      epochs: passes over the training examples.
      batch_size: examples (or packed episodes) per optimizer step (micro_batch_size x
        accumulation steps).
      micro_batch_size: examples per forward/backward (memory knob).
      completion_len: padded completion width R of (prompt, completion) pairs; longer
        completions are an error.
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
      `(nll_sum, token_count, {"loss": nll_sum, "token_accuracy": correct-token count})`.
    """
    logprobs, _, _ = score_responses(model, batch["prompt"], batch["prompt_mask"],
                                     batch["completion"], batch["completion_mask"], remat=remat)
    return _nll(logprobs, batch["completion_mask"])


def _nll(logprobs, mask):
    mask = mask.astype(jnp.float32)
    nll = -jnp.sum(logprobs * mask)
    # log p > log 0.5 means the target was the argmax: a cheap token-accuracy proxy.
    correct = jnp.sum((logprobs > jnp.log(0.5)) * mask)
    return nll, jnp.sum(mask), {"loss": nll, "token_accuracy": correct}


def packed_completion_loss(model, batch, remat: bool = False):
    """`completion_loss` over packed episodes (`packing.collate`): every leaf token is a target.

    Returns:
      `(nll_sum, token_count, {"loss": nll_sum, "token_accuracy": correct-token count})`.
    """
    out = packed_forward(model, batch, remat=remat)
    return _nll(out.token_logprobs, batch["target_slot"] >= 0)


def packed_choice_loss(model, batch, temperature: float = 1.0, length_norm: bool = False,
                       remat: bool = False):
    """Cross-entropy of the action-level policy on gold steps, plus the gold action's NLL.

    Packed episodes whose leaves are every valid action (`data.encode_episode(...,
    candidates=True)`) and `batch["gold"] [B, S]` (the gold leaf, -1 to skip): per step
    -log pi(gold | s) - log p(gold tokens | s). The first term trains the decision itself (it
    pushes down the valid actions that were not taken), the second keeps the gold action's
    text likely, as the completion loss does.

    Returns:
      `(loss_sum, gold_step_count, {"loss", "choice_nll", "choice_accuracy"})`.
    """
    out = packed_forward(model, batch, remat=remat)
    mask = batch["leaf_lengths"] > 0
    logpi = action_logprobs(out.scores, mask, temperature,
                            batch["leaf_lengths"] if length_norm else None)
    logpi = jnp.where(mask, logpi, -1e9)  # padded slots: finite, never the argmax
    gold = jnp.maximum(batch["gold"], 0)[..., None]
    valid = (batch["gold"] >= 0).astype(jnp.float32)
    choice_nll = -jnp.sum(jnp.take_along_axis(logpi, gold, axis=-1)[..., 0] * valid)
    token_nll = -jnp.sum(jnp.take_along_axis(out.scores, gold, axis=-1)[..., 0] * valid)
    correct = jnp.sum((jnp.argmax(logpi, axis=-1) == gold[..., 0]) * valid)
    loss = choice_nll + token_nll
    return loss, jnp.sum(valid), {"loss": loss, "choice_nll": choice_nll,
                                  "choice_accuracy": correct}


def episode_batches(episodes: Sequence[PackedEpisode], config: SFTConfig, epoch: int,
                    pad_id: int = 0, gold: Sequence[Sequence[int]] | None = None
                    ) -> Iterator[list[dict[str, np.ndarray]]]:
    """Shuffled batches of `batch_size` packed episodes, each a list of collated micro-batches.

    Episodes are sorted by length and cut into groups (little padding per micro-batch); the
    order of the groups is shuffled per epoch (seeded by `(config.seed, epoch)`). A last short
    group just has fewer micro-batches: the loss is a token mean, so it needs no padding rows.
    Every micro-batch has the dataset's widest N, S and C (`packing.widths`): only its token
    width varies, which keeps the compiled programs few.
    With `gold` (per episode, each step's gold leaf), batches also hold `gold [B, S]` (-1 on
    padded steps) for `packed_choice_loss`.
    """
    order = np.argsort([e.num_tokens for e in episodes], kind="stable")
    at_least = (0, *widths(episodes)[1:])
    groups = [order[i:i + config.batch_size] for i in range(0, len(order), config.batch_size)]
    rng = np.random.default_rng((config.seed, epoch))
    for group in (groups[i] for i in rng.permutation(len(groups))):
        micros = []
        for j in range(0, len(group), config.micro_batch_size):
            rows = group[j:j + config.micro_batch_size]
            micro = collate([episodes[i] for i in rows], pad_id, at_least)
            if gold is not None:
                micro["gold"] = np.full(micro["step_mask"].shape, -1, np.int32)
                for r, i in enumerate(rows):
                    micro["gold"][r, :len(gold[i])] = gold[i]
            micros.append(micro)
        yield micros


def gold_action_accuracy(score_fn, episodes: Sequence[PackedEpisode], gold: Sequence[Sequence[int]],
                         temperature: float = 1.0, length_norm: bool = False,
                         pad_id: int = 0, groups: Sequence[Sequence[str]] | None = None
                         ) -> dict[str, float]:
    """How often the action-level policy's argmax is the gold action, on packed gold episodes
    whose leaves are every valid action (`data.encode_episode(..., candidates=True)`).

    Args:
      score_fn: collated batch -> `PackedOutput` (e.g. a jitted `packing.packed_forward`).
      gold: per episode, each step's gold leaf index (-1: not among the valid actions; skipped).
      groups: per episode, each step's label (e.g. the gold action's verb): the accuracy is
        also reported per label, since a few rare decisions can decide a game while the
        common ones fill the mean.
    Returns:
      `{"action_accuracy": ..., "gold_logprob": mean log pi(gold | s), "steps": counted,
      "other_norm_accuracy": the accuracy with length normalisation flipped}` (the same
      forward answers both, so each run measures that lever too); with `groups`, also
      `"accuracy/<label>"` and `"steps/<label>"` per label.
    """
    labels = groups if groups is not None else [[""] * len(g) for g in gold]
    if [len(g) for g in gold] != [len(l) for l in labels]:
        raise ValueError("groups must hold one label per step of each episode's gold, got "
                         f"{[len(l) for l in labels]} labels for {[len(g) for g in gold]} steps")
    other, logprob = 0, 0.0
    by_label: dict[str, list[int]] = {}  # label -> [hits, steps]
    at_least = (0, *widths(episodes)[1:])  # one program per token bucket
    for episode, gold_index, episode_labels in zip(episodes, gold, labels):
        batch = collate([episode], pad_id, at_least)
        scores = np.asarray(score_fn(batch).scores[0])
        mask, lengths = batch["leaf_lengths"][0] > 0, batch["leaf_lengths"][0]
        policy = lambda norm: np.asarray(action_logprobs(scores, mask, temperature,
                                                         lengths if norm else None))
        logpi, flipped = policy(length_norm), policy(not length_norm)
        for s, (g, label) in enumerate(zip(gold_index, episode_labels)):
            if g >= 0:
                counts = by_label.setdefault(label, [0, 0])
                counts[0] += int(np.argmax(logpi[s]) == g)
                counts[1] += 1
                other += int(np.argmax(flipped[s]) == g)
                logprob += float(logpi[s, g])
    hits, steps = (sum(c[i] for c in by_label.values()) for i in (0, 1))
    result = dict(action_accuracy=hits / max(steps, 1), gold_logprob=logprob / max(steps, 1),
                  steps=steps, other_norm_accuracy=other / max(steps, 1))
    if groups is not None:
        for label, (hit, count) in sorted(by_label.items()):
            result[f"accuracy/{label}"], result[f"steps/{label}"] = hit / count, count
    return result


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
