"""SFT on whole gold games: packed episodes vs per-step prompts, in the same run.

    python -m benchmarks.packing                      # 8 train games, notebook prompts
    python -m benchmarks.packing --games 2 --prompt-style compact --no-remat

Both variants train LoRA (r=8, alpha=32) on the default SmolLM2 int8 base with the same loss on
the same action tokens, one optimizer step per game: packed, the game is one sequence
(`jaxrl_llm.packing`); per step, each step is its own (prompt with the whole history, action)
pair, in micro-batches of one. Both recompute activations in the backward pass, as the `cpu`
preset trains (`--no-remat` keeps them: a per-step prompt of a few thousand tokens then holds
gigabytes of attention activations). Each variant runs in its own subprocess (peak RSS is its
own), first over every game once (compiles every shape), then timed over every game again; its
line is printed when it ends. Last line: `packed vs per-step: X.XXx faster, Y.YYx fewer tokens`.
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import signal
import subprocess
import sys
import time


def run(variant: str, games: int, style: str, remat: bool) -> dict:
    import jax
    import numpy as np
    from flax import nnx

    from jaxrl_llm.data import encode_episode, expert_episodes
    from jaxrl_llm.envs.textworld import GameConfig
    from jaxrl_llm.model import load_model
    from jaxrl_llm.model.lora import LoraConfig, apply_lora
    from jaxrl_llm.train.sft import (SFTConfig, batches, completion_loss, episode_batches,
                                     packed_completion_loss)
    from jaxrl_llm.train.step import OptimConfig, Trainer, make_optimizer

    _, model, tokenizer = load_model(quantize="int8")
    apply_lora(model, LoraConfig(rank=8, alpha=32), nnx.Rngs(0))
    rows = expert_episodes(GameConfig(), range(games), "train", progress=False)
    packed = [encode_episode(tokenizer, row, style)[0][0] for row in rows]
    pad = tokenizer.eos_token_id
    if variant == "packed":
        loss_fn = packed_completion_loss
        steps = [next(episode_batches([p], SFTConfig(batch_size=1), 0, pad)) for p in packed]
        tokens = [p.num_tokens for p in packed]
    else:
        loss_fn = completion_loss
        steps, tokens = [], []
        for p in packed:
            prompts, actions = [], []
            for s, decision in enumerate(p.decisions):
                visible = (p.branch[:decision + 1] == -1) | (p.branch[:decision + 1] == s)
                prompts.append(p.tokens[:decision + 1][visible].tolist())
                actions.append(p.tokens[(p.branch == s) & (p.leaf == 0)].tolist())
            config = SFTConfig(batch_size=len(prompts), micro_batch_size=1, completion_len=16)
            steps.append(next(batches(prompts, actions, config, 0, pad)))
            tokens.append(sum(map(len, prompts)) + sum(map(len, actions)))
    trainer = Trainer(model, make_optimizer(OptimConfig(learning_rate=1e-4)),
                      functools.partial(loss_fn, remat=remat))
    state = trainer.init()
    for batch in steps:  # compiles every shape
        state, metrics = trainer.step(state, batch)
    jax.block_until_ready(metrics)
    start = time.time()
    for batch in steps:
        state, metrics = trainer.step(state, batch)
    jax.block_until_ready(metrics)
    seconds = time.time() - start
    return dict(variant=variant, tokens_per_game=float(np.mean(tokens)),
                seconds_per_game=seconds / games,
                peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20)


def measure(variant: str, args) -> dict:
    """Runs one variant in its own process; a variant that dies is named in the error."""
    command = [sys.executable, "-m", "benchmarks.packing", "--variant", variant, "--games",
               str(args.games), "--prompt-style", args.prompt_style]
    done = subprocess.run(command + ([] if args.remat else ["--no-remat"]),
                          capture_output=True, text=True)
    if done.returncode:
        why = (f"killed by {signal.Signals(-done.returncode).name} (out of memory?): try fewer "
               "--games" if done.returncode < 0
               else f"failed: {(done.stderr.strip().splitlines() or ['no output'])[-1]}")
        raise SystemExit(f"{variant} variant {why}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--games", type=int, default=8, help="train seeds 0..N-1")
    parser.add_argument("--prompt-style", default="notebook", choices=("notebook", "compact"))
    parser.add_argument("--remat", action=argparse.BooleanOptionalAction, default=True,
                        help="recompute activations in the backward pass (--no-remat keeps "
                        "them: far more memory)")
    parser.add_argument("--variant", choices=("packed", "per-step"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.games < 1:
        parser.error(f"--games must be >= 1, got {args.games}")
    if args.variant:
        print(json.dumps(run(args.variant, args.games, args.prompt_style, args.remat)))
        return
    print(f"{'variant':<10} {'tokens/game':>12} {'s/game':>8} {'peak RSS GB':>12}", flush=True)
    results = {}
    for variant in ("packed", "per-step"):
        r = results[variant] = measure(variant, args)
        print(f"{r['variant']:<10} {r['tokens_per_game']:>12.0f} {r['seconds_per_game']:>8.1f} "
              f"{r['peak_rss_gb']:>12.2f}", flush=True)
    packed, per_step = results["packed"], results["per-step"]
    print(f"packed vs per-step: {per_step['seconds_per_game'] / packed['seconds_per_game']:.2f}x "
          f"faster, {per_step['tokens_per_game'] / packed['tokens_per_game']:.2f}x fewer tokens")


if __name__ == "__main__":
    main()
