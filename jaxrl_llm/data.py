"""Expert (gold path) SFT data for TextWorld: one row per step, cached on disk as a Dataset.

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
from tqdm.auto import tqdm

from jaxrl_llm import text
from jaxrl_llm.envs.textworld import (GameConfig, TextWorldBatch, build_prompt, prompt_pieces,
                                      step_tail)

logger = logging.getLogger(__name__)
EXPERT_STEP_LIMIT = 64


def expert_dataset(game: GameConfig, seeds: Sequence[int], fold: str, tokenizer,
                   max_history: int | None, cache_dir: str | None = None,
                   progress: bool = True) -> datasets.Dataset:
    """Rows: prompt (text), action, prompt_ids, action_ids, seed, step, reward, done.

    `prompt_ids` / `action_ids` are tokenized exactly as `agent.play` feeds the model (pieces,
    trailing space moved to the action, EOS appended to the action). Cached under `cache_dir`
    by a key of everything that changes the rows.
    """
    game = dataclasses.replace(game, step_limit=EXPERT_STEP_LIMIT)
    key = json.dumps([dataclasses.asdict(game), list(map(int, seeds)), fold, max_history,
                      tokenizer.name_or_path if hasattr(tokenizer, "name_or_path") else "",
                      len(tokenizer)], sort_keys=True)
    path = None
    if cache_dir:
        path = os.path.join(cache_dir, "expert-" + hashlib.sha1(key.encode()).hexdigest()[:16])
        if os.path.isdir(path):
            return datasets.load_from_disk(path)
    rows, rejected = [], 0
    with TextWorldBatch(game, 1) as batch:
        for seed in tqdm(seeds, desc=f"gold paths ({fold})", disable=not progress):
            (episode,) = batch.reset([int(seed)], fold, gold=True)
            gold = batch.gold_actions(0)
            for action in gold:
                if episode.done:
                    break
                rejected += action not in episode.valid_actions
                pieces = prompt_pieces(episode, max_history)
                tail = step_tail(episode.valid_actions)
                rows.append(dict(
                    prompt=build_prompt(episode, max_history), action=action,
                    prompt_ids=text.encode_prompt(tokenizer, pieces, tail),
                    action_ids=text.encode_action(tokenizer, tail, action),
                    seed=int(seed), step=episode.num_steps))
                (episode,) = batch.step([action])
                rows[-1].update(reward=episode.rewards[-1], done=episode.done)
    if rejected:
        logger.warning("%d of %d gold actions were not in the valid-action list (kept)",
                       rejected, len(rows))
    dataset = datasets.Dataset.from_list(rows)
    if path:
        dataset.save_to_disk(path)
    return dataset
