"""Host side: JVM memory and env-steps/s of N TextWorld games, serial vs a thread pool.

    python -m benchmarks.games                       # N = 8, 32, 128; workers 1 vs 16
    python -m benchmarks.games --games 8 --workers 1 4

Each game is its own JVM (py4j). Per (N, workers): engine start-up time, total RSS of the JVMs,
reset time, and env-steps/s over `--steps` lockstep steps of random valid actions (episodes
that end stay ended: steps/s counts only real steps). Ratios are against workers=1 at the same N.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import psutil

from jaxrl_llm.envs.textworld import GameConfig, TextWorldBatch


def measure(num_games: int, workers: int, steps: int) -> dict:
    rng = np.random.default_rng(0)
    start = time.time()
    with TextWorldBatch(GameConfig(step_limit=steps), num_games, workers=workers) as games:
        startup = time.time() - start
        jvm_rss = sum(p.memory_info().rss for p in psutil.Process().children(recursive=True))
        start = time.time()
        episodes = games.reset(list(range(num_games)), "train")
        reset = time.time() - start
        taken, start = 0, time.time()
        for _ in range(steps):
            live = sum(not e.done for e in episodes)
            if not live:
                break
            episodes = games.step([rng.choice(e.valid_actions) for e in episodes])
            taken += live
        step_seconds = time.time() - start
    return dict(startup_s=startup, jvm_rss_gb=jvm_rss / 2 ** 30, reset_s=reset,
                steps_per_s=taken / step_seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--games", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    print(f"{'games':>6}{'workers':>8}{'start s':>9}{'JVM RSS GB':>12}{'reset s':>9}"
          f"{'env-steps/s':>13}{'vs 1 worker':>13}")
    for n in args.games:
        serial = None
        for workers in args.workers:
            r = measure(n, workers, args.steps)
            serial = serial or r["steps_per_s"]
            print(f"{n:>6}{workers:>8}{r['startup_s']:>9.1f}{r['jvm_rss_gb']:>12.2f}"
                  f"{r['reset_s']:>9.2f}{r['steps_per_s']:>13.0f}"
                  f"{r['steps_per_s'] / serial:>12.2f}x", flush=True)


if __name__ == "__main__":
    main()
