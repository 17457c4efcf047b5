"""A learned reward, trained on preference pairs with the Bradley-Terry loss.

Two ways to read a reward off a decoder (`SCORES`):
  * "value": `value_scores`, a scalar head (`ActorCritic`) on each response token's final
    hidden state, averaged over the response (Ouyang et al. 2022, with a per-token head);
  * "likelihood": `likelihood_scores`, the mean log-prob of the response's tokens under the
    model itself (a generative reward model; the implicit reward of DPO, Rafailov et al. 2023,
    up to its reference term). Started from the SFT policy, it ranks pairs before any training
    as well as that policy knows the task, and the Bradley-Terry loss sharpens it.
`preference_loss` is the loss of a batch of (chosen, rejected) pairs for `train.step.Trainer`;
`pair_batch` builds that batch from token lists, and `reward_fn` turns a trained model into the
`reward_fn(prompts, responses)` that `train.prompt_rl` optimises.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrl_llm import losses
from jaxrl_llm.logprobs import token_logprobs
from jaxrl_llm.model import causal_mask, positions_from_mask
from jaxrl_llm.model.value_head import ActorCritic
from jaxrl_llm.padding import pad_left

PAIR_PARTS = ("tokens", "mask", "response_mask")


def sequence_arrays(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                    width: int, pad_id: int):
    """Left-padded `[B, W]` prompt + response tokens, their mask, and the mask of the response
    tokens (the last len(response) columns of each row)."""
    tokens, mask = pad_left([list(p) + list(r) for p, r in zip(prompts, responses)], width,
                            pad_id)
    lengths = np.array([len(r) for r in responses])
    return tokens, mask, np.arange(width)[None, :] >= width - lengths[:, None]


def value_scores(reward_model: ActorCritic, tokens, mask, response_mask) -> jax.Array:
    """`[B]` rewards of left-padded `[B, W]` prompt + response sequences: the mean over response
    tokens of the scalar head on each token's final hidden state.

    Every token is judged with the whole prefix in view (is it the previous term + d? is EOS
    due?). A head on the last token alone must summarise the whole response in one state: with
    a small trunk it ranked policy samples worse than chance.
    """
    hidden, _ = reward_model.lm.hidden_states(tokens, positions_from_mask(mask),
                                              causal_mask(mask))
    return losses.masked_mean(reward_model.value_head(hidden), response_mask, axis=1)


def likelihood_scores(lm, tokens, mask, response_mask) -> jax.Array:
    """`[B]` rewards of left-padded `[B, W]` prompt + response sequences: the mean over response
    tokens of log p(token | everything before it) under the decoder `lm`."""
    logits, _, _ = lm(tokens, positions_from_mask(mask), causal_mask(mask))
    logprobs = token_logprobs(logits[:, :-1], tokens[:, 1:])  # [B, W - 1]: of tokens 1..W-1
    return losses.masked_mean(logprobs, response_mask[:, 1:], axis=1)


SCORES = {"value": value_scores, "likelihood": likelihood_scores}


def reward_model_for(sft_model, kind: str):
    """A trainable copy of `sft_model` that `SCORES[kind]` reads: with a zero-initialised
    value head ("value") or as it is ("likelihood")."""
    if kind not in SCORES:
        raise ValueError(f"reward model kind must be one of {', '.join(SCORES)}, got {kind!r}")
    model = nnx.clone(sft_model)
    return ActorCritic(model) if kind == "value" else model


def pair_batch(prompts, chosen, rejected, width: int, pad_id: int) -> dict[str, np.ndarray]:
    """`chosen_*` / `rejected_*` `sequence_arrays` (tokens, mask, response_mask) of pairs."""
    arrays = {}
    for name, responses in (("chosen", chosen), ("rejected", rejected)):
        arrays.update(zip((f"{name}_{part}" for part in PAIR_PARTS),
                          sequence_arrays(prompts, responses, width, pad_id)))
    return arrays


def preference_loss(reward_model, batch, kind: str = "value"):
    """The Bradley-Terry loss summed over a `pair_batch`, for `Trainer` (bind `kind` with
    `functools.partial`); the metric `accuracy` counts pairs ranked right."""
    both = lambda part: jnp.concatenate([batch[f"chosen_{part}"], batch[f"rejected_{part}"]])
    chosen, rejected = jnp.split(SCORES[kind](reward_model, *map(both, PAIR_PARTS)), 2)
    loss = losses.bradley_terry_loss(chosen, rejected, reduction="sum")
    return loss, jnp.float32(len(chosen)), dict(
        loss=loss, accuracy=jnp.sum((chosen > rejected).astype(jnp.float32)))


@functools.partial(jax.jit, static_argnums=0)
def _scores(kind, graphdef, state, tokens, mask, response_mask):
    return SCORES[kind](nnx.merge(graphdef, state), tokens, mask, response_mask)


def pair_accuracy(reward_model, pairs: dict[str, np.ndarray], kind: str = "value") -> float:
    """Fraction of a `pair_batch` whose chosen response gets the higher reward."""
    graphdef, state = nnx.split(reward_model)
    chosen, rejected = (_scores(kind, graphdef, state,
                                *(pairs[f"{name}_{part}"] for part in PAIR_PARTS))
                        for name in ("chosen", "rejected"))
    return float(jnp.mean(chosen > rejected))


def reward_fn(reward_model, width: int, pad_id: int, kind: str = "value"
              ) -> Callable[[Sequence[Sequence[int]], Sequence[Sequence[int]]], np.ndarray]:
    """`reward_fn(prompts, responses) -> [B]` of the model's current weights (one jitted
    width: prompts + responses must fit in `width` tokens)."""
    graphdef, state = nnx.split(reward_model)
    return lambda prompts, responses: np.asarray(
        _scores(kind, graphdef, state, *sequence_arrays(prompts, responses, width, pad_id)))
