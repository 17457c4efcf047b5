"""Evaluation of a policy on held-out games: resumable JSON-lines records and summaries.

`evaluate_policy` plays test seeds in chunks of games in lockstep (any `agent.play` or
`agent.play_baseline` bound to a policy), keeps each finished chunk in a record, and summarizes
success with a 95% Wilson interval, normalized score, steps, invalid, failure and
missed-ingredient rates at every step limit from one play at the largest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from jaxrl_llm.agent import LEARNER_FIELDS, Transition
from jaxrl_llm.envs.textworld import Episode, GameConfig, TextWorldBatch, missed_ingredient
from jaxrl_llm.generation import compile_count

PlayChunk = Callable[[TextWorldBatch, list[int], Callable[[list[Episode]], None]],
                     tuple[list[Episode], list[Transition]]]


def evaluate_policy(play_chunk: PlayChunk, num_games: int, num_envs: int, step_limits, *,
                    workers: int = 1, label: str = "eval", record_dir: str | None = None,
                    settings: dict | None = None) -> dict[str, dict[str, float]]:
    """Play test seeds 0..num_games-1, `num_envs` in lockstep, and summarize at every limit.

    One play at the largest limit, cut to the smaller ones (the policy never sees the limit).
    `play_chunk(games, seeds, on_step)` plays one episode per seed (`play` or `play_baseline`
    on the "test" fold, bound to a policy) and calls `on_step` after each lockstep step.

    With `record_dir`, each finished chunk of games is appended to a record there
    (`eval_record_path`) and the chunks found in it are not played again, so a killed
    evaluation resumes where it stopped (a chunk's games are deterministic under a fixed key).
    `settings` (JSON-able: what identifies the policy and how it acts) names the record: other
    settings (e.g. a newer checkpoint) start a record of their own.
    """
    if num_games < 1 or num_envs < 1 or num_games % num_envs:
        raise ValueError(f"evaluation needs num_games ({num_games}) to be a positive multiple "
                         f"of the games in lockstep ({num_envs})")
    limit = max(step_limits)
    header = dict(label=label.lower(), settings=settings or {}, num_envs=num_envs,
                  step_limit=limit)
    record = eval_record_path(record_dir, header) if record_dir else None
    if record:  # a directory that cannot be made fails here, before any game is played
        os.makedirs(record_dir, exist_ok=True)
    chunks = read_eval_record(record, header) if record else {}
    starts = range(0, num_games, num_envs)
    todo = [start for start in starts if start not in chunks]
    with TextWorldBatch(GameConfig(step_limit=limit), num_envs, workers=workers) as games, \
            tqdm(total=num_games * limit, initial=(len(starts) - len(todo)) * num_envs * limit,
                 desc=f"{label} limit {limit}", unit="step") as bar:
        def on_step(_):
            # Programs compiled by play so far: it should stop growing after the first steps.
            bar.set_postfix(programs=compile_count(), refresh=False)
            bar.update(num_envs)

        for start in todo:
            chunks[start] = play_chunk(games, list(range(start, start + num_envs)), on_step)
            if record:
                _append_chunk(record, header, start, *chunks[start])
    episodes = [e for start in starts for e in chunks[start][0]]
    transitions = [t for start in starts for t in chunks[start][1]]
    return summarize_limits(episodes, transitions, step_limits)


def eval_record_path(directory: str, header: dict) -> str:
    """`<directory>/<label>-<digest of header>.jsonl`: one record per policy and settings."""
    digest = hashlib.sha256(_canonical(header).encode()).hexdigest()[:10]
    return os.path.join(directory, f"{re.sub(r'[^a-z0-9]+', '_', header['label'])}-{digest}.jsonl")


def _canonical(value) -> str:
    # JSON text: tuples and lists, NaN and NaN compare equal.
    return json.dumps(value, sort_keys=True)


def read_eval_record(path: str, header: dict) -> dict[int, tuple[list[Episode], list[Transition]]]:
    """The chunks of games saved in an evaluation record: first seed -> (episodes, transitions).

    A line cut short by a kill is dropped (and cut from the file, so appending resumes cleanly).
    Transitions come back without their token ids (the record keeps what the summaries and a
    reader need: step, action, validity, log-prob, reward, flags, choice).
    """
    if not os.path.exists(path):
        return {}
    with open(path, "rb") as f:
        data = f.read()
    good = data[:data.rfind(b"\n") + 1]
    if len(good) < len(data):
        with open(path, "r+b") as f:
            f.truncate(len(good))
    try:
        lines = [json.loads(line) for line in good.splitlines()]
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not an evaluation record ({error}): delete it to start "
                         "over") from error
    if lines and _canonical(lines[0]) != _canonical({"header": header}):
        raise ValueError(f"{path} records an evaluation with other settings than its name says: "
                         "delete it to start over")
    return {line["start"]: ([Episode(**e) for e in line["episodes"]],
                            [Transition(**t) for t in line["transitions"]])
            for line in lines[1:]}


def summarize_record(path: str, step_limits=None) -> dict[str, dict[str, float]]:
    """`summarize_limits` of every game in an evaluation record (default limits: 16 and the
    record's own), e.g. to recompute a results table from committed records."""
    with open(path) as f:
        header = json.loads(f.readline())["header"]
    chunks = read_eval_record(path, header)
    episodes = [e for start in sorted(chunks) for e in chunks[start][0]]
    transitions = [t for start in sorted(chunks) for t in chunks[start][1]]
    limits = step_limits or sorted({16, header["step_limit"]})
    return summarize_limits(episodes, transitions, [n for n in limits if n <= header["step_limit"]])


def _append_chunk(path: str, header: dict, start: int, episodes, transitions) -> None:
    # A kill before the first chunk's write leaves no file, or (cut by `read_eval_record`) an
    # empty one: either way the header comes first.
    lines = [] if os.path.exists(path) and os.path.getsize(path) else [{"header": header}]
    drop = set(LEARNER_FIELDS)
    lines.append(dict(start=start, episodes=[dataclasses.asdict(e) for e in episodes],
                      transitions=[{k: v for k, v in dataclasses.asdict(t).items()
                                    if k not in drop} for t in transitions]))
    try:
        with open(path, "a") as f:
            f.write("".join(json.dumps(line) + "\n" for line in lines))
            f.flush()
            os.fsync(f.fileno())
    except OSError as error:  # a line cut short by it is dropped when the record is read
        raise OSError(f"could not write the evaluation record {path} ({error}); the games "
                      "recorded before are kept: free disk space, then rerun to resume") from error


def summarize(episodes: list[Episode], transitions: list[Transition]) -> dict[str, float]:
    """Success rate with a 95% Wilson interval, normalized score, steps, invalid rate, and why
    the other games did not succeed: lost (the game ended in failure, e.g. food cooked the
    wrong way or eaten) or out of steps while an ingredient was missing (`missed_ingredient`);
    the rest ran out of steps holding every ingredient."""
    n = len(episodes)
    successes = sum(e.success for e in episodes)
    low, high = wilson_interval(successes, n)
    return dict(
        games=n, success_rate=successes / n, success_low=low, success_high=high,
        mean_score=float(np.mean([e.score for e in episodes])),
        mean_steps=float(np.mean([e.num_steps for e in episodes])),
        invalid_rate=float(np.mean([not t.valid for t in transitions])) if transitions else 0.0,
        failure_rate=sum(e.failure for e in episodes) / n,
        missed_ingredient_rate=sum(map(missed_ingredient, episodes)) / n)


def summarize_limits(episodes: list[Episode], transitions: list[Transition],
                     step_limits) -> dict[str, dict[str, float]]:
    """`summarize` at each step limit (key `limit_N`), from one play at the largest of them."""
    return {f"limit_{n}": summarize([e.cut(n) for e in episodes],
                                    [t for t in transitions if t.step < n])
            for n in step_limits}


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (sensible at 0 and n successes)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, center - half), min(1.0, center + half)
