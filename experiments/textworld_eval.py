"""Evaluate TextWorld policies on held-out test games, at every step limit, in one table.

    python -m experiments.textworld_eval --policies random gold --games 100
    python -m experiments.textworld_eval --policies zero-shot sft --modes score generate \\
        --games 16 --run-dir runs/textworld_ppo

Policies: `random` (uniform valid action), `gold` (the expert path, cut by the step limit),
`zero-shot` (the base model with fresh, zero-effect adapters), `sft` (the SFT adapters of
`--run-dir`, as written by `experiments.textworld_ppo`). Model policies act greedily (or sample
from pi, `--sample`), in each of `--modes`. Test seeds 0..games-1; results also go to
`<run-dir>/eval_table.json`. Finished games are kept in `<run-dir>/eval/`, one record per
policy and mode: rerun the same command after a kill and only the games not yet played are
played.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

import jax
import numpy as np
from flax import nnx

from experiments.textworld_ppo import Config, checkpointer, evaluate, load_policy, print_table
from jaxrl_llm.agent import BASELINES, play_baseline
from jaxrl_llm.evaluation import evaluate_policy
from jaxrl_llm.checkpoint import policy_identity
from jaxrl_llm.sharding import MeshConfig, make_mesh, shard_model

POLICIES = BASELINES + ("zero-shot", "sft")


def evaluate_baseline(policy: str, config: Config, record_dir: str | None = None) -> dict:
    play_chunk = lambda games, seeds, on_step: play_baseline(
        games, seeds, "test", policy, np.random.default_rng(seeds[0]), on_step)
    return evaluate_policy(play_chunk, config.eval_games, config.num_envs,
                           config.eval_step_limits, workers=config.env_workers, label=policy,
                           record_dir=record_dir, settings=dict(policy=policy))


def run_config(run_dir: str | None) -> Config:
    """The configuration of an existing run (its config.json), else the cpu preset."""
    if run_dir is None:
        return Config.preset("cpu")
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: --run-dir must be a directory written by "
                                "python -m experiments.textworld_ppo")
    with open(path) as f:
        saved = json.load(f)
    saved = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()}
    return Config(**saved)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--policies", nargs="+", default=["random", "gold"], choices=POLICIES)
    parser.add_argument("--modes", nargs="+", default=["score"], choices=["score", "generate"])
    parser.add_argument("--games", type=int, default=100, help="test seeds 0..N-1")
    parser.add_argument("--step-limits", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--run-dir", default=None, help="a textworld_ppo run (for sft)")
    parser.add_argument("--num-envs", type=int, default=None,
                        help="games in lockstep, a divisor of --games (default: the largest "
                             "divisor up to the run's --num-envs)")
    parser.add_argument("--sample", action="store_true",
                        help="model policies sample from pi (the run's --temperature) instead "
                             "of taking its argmax")
    args = parser.parse_args(argv)
    if args.games < 1 or (args.num_envs is not None and args.num_envs < 1):
        parser.error("--games and --num-envs must be >= 1")
    if args.num_envs is not None and args.games % args.num_envs:
        parser.error(f"--num-envs ({args.num_envs}) must divide --games ({args.games})")
    if not args.step_limits or min(args.step_limits) < 1:
        parser.error(f"--step-limits must be limits >= 1, got {args.step_limits}")
    saved = run_config(args.run_dir)
    num_envs = args.num_envs
    if num_envs is None:
        num_envs = max(d for d in range(1, min(args.games, saved.num_envs) + 1)
                       if args.games % d == 0)
    config = dataclasses.replace(saved, eval_games=args.games, num_envs=num_envs,
                                 eval_step_limits=tuple(args.step_limits),
                                 eval_sample=args.sample)
    out_dir = args.run_dir or "runs/textworld_eval"
    # Finished games are kept per policy and mode: a rerun after a kill plays only the rest.
    config = dataclasses.replace(config, run_dir=out_dir)
    if "sft" in args.policies:
        if not args.run_dir or checkpointer(config, "sft").record() is None:
            raise ValueError("--policies sft needs --run-dir with SFT checkpoints (run python -m "
                             "experiments.textworld_ppo first)")
    results, mesh, model = {}, make_mesh(MeshConfig(*config.mesh)), None
    for policy in args.policies:
        if policy in BASELINES:
            results[policy] = evaluate_baseline(policy, config, os.path.join(out_dir, "eval"))
            continue
        if model is None:
            model, tokenizer = load_policy(config)
            shard_model(model, mesh)
        policy_model = model
        if policy == "sft":  # a copy: the zero-shot policy keeps the fresh adapters
            policy_model = nnx.clone(model)
            checkpointer(config, "sft").load_adapters(policy_model)
        identity = policy_identity(policy_model)
        for mode in args.modes:
            results[f"{policy} ({mode})"] = evaluate(
                policy_model, tokenizer, dataclasses.replace(config, agent_mode=mode),
                jax.random.key(config.seed), policy, mesh, policy=identity)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "eval_table.json"), "w") as f:
        json.dump(results, f, indent=2)
    print_table(results, config.eval_step_limits)
    return results


if __name__ == "__main__":
    main()
