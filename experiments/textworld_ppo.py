"""TextWorld agent: SFT warm start on expert trajectories -> PPO -> evaluation on held-out games.

    python -m experiments.textworld_ppo                 # `cpu` preset, the default SmolLM2 model
    python -m experiments.textworld_ppo --preset smoke  # tiny random model, seconds
    python -m experiments.textworld_ppo --help

Stages (paper order): load the int8 base + LoRA adapters; (optionally) evaluate the zero-shot
policy; SFT on gold-path (prompt -> action) pairs of train games; evaluate the warm start; PPO
iterations (collect in lockstep with sampling, KL to the frozen warm start, GAE, minibatch epochs
from stored log-probs); evaluate on test games (both step limits).
Outputs go to `--run-dir`: config.json, metrics.jsonl (one line per SFT step and per PPO
iteration), curves.png, eval.json, checkpoints/{latest,best}. Re-running with the same --run-dir
resumes PPO from `latest` (at most the iteration in progress is lost).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from experiments.common import load_base, parse_preset_config

from jaxrl_llm import text
from jaxrl_llm.agent import AgentConfig, evaluate_policy, play
from jaxrl_llm.checkpoint import Checkpointer, fingerprint, policy_identity
from jaxrl_llm.checks import require_at_least_one
from jaxrl_llm.data import expert_dataset
from jaxrl_llm.envs.textworld import GameConfig, TextWorldBatch, prompt_pieces, step_tail
from jaxrl_llm.metrics import RunDir
from jaxrl_llm.model.lora import LoraConfig, apply_lora
from jaxrl_llm.model.value_head import ActorCritic
from jaxrl_llm.sharding import MeshConfig, make_mesh, shard_model
from jaxrl_llm.train.ppo import PPOConfig, minibatches, ppo_loss, prepare_rollout
from jaxrl_llm.train.sft import SFTConfig, batches, completion_loss
from jaxrl_llm.train.step import OptimConfig, Trainer, make_optimizer

PRESETS = ("smoke", "cpu", "gpu")
CURVES = ("mean_score", "success_rate", "env_reward", "kl_ref", "entropy", "clip_fraction",
          "approx_kl", "explained_variance", "value_loss", "policy_loss", "valid_action_rate",
          "env_steps_per_s")


@dataclasses.dataclass(frozen=True)
class Config:
    """One run. Defaults are the `cpu` preset (the default SmolLM2-135M on a 2-core CPU)."""

    model_path: str | None = None  # None: the default SmolLM2-135M-Instruct GGUF
    quantize: str = "int8"
    lora_rank: int = 8
    lora_alpha: float = 32.0
    # A 2-core CPU prefills a few hundred tokens/s and trains LoRA at ~100 tokens/s with
    # SmolLM2-135M, so the cpu preset is a check of the whole pipeline on the real model within
    # about an hour (short prompts, few games, one step limit); the gpu preset is the experiment.
    max_history: int | None = 2  # steps of history in the prompt (None: all, incremental)
    train_games: int = 6  # gold paths of train seeds 0..N-1 for SFT
    eval_games: int = 4  # test seeds 0..M-1
    eval_step_limits: tuple[int, ...] = (16,)
    zero_shot_eval: bool = False  # zero-shot SmolLM2 solves 0% (FACTS.md): skip it on CPU
    agent_mode: str = "score"
    sft_epochs: int = 1
    sft_batch_size: int = 8
    sft_micro_batch_size: int = 2
    sft_learning_rate: float = 2e-4
    # Recompute activations in the backward pass (SFT and PPO): a 1,040-token gradient of
    # SmolLM2-135M then needs 0.6 GB of temporaries instead of 3.5 GB, for ~7% more time
    # (benchmarks/train_step.py). Off in the cpu preset, whose short prompts fit either way.
    remat: bool = False
    ppo_iterations: int = 2
    ppo_step_limit: int = 16  # step limit of the training games
    ppo_epochs: int = 1
    ppo_learning_rate: float = 1.41e-5
    eval_every: int = 0  # PPO iterations between held-out evals for `best` (0: only at the end)
    kl_coef: float = 0.2
    kl_in: str = "reward"
    num_envs: int = 4  # games stepped in lockstep (collection and evaluation)
    env_workers: int = 1  # threads talking to the game engines (pays with many games + cores)
    mesh: tuple[int, ...] = (-1, 1, 1)  # data, fsdp, tensor axis sizes (-1: the rest)
    seed: int = 0
    run_dir: str = "runs/textworld_ppo"

    def __post_init__(self):
        require_at_least_one(self, ("train_games", "eval_games", "num_envs", "lora_rank",
                                    "sft_epochs", "ppo_step_limit", "env_workers"), cli=True)
        if not self.eval_step_limits or min(self.eval_step_limits) < 1:
            raise ValueError(f"--eval-step-limits must be one or more limits >= 1, got "
                             f"{self.eval_step_limits}")
        if len(self.mesh) != 3:
            raise ValueError(f"--mesh takes 3 sizes (data fsdp tensor), got {self.mesh}")
        MeshConfig(*self.mesh)  # validates the sizes
        if self.eval_games % self.num_envs and self.eval_games > self.num_envs:
            raise ValueError(f"--eval-games ({self.eval_games}) must be a multiple of "
                             f"--num-envs ({self.num_envs})")

    @classmethod
    def preset(cls, name: str, **overrides) -> "Config":
        presets = {
            "smoke": dict(model_path="tiny", quantize="int8", train_games=2, eval_games=2,
                          num_envs=2, eval_step_limits=(4,), sft_batch_size=4, ppo_step_limit=4,
                          sft_micro_batch_size=2, zero_shot_eval=True, run_dir="runs/smoke"),
            "cpu": {},
            "gpu": dict(max_history=None, train_games=400, eval_games=128, num_envs=32,
                        eval_step_limits=(16, 32),
                        sft_epochs=2, sft_batch_size=32, sft_micro_batch_size=8, remat=True,
                        ppo_iterations=50, ppo_epochs=2, env_workers=16,
                        zero_shot_eval=True, run_dir="runs/textworld_ppo_gpu"),
        }
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        return cls(**{**presets[name], **overrides})


def load_policy(config: Config):
    """(model with LoRA adapters, tokenizer) for the run."""
    # The smoke preset's tiny model reads TextWorld prompts of up to ~4k bytes.
    model, tokenizer = load_base(config.model_path, config.quantize, config.seed,
                                 tiny_max_seq_len=4096)
    apply_lora(model, LoraConfig(rank=config.lora_rank, alpha=config.lora_alpha),
               nnx.Rngs(config.seed))
    return model, tokenizer


def evaluate(model, tokenizer, config: Config, key, label: str, mesh,
             policy: dict | None = None) -> dict:
    """Greedy play on test seeds 0..M-1, summarized at every configured step limit.

    With `policy` (what identifies the weights: `checkpoint.policy_identity`), finished games
    are kept in `<run_dir>/eval/` (`agent.eval_record_path`) and a rerun plays only the rest.
    """
    agent = AgentConfig(mode=config.agent_mode, max_history=config.max_history,
                        max_action_tokens=12)
    play_chunk = lambda games, seeds, on_step: play(model, tokenizer, games, seeds, "test", key,
                                                    agent, on_step=on_step, mesh=mesh)
    settings = policy and dict(policy=policy, agent=dataclasses.asdict(agent), seed=config.seed,
                               model_path=config.model_path, quantize=config.quantize)
    return evaluate_policy(play_chunk, config.eval_games, min(config.num_envs, config.eval_games),
                           config.eval_step_limits, workers=config.env_workers,
                           label=f"eval {label} {agent.mode}", settings=settings,
                           record_dir=os.path.join(config.run_dir, "eval") if policy else None)


def sft(model, tokenizer, config: Config, log, mesh) -> tuple[nnx.Module, float]:
    """LoRA SFT on gold-path transitions of train seeds 0..N-1; returns the tuned model."""
    data = expert_dataset(GameConfig(), range(config.train_games), "train", tokenizer,
                          config.max_history, cache_dir=os.path.join(config.run_dir, "data"))
    longest_action = max(len(ids) for ids in data["action_ids"])
    sft_config = SFTConfig(epochs=config.sft_epochs, batch_size=config.sft_batch_size,
                           micro_batch_size=config.sft_micro_batch_size, seed=config.seed,
                           completion_len=-(-longest_action // 8) * 8, remat=config.remat)
    steps_per_epoch = -(-len(data) // config.sft_batch_size)
    optimizer = make_optimizer(OptimConfig(
        learning_rate=config.sft_learning_rate, warmup_steps=max(1, steps_per_epoch // 10),
        total_steps=steps_per_epoch * config.sft_epochs + 1))
    trainer = Trainer(model, optimizer,
                      functools.partial(completion_loss, remat=sft_config.remat), mesh=mesh)
    state = trainer.init()
    checkpoints = checkpointer(config, "sft")
    restored = checkpoints.restore(state, jax.random.key(0), fingerprint(model))
    if restored:  # a resumed run: the warm start (and KL anchor) is the saved one
        print(f"loaded the SFT adapters from {checkpoints.directory}")
        return trainer.model(restored[0]), checkpoints.record()["seconds"]
    start = time.time()
    bar = tqdm(total=steps_per_epoch * config.sft_epochs, desc="SFT", unit="step")
    for epoch in range(config.sft_epochs):
        for batch in batches(data["prompt_ids"], data["action_ids"], sft_config, epoch,
                             pad_id=tokenizer.eos_token_id):
            state, metrics = trainer.step(state, batch)
            metrics = {k: float(v) for k, v in metrics.items()}
            bar.update()
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['token_accuracy']:.2f}")
            log(dict(stage="sft", epoch=epoch, step=int(state.step), **metrics,
                     wall_time=time.time() - start))
    bar.close()
    seconds = time.time() - start
    checkpoints.save(state, jax.random.key(0), dict(fingerprint=fingerprint(model),
                                                    seconds=seconds))
    return trainer.model(state), seconds


def checkpointer(config: Config, stage: str = "") -> Checkpointer:
    """The run's checkpoints: PPO's in `checkpoints/`, SFT's (`stage="sft"`) below it."""
    return Checkpointer(os.path.join(config.run_dir, "checkpoints", stage))


def ppo(model, tokenizer, config: Config, key, log, mesh) -> nnx.Module:
    """PPO iterations from the SFT policy; checkpoints `latest` each iteration (resumable)."""
    ppo_config = PPOConfig(learning_rate=config.ppo_learning_rate, epochs=config.ppo_epochs,
                           kl_coef=config.kl_coef, kl_in=config.kl_in,
                           minibatch_size=config.sft_batch_size,
                           micro_batch_size=config.sft_micro_batch_size)
    actor_critic = ActorCritic(model)
    trainer = Trainer(actor_critic, make_optimizer(OptimConfig(
        learning_rate=ppo_config.learning_rate, weight_decay=0.0)),
        functools.partial(ppo_loss, config=ppo_config, remat=config.remat), mesh=mesh)
    state = trainer.init()
    reference = trainer.model(trainer.init())  # the frozen warm start: KL anchor
    checkpoints = checkpointer(config)
    fp = fingerprint(actor_critic)
    restored = checkpoints.restore(state, key, fp)
    if restored:
        state, key, record = restored
        print(f"resumed PPO from iteration {record['iteration']} ({checkpoints.directory})")
    agent = AgentConfig(mode="generate", greedy=False, temperature=1.0,
                        max_history=config.max_history, max_action_tokens=12)
    rng = np.random.default_rng(config.seed)
    bar = tqdm(total=config.ppo_iterations, initial=_iteration(checkpoints), desc="PPO",
               unit="iter")
    with TextWorldBatch(GameConfig(step_limit=config.ppo_step_limit), config.num_envs,
                        workers=config.env_workers) as games:
        for iteration in range(_iteration(checkpoints), config.ppo_iterations):
            start = time.time()
            key, play_key = jax.random.split(key)
            policy = trainer.model(state)
            seeds = rng.integers(0, 100_000, config.num_envs).tolist()
            steps = tqdm(total=config.num_envs * config.ppo_step_limit, unit="step", leave=False,
                         desc=f"collect {iteration + 1}")
            episodes, transitions = play(policy.lm, tokenizer, games, seeds, "train", play_key,
                                         agent, value_head=policy.value_head, mesh=mesh,
                                         on_step=lambda e: steps.update(config.num_envs))
            steps.close()
            collect_seconds = time.time() - start
            finals = {g: text.encode_prompt(tokenizer, prompt_pieces(e, config.max_history),
                                            step_tail(e.valid_actions))
                      for g, e in enumerate(episodes) if e.truncated}
            arrays, stats = prepare_rollout(transitions, finals, policy, reference, ppo_config,
                                            pad_id=tokenizer.eos_token_id, action_len=16)
            updates = []
            for epoch in range(ppo_config.epochs):
                for batch in tqdm(minibatches(arrays, ppo_config, rng), leave=False,
                                  total=-(-len(arrays["prompt"]) // ppo_config.minibatch_size),
                                  desc=f"update {iteration + 1} epoch {epoch + 1}",
                                  unit="minibatch"):
                    state, metrics = trainer.step(state, batch)
                    updates.append({k: float(v) for k, v in metrics.items()})
            record = dict(stage="ppo", iteration=iteration + 1, **stats,
                          **{k: float(np.mean([u[k] for u in updates])) for k in updates[0]},
                          success_rate=float(np.mean([e.success for e in episodes])),
                          mean_score=float(np.mean([e.score for e in episodes])),
                          env_steps_per_s=len(transitions) / collect_seconds,
                          iteration_seconds=time.time() - start)
            log(record)
            checkpoint_record = dict(fingerprint=fp, iteration=iteration + 1, metrics=record)
            checkpoints.save(state, key, checkpoint_record)
            if config.eval_every and (iteration + 1) % config.eval_every == 0:
                scores = evaluate(trainer.model(state).lm, tokenizer, config, key, "PPO", mesh)
                score = np.mean([r["mean_score"] for r in scores.values()])
                best = checkpoints.record("best")
                log(dict(stage="ppo_eval", iteration=iteration + 1, **scores))
                if best is None or score > best["eval_score"]:
                    checkpoints.save(state, key, dict(checkpoint_record, eval_score=score),
                                     slot="best")
            bar.update()
            bar.set_postfix(score=f"{record['mean_score']:.2f}", kl=f"{record['kl_ref']:.3f}")
    bar.close()
    return trainer.model(state).lm


def _iteration(checkpoints: Checkpointer) -> int:
    record = checkpoints.record()
    return record["iteration"] if record else 0


def main(config: Config) -> dict:
    run = RunDir(config.run_dir, config, stage="ppo", x="iteration", keys=CURVES,
                 title="TextWorld PPO")
    log = run.log
    key = jax.random.key(config.seed)
    print(f"loading model ({config.model_path or 'default SmolLM2-135M-Instruct GGUF'}, "
          f"{config.quantize or 'float'} base, LoRA r={config.lora_rank})", flush=True)
    mesh = make_mesh(MeshConfig(*config.mesh))
    model, tokenizer = load_policy(config)
    shard_model(model, mesh)
    print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}, mesh "
          f"{dict(mesh.shape)}", flush=True)
    results = {}
    if config.zero_shot_eval:
        results["zero_shot"] = evaluate(model, tokenizer, config, key, "zero-shot", mesh,
                                        policy=policy_identity(model))
    model, sft_seconds = sft(model, tokenizer, config, log, mesh)
    results["sft"] = evaluate(model, tokenizer, config, key, "SFT", mesh,
                              policy=policy_identity(model))
    results["sft_wall_time_s"] = sft_seconds
    start = time.time()
    model = ppo(model, tokenizer, config, key, log, mesh)
    results["ppo"] = evaluate(model, tokenizer, config, key, "PPO", mesh,
                              policy=policy_identity(model))
    results["ppo_wall_time_s"] = time.time() - start
    with open(os.path.join(config.run_dir, "eval.json"), "w") as f:
        json.dump(results, f, indent=2)
    run.close()
    print_summary(results, config)
    return results


def print_table(results: dict, step_limits) -> None:
    """One row per (policy, step limit): success with its 95% interval, score, steps, invalid."""
    print(f"\n{'policy':<20} {'limit':>5} {'success (95% CI)':>22} {'score':>6} {'steps':>6} "
          f"{'invalid':>8}")
    for policy, by_limit in results.items():
        for limit in step_limits:
            r = by_limit[f"limit_{limit}"]
            ci = f"{r['success_rate']:.2f} [{r['success_low']:.2f}, {r['success_high']:.2f}]"
            print(f"{policy:<20} {limit:>5} {ci:>22} {r['mean_score']:>6.2f} "
                  f"{r['mean_steps']:>6.1f} {r['invalid_rate']:>8.2f}")


def print_summary(results: dict, config: Config) -> None:
    print_table({p: results[p] for p in ("zero_shot", "sft", "ppo") if p in results},
                config.eval_step_limits)
    print(f"SFT {results['sft_wall_time_s']:.0f} s, PPO {results['ppo_wall_time_s']:.0f} s; "
          f"run dir {config.run_dir}")


def parse_args(argv=None) -> Config:
    return parse_preset_config(Config, PRESETS, __doc__.split("\n")[0], argv,
                               types={"max_history": int})


if __name__ == "__main__":
    main(parse_args())
