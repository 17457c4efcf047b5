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
                    cache_dir: str | None = None, progress: bool = True,
                    noise: float = 0.0, noise_seed: int = 0) -> datasets.Dataset:
    """One row per game: seed, task, observations `[S + 1]`, actions `[S]`, valid_actions `[S]`
    and inventories `[S]` (of each step's state), trained `[S]` (the action is the expert's: a label
    to learn), rewards `[S]`, success, done (the episode ended within the path).

    `noise=0` keeps the gold path. With `noise=p` (DART, Laskey et al. 2017) each step takes,
    with probability p, another valid action (`trained=False`) from which the expert recovers
    (`recovery_plan`): the data then shows the off-path states a learned policy reaches and how
    to get back, not only the states of a perfect player. Draws come from `(noise_seed, seed)`.
    """
    if not 0.0 <= noise < 1.0:
        raise ValueError(f"noise must be in [0, 1), got {noise}")
    game = dataclasses.replace(game, step_limit=EXPERT_STEP_LIMIT)
    path = _cache_path(cache_dir, "episodes", [dataclasses.asdict(game), list(map(int, seeds)),
                                               fold, noise, noise_seed, "trained", "inventory"])
    if path and os.path.isdir(path):
        return datasets.load_from_disk(path)
    rows, rejected, steps = [], 0, 0
    with TextWorldBatch(game, 1) as batch, TextWorldBatch(game, 1) as replay:
        for seed in tqdm(seeds, desc=f"expert paths ({fold})", disable=not progress):
            (episode,) = batch.reset([int(seed)], fold, gold=True)
            plan = batch.gold_actions(0)
            rng = np.random.default_rng((noise_seed, int(seed)))
            valid, inventories, trained = [], [], []
            while plan and not episode.done:
                valid.append(list(episode.valid_actions))
                inventories.append(episode.inventory)
                detour = _detour(replay, episode, plan, rng) if rng.random() < noise else None
                if detour:
                    (episode,) = batch.step([detour[0]])
                    plan = detour[1]
                else:
                    rejected += plan[0] not in episode.valid_actions
                    (episode,) = batch.step([plan.pop(0)])
                trained.append(detour is None)
            steps += len(valid)
            rows.append(dict(seed=int(seed), task=episode.task,
                             observations=episode.observations, actions=episode.actions,
                             valid_actions=valid, inventories=inventories, trained=trained,
                             rewards=episode.rewards,
                             success=episode.success, done=episode.done))
    if rejected:
        logger.warning("%d of %d expert actions were not in the valid-action list (kept)",
                       rejected, steps)
    dataset = datasets.Dataset.from_list(rows)
    if path:
        dataset.save_to_disk(path)
    return dataset


def _detour(replay: TextWorldBatch, episode: Episode, plan: list[str],
            rng: np.random.Generator, tries: int = 3) -> tuple[str, list[str]] | None:
    """(a random non-expert action, the expert's plan after it), or None when none of `tries`
    draws leaves the game winnable by a `recovery_plan` (e.g. eating an ingredient)."""
    others = [a for a in episode.valid_actions if a != plan[0]]
    for i in rng.permutation(len(others))[:tries]:
        recovery = recovery_plan(replay, episode, others[i], plan)
        if recovery is not None:
            return others[i], recovery
    return None


def recovery_plan(replay: TextWorldBatch, episode: Episode, action: str,
                  plan: list[str]) -> list[str] | None:
    """The expert's actions after `episode` takes `action` instead of `plan[0]`, or None.

    Candidates, first that wins the game: the plan unchanged (the action did no harm), one
    action and then the plan (undo first: `move west` after `move east`, `close` after
    `open`), the plan without its first action (the action did its job). Each is checked by
    replaying the game from its seed in `replay`.
    """
    history = episode.actions + [action]
    undo = _undo(action)
    firsts = sorted(set(episode.valid_actions) - {action}, key=lambda a: (a != undo, a))
    for candidate in [plan] + [[a] + plan for a in firsts] + [plan[1:]]:
        (replayed,) = replay.reset([episode.seed], episode.fold)
        for past in history + candidate:
            (replayed,) = replay.step([past])
            if replayed.done:
                break
        if replayed.success:
            return candidate
    return None


def _undo(action: str) -> str:
    """The action that reverses `action` where the game has one ("" if none is known)."""
    moves = dict(north="south", south="north", east="west", west="east")
    verb, _, rest = action.partition(" ")
    if verb == "move" and rest in moves:
        return f"move {moves[rest]}"
    reverse = dict(open="close", close="open", take="drop").get(verb)
    return f"{reverse} {rest}" if reverse else ""


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
    tails, leaves, gold, steps = [], [], [], []
    for step, (valid, action, trained) in enumerate(zip(row["valid_actions"], row["actions"],
                                                         row["trained"])):
        if not trained:
            continue
        steps.append(step)
        tail = step_tail(_state(row, step), style)
        options = valid if candidates else [action]
        if negatives is not None:
            others = [a for a in valid if a != action]
            picked = rng.choice(len(others), min(negatives, len(others)), replace=False)
            options = [action] + [others[i] for i in sorted(picked)]
        tails.append(text.encode_tail(tokenizer, tail))
        leaves.append([text.encode_action(tokenizer, tail, a) for a in options])
        gold.append(options.index(action) if action in options else -1)
    if not steps:
        raise ValueError(f"game {row['seed']} has no expert action to learn from")
    if max_history is None:
        # A step that is not learned from has no branch: its history joins the next step's.
        pieces = [[INSTRUCTION.format(row["task"]),
                   OBSERVATION_BLOCK.format(0, row["observations"][0])]]
        pieces += [[ACTION_SUFFIX.format(action), OBSERVATION_BLOCK.format(s + 1, observation)]
                   for s, (action, observation) in enumerate(zip(row["actions"][:steps[-1]],
                                                                 row["observations"][1:]))]
        starts = [0] + [s + 1 for s in steps[:-1]]
        trunk = [text.encode_pieces(tokenizer, sum(pieces[start:end + 1], []))
                 for start, end in zip(starts, steps)]
        return [pack_episode(trunk, tails, leaves)], gold
    packed = []
    for step, tail, step_leaves in zip(steps, tails, leaves):
        prompt = text.encode_pieces(tokenizer, prompt_pieces(_state(row, step), max_history))
        packed.append(pack_episode([prompt], [tail], [step_leaves]))
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
            if not episode["trained"][s]:
                continue
            state = _state(episode, s)
            pieces = prompt_pieces(state, max_history)
            tail = step_tail(state)
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
                   valid_actions=row["valid_actions"][step], inventory=row["inventories"][step])
