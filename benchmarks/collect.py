"""PPO collection env-steps/s: our batched agent vs a notebook-000-style loop, same model, same run.

    python -m benchmarks.collect                  # 8 games, 6 steps each
    python -m benchmarks.collect --games 4 --steps 4

Both sides play the same train games by sampling free-text actions (generate mode) with the
default SmolLM2 model (int8 base + LoRA + value head):
  * ours: the games in lockstep, one jitted call per step for the whole batch, each game's history
    kept in the KV cache (only new text prefilled), V(s) read from the sampler's hidden state;
  * notebook style: one game at a time (batch 1), the prompt rebuilt, re-tokenized and
    re-prefilled every step, then two extra forwards per transition (log-prob of the action and
    the value), as notebook 000's collection loop does.
A short warm-up run (compilation) precedes each timed run.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
from flax import nnx

from jaxrl_llm import text
from jaxrl_llm.agent import AgentConfig, play
from jaxrl_llm.envs.textworld import GameConfig, TextWorldBatch, build_prompt
from jaxrl_llm.generation import generate
from jaxrl_llm.logprobs import score_responses
from jaxrl_llm.model import load_model
from jaxrl_llm.model.lora import LoraConfig, apply_lora
from jaxrl_llm.model.value_head import ActorCritic
from jaxrl_llm.padding import pad_left, pad_right
from jaxrl_llm.sampling import SamplingConfig


def ours(policy: ActorCritic, tokenizer, seeds, steps: int, key) -> tuple[int, float]:
    config = AgentConfig(mode="generate", greedy=False, max_history=None)
    with TextWorldBatch(GameConfig(step_limit=steps), len(seeds)) as games:
        start = time.time()
        _, transitions = play(policy.lm, tokenizer, games, seeds, "train", key, config,
                              value_head=policy.value_head)
        return len(transitions), time.time() - start


def notebook_style(policy: ActorCritic, tokenizer, seeds, steps: int, key) -> tuple[int, float]:
    stop = (tokenizer.eos_token_id, text.encode(tokenizer, "\n")[-1])
    sampling = SamplingConfig(12, eos_ids=stop, pad_id=tokenizer.eos_token_id)
    taken, start = 0, time.time()
    with TextWorldBatch(GameConfig(step_limit=steps), 1) as game:
        for seed in seeds:
            (episode,) = game.reset([seed], "train")
            while not episode.done:
                prompt = text.encode(tokenizer, build_prompt(episode))  # re-tokenized
                key, step_key = jax.random.split(key)
                out = generate(policy.lm, *pad_right([prompt]), step_key, sampling)
                n = int(out.lengths[0])
                action_ids = np.asarray(out.tokens[0, :n]).tolist()
                # Two more forwards over prompt + action: its log-prob, then the value.
                batch = (*pad_left([prompt]), *pad_right([action_ids]))
                score_responses(policy.lm, *batch)[0].block_until_ready()
                hidden = score_responses(policy.lm, *batch)[2]
                policy.value_head(hidden).block_until_ready()
                action = text.decode_actions(tokenizer, np.asarray(out.tokens),
                                             np.asarray(out.lengths))[0]
                (episode,) = game.step([action])
                taken += 1
    return taken, time.time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--games", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6, help="step limit of each game")
    args = parser.parse_args()
    _, model, tokenizer = load_model(quantize="int8")
    apply_lora(model, LoraConfig(rank=8, alpha=32), nnx.Rngs(0))
    policy = ActorCritic(model)
    seeds = list(range(args.games))
    results = {}
    for name, run in (("ours (batched, incremental)", ours),
                      ("notebook style (batch 1)", notebook_style)):
        run(policy, tokenizer, seeds[:2], 2, jax.random.key(1))  # warm-up: compile
        steps, seconds = run(policy, tokenizer, seeds, args.steps, jax.random.key(0))
        results[name] = steps / seconds
        print(f"{name:<30} {steps:>4} env-steps in {seconds:6.1f} s = {steps / seconds:.2f} "
              f"env-steps/s", flush=True)
    ours_rate, baseline = results.values()
    print(f"ours / notebook style: {ours_rate / baseline:.1f}x")


if __name__ == "__main__":
    main()
