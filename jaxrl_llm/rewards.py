"""Reward functions over generated text, and the adapter that plugs them into the trainers.

A text reward maps `[N]` response strings to `[N]` floats. `text_reward_fn` turns one into the
token-level `train.prompt_rl.RewardFn` (decode each response without its stop / EOS token).

    reward_fn = text_reward_fn(tokenizer, functools.partial(keyword_hits, words=COLOURS))
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import numpy as np

TextReward = Callable[[list[str]], np.ndarray]


def keyword_hits(texts: Sequence[str], words: frozenset[str]) -> np.ndarray:
    """How many distinct words of `words` each text uses (notebook 003: lower-cased,
    whitespace-split, so "Red," does not count as "red")."""
    return np.array([len({w.lower() for w in t.split()} & words) for t in texts], np.float32)


def length_penalty(texts: Sequence[str], target: int) -> np.ndarray:
    """-|characters - target| (notebook 003's `has_length`)."""
    return np.array([-abs(len(t) - target) for t in texts], np.float32)


@functools.cache
def _vader():
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError as error:
        raise ImportError("the sentiment reward needs vaderSentiment: "
                          "`pip install vaderSentiment` (or `make venv`)") from error
    return SentimentIntensityAnalyzer()


def sentiment(texts: Sequence[str]) -> np.ndarray:
    """VADER's compound polarity in [-1, 1] (Hutto & Gilbert 2014): an offline, lexicon-based
    stand-in for notebook 002's emotion classifier."""
    analyzer = _vader()
    return np.array([analyzer.polarity_scores(t)["compound"] for t in texts], np.float32)


def text_reward_fn(tokenizer, reward: TextReward, skip_ids: Sequence[int] = ()):
    """A `prompt_rl.RewardFn` from a text reward: responses are decoded without `skip_ids`
    (stop / EOS tokens) and special tokens."""
    skip = set(skip_ids)

    def reward_fn(prompts: list[list[int]], responses: list[list[int]]) -> np.ndarray:
        del prompts
        texts = tokenizer.batch_decode([[t for t in r if t not in skip] for r in responses],
                                       skip_special_tokens=True)
        return reward(texts)

    reward_fn.__name__ = getattr(reward, "__name__", getattr(getattr(reward, "func", None),
                                                             "__name__", "reward"))
    return reward_fn


def embedding_similarity(encoder, target: str) -> TextReward:
    """Cosine similarity of each text's sentence embedding to `target`'s (in [-1, 1]).

    Notebook 003 rewards minus the Euclidean distance of BERT mean-pooled embeddings; with
    unit-norm embeddings the two rank texts identically (|a - b|^2 = 2 - 2 cos), and the cosine
    has a fixed scale.
    """
    anchor = encoder([target])[0]

    def similarity(texts: list[str]) -> np.ndarray:
        return (encoder(texts) @ anchor).astype(np.float32)

    return similarity
