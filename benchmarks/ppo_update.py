"""PPO update cost per game: every valid action as a candidate vs the sampling policy's top k.

    python -m benchmarks.ppo_update                    # 4 train games, 16 steps, top 4
    python -m benchmarks.ppo_update --games 2 --steps 8 --top-k 2 8

The default SmolLM2 model as the main job trains it (int8 base, LoRA r=8 on the top 16 layers,
value head, `locate` prompts, whole history) samples the games once in score mode; then, on
those same transitions, each variant builds the update's packed games (`prepare_rollout`,
which scores them with the frozen reference) and runs one PPO epoch over them (minibatches of
2 games, remat), as an iteration of the main job does. Each stage runs once untimed (the reference on all
games, the update on its first minibatch: compilation), then timed over all of them. Reported per variant:
packed tokens per game, candidates per step, the kept share of pi, seconds per game for the
reference and the update, and the ratio to every candidate.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time

import jax
import numpy as np
from flax import nnx

from jaxrl_llm.agent import AgentConfig, play
from jaxrl_llm.envs.textworld import GameConfig, TextWorldBatch
from jaxrl_llm.model import load_model
from jaxrl_llm.model.lora import LoraConfig, apply_lora
from jaxrl_llm.model.value_head import ActorCritic
from jaxrl_llm.packing import packed_scorer
from jaxrl_llm.train.ppo import PPOConfig, minibatches, ppo_loss, prepare_rollout
from jaxrl_llm.train.step import OptimConfig, Trainer, make_optimizer


def timed_after_warmup(work, items) -> float:
    """Seconds for `work` over all `items`, after one untimed call on the first (compiles)."""
    work(items[0])
    start = time.time()
    for item in items:
        work(item)
    return time.time() - start


def measure(policy: ActorCritic, transitions, config: PPOConfig, pad_id: int) -> dict:
    reference = packed_scorer(policy.lm)
    prepare = lambda ts: prepare_rollout(ts, True, reference, config, 8192, pad_id)
    games = len({t.game for t in transitions})
    prepare(transitions)  # compiles
    start = time.time()
    rollout, stats = prepare(transitions)
    reference_seconds = time.time() - start
    trainer = Trainer(policy, make_optimizer(OptimConfig(learning_rate=1e-5, weight_decay=0.0)),
                      functools.partial(ppo_loss, config=config, remat=True))
    state = [trainer.init()]  # each step donates its input state: carry the new one

    def update(batch):
        state[0], metrics = trainer.step(state[0], batch)
        jax.block_until_ready(metrics)

    update_seconds = timed_after_warmup(
        update, list(minibatches(rollout, config, jax.random.key(0), pad_id)))
    return dict(tokens=np.mean([e.num_tokens for e in rollout.episodes]),
                candidates=stats["candidates"], kept_mass=stats["kept_mass"],
                reference=reference_seconds / games, update=update_seconds / games)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--games", type=int, default=4)
    parser.add_argument("--steps", type=int, default=16, help="step limit of each game")
    parser.add_argument("--top-k", type=int, nargs="+", default=[4],
                        help="candidates kept per step in the variants (besides all of them)")
    args = parser.parse_args()
    if args.games < 1 or args.steps < 1 or min(args.top_k) < 1:
        parser.error("--games, --steps and every --top-k must be >= 1")
    _, model, tokenizer = load_model(quantize="int8")
    apply_lora(model, LoraConfig.top_layers(16, model.config.num_layers, rank=8, alpha=32),
               nnx.Rngs(0))
    policy = ActorCritic(model)
    agent = AgentConfig(mode="score", greedy=False, prompt_style="locate", max_history=None,
                        cache_len=8192)
    with TextWorldBatch(GameConfig(step_limit=args.steps), args.games) as games:
        _, transitions = play(model, tokenizer, games, list(range(args.games)), "train",
                              jax.random.key(0), agent, value_head=policy.value_head)
    config = PPOConfig(minibatch_size=2, micro_batch_size=1, learning_rate=1e-5)
    print(f"{len(transitions)} transitions of {args.games} train games (limit {args.steps})")
    print(f"{'candidates kept':<16} {'tokens/game':>11} {'cand/step':>9} {'kept pi':>8} "
          f"{'ref s/game':>10} {'update s/game':>13} {'vs all':>7}", flush=True)
    baseline = None
    for k in [0, *args.top_k]:
        r = measure(policy, transitions, dataclasses.replace(config, top_k=k),
                    tokenizer.eos_token_id)
        total = r["reference"] + r["update"]
        baseline = baseline or total
        print(f"{'all' if k == 0 else f'top {k}':<16} {r['tokens']:>11.0f} "
              f"{r['candidates']:>9.1f} {r['kept_mass']:>8.4f} {r['reference']:>10.1f} "
              f"{r['update']:>13.1f} {baseline / total:>6.2f}x", flush=True)


if __name__ == "__main__":
    main()
