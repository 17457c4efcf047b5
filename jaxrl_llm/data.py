"""Expert (gold path) SFT data for TextWorld, cached on disk as Datasets.

`expert_episodes` keeps one row per game (its text, step by step) and `encode_episode` turns a
row into packed episodes (`jaxrl_llm.packing`) with the ids `agent.play` feeds; `expert_dataset`
keeps one row per step with its whole prompt.

Gold paths are replayed with a step limit of `EXPERT_STEP_LIMIT`, whatever limit the agent will
play with: at the notebook's limit of 16 most gold paths are cut before the meal is eaten, and the
data would never show the end of the task. Gold paths occasionally contain an action the game
rejects (~1%); such steps are kept (the expert did take them) and counted in the log.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Sequence

import datasets
import numpy as np
from tqdm.auto import tqdm

from jaxrl_llm import text
from jaxrl_llm.envs.textworld import (ACTION_SUFFIX, INSTRUCTION, OBSERVATION_BLOCK, Episode,
                                      GameConfig, TextWorldBatch, build_prompt, check_style,
                                      prompt_pieces, step_tail)
from jaxrl_llm.packing import PackedEpisode, pack_episode

logger = logging.getLogger(__name__)
EXPERT_STEP_LIMIT = 64


def _cache_path(cache_dir: str | None, kind: str, key) -> str | None:
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(cache_dir, f"{kind}-{digest}") if cache_dir else None


def expert_episodes(game: GameConfig, seeds: Sequence[int], fold: str,
                    cache_dir: str | None = None, progress: bool = True) -> datasets.Dataset:
    """One row per game: seed, task, observations `[S + 1]`, actions `[S]` (the gold path),
    valid_actions `[S]` (the valid actions of each step's state), rewards `[S]`, success, done
    (the episode ended within the gold path)."""
    game = dataclasses.replace(game, step_limit=EXPERT_STEP_LIMIT)
    path = _cache_path(cache_dir, "episodes",
                       [dataclasses.asdict(game), list(map(int, seeds)), fold])
    if path and os.path.isdir(path):
        return datasets.load_from_disk(path)
    rows, rejected, steps = [], 0, 0
    with TextWorldBatch(game, 1) as batch:
        for seed in tqdm(seeds, desc=f"gold paths ({fold})", disable=not progress):
            (episode,) = batch.reset([int(seed)], fold, gold=True)
            valid = []
            for action in batch.gold_actions(0):
                if episode.done:
                    break
                rejected += action not in episode.valid_actions
                valid.append(list(episode.valid_actions))
                (episode,) = batch.step([action])
            steps += len(valid)
            rows.append(dict(seed=int(seed), task=episode.task,
                             observations=episode.observations, actions=episode.actions,
                             valid_actions=valid, rewards=episode.rewards,
                             success=episode.success, done=episode.done))
    if rejected:
        logger.warning("%d of %d gold actions were not in the valid-action list (kept)",
                       rejected, steps)
    dataset = datasets.Dataset.from_list(rows)
    if path:
        dataset.save_to_disk(path)
    return dataset


def encode_episode(tokenizer, row: dict, style: str = "compact",
                   max_history: int | None = None, candidates: bool = False,
                   negatives: int | None = None, rng: np.random.Generator | None = None
                   ) -> tuple[list[PackedEpisode], list[int]]:
    """A row of `expert_episodes` as packed episodes and each step's gold candidate index.

    With the whole history (`max_history=None`) the game is one packed episode; with a sliding
    window of k steps each step is a one-step episode of its own prompt (the window changes
    the history, so it cannot be shared). Leaves are the gold action (`candidates=False`, for
    SFT) or every valid action (for the action-level policy); the gold index is -1 where the
    gold action is not among the valid ones (the expert data is not perfectly clean). With
    `negatives=k` (and `candidates`), a step's leaves are the gold action (index 0) and k other
    valid actions drawn by `rng` (all of them if fewer): a sampled choice among fewer tokens.
    """
    check_style(style)
    if negatives is not None and (not candidates or negatives < 0 or rng is None):
        raise ValueError(f"negatives={negatives} needs candidates=True, a count >= 0 and an rng")
    tails, leaves, gold = [], [], []
    for valid, action in zip(row["valid_actions"], row["actions"]):
        tail = step_tail(valid, style)
        options = valid if candidates else [action]
        if negatives is not None:
            others = [a for a in valid if a != action]
            picked = rng.choice(len(others), min(negatives, len(others)), replace=False)
            options = [action] + [others[i] for i in sorted(picked)]
        tails.append(text.encode_tail(tokenizer, tail))
        leaves.append([text.encode_action(tokenizer, tail, a) for a in options])
        gold.append(options.index(action) if action in options else -1)
    if max_history is None:
        trunk = [text.encode_pieces(tokenizer, [INSTRUCTION.format(row["task"]),
                                                OBSERVATION_BLOCK.format(0, row["observations"][0])])]
        trunk += [text.encode_pieces(tokenizer, [ACTION_SUFFIX.format(action),
                                                 OBSERVATION_BLOCK.format(s + 1, observation)])
                  for s, (action, observation) in enumerate(zip(row["actions"][:-1],
                                                                row["observations"][1:]))]
        return [pack_episode(trunk, tails, leaves)], gold
    packed = []
    for s in range(len(tails)):
        prompt = text.encode_pieces(tokenizer, prompt_pieces(_state(row, s), max_history))
        packed.append(pack_episode([prompt], [tails[s]], [leaves[s]]))
    return packed, gold


def expert_dataset(game: GameConfig, seeds: Sequence[int], fold: str, tokenizer,
                   max_history: int | None, cache_dir: str | None = None,
                   progress: bool = True) -> datasets.Dataset:
    """Rows: prompt (text), action, prompt_ids, action_ids, seed, step, reward, done.

    `prompt_ids` / `action_ids` are tokenized exactly as `agent.play` feeds the model (pieces,
    trailing space moved to the action, EOS appended to the action). Cached under `cache_dir`
    by a key of everything that changes the rows.
    """
    path = _cache_path(cache_dir, "expert", [
        dataclasses.asdict(game), list(map(int, seeds)), fold, max_history,
        tokenizer.name_or_path if hasattr(tokenizer, "name_or_path") else "", len(tokenizer)])
    if path and os.path.isdir(path):
        return datasets.load_from_disk(path)
    rows = []
    # The per-step rows are what is cached: the games they come from need no cache of their own.
    for episode in expert_episodes(game, seeds, fold, progress=progress):
        last = len(episode["actions"]) - 1
        for s, action in enumerate(episode["actions"]):
            state = _state(episode, s)
            pieces = prompt_pieces(state, max_history)
            tail = step_tail(state.valid_actions)
            rows.append(dict(
                prompt=build_prompt(state, max_history), action=action,
                prompt_ids=text.encode_prompt(tokenizer, pieces, tail),
                action_ids=text.encode_action(tokenizer, tail, action),
                seed=episode["seed"], step=s, reward=episode["rewards"][s],
                done=episode["done"] and s == last))
    dataset = datasets.Dataset.from_list(rows)
    if path:
        dataset.save_to_disk(path)
    return dataset


def _state(row: dict, step: int) -> Episode:
    """The state of an `expert_episodes` row before its action `step`."""
    return Episode(seed=row["seed"], fold="", task=row["task"],
                   observations=row["observations"][:step + 1], actions=row["actions"][:step],
                   valid_actions=row["valid_actions"][step])
