"""TextWorld agent: SFT warm start on expert trajectories -> PPO -> evaluation on held-out games.

    python -m experiments.textworld_ppo                 # `cpu` preset, the default SmolLM2 model
    python -m experiments.textworld_ppo --preset smoke  # tiny random model, seconds
    python -m experiments.textworld_ppo --help

Stages (paper order): load the int8 base + LoRA adapters; (optionally) evaluate the zero-shot
policy; SFT on the gold paths of train games, each game one packed sequence (per-step prompts
with a sliding history), with the gold-action accuracy on dev games after each epoch; evaluate
the warm start; PPO iterations with the action-level policy (collect in lockstep by sampling
from pi(a | s) over the valid actions, KL to the frozen warm start, GAE, minibatch epochs over
packed games from stored log-probs); evaluate on test games (every step limit).
Outputs go to `--run-dir`: config.json, metrics.jsonl (one line per SFT step, dev evaluation
and PPO iteration), curves.png, eval.json, checkpoints/{latest,best}. Re-running with the same
--run-dir resumes PPO from `latest` (at most the iteration in progress is lost).
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

from jaxrl_llm.agent import MODES, AgentConfig, play
from jaxrl_llm.checkpoint import Checkpointer, fingerprint, policy_identity
from jaxrl_llm.checks import require_at_least_one
from jaxrl_llm.data import encode_episode, expert_episodes
from jaxrl_llm.envs.textworld import PROMPT_STYLES, GameConfig, TextWorldBatch
from jaxrl_llm.evaluation import evaluate_policy
from jaxrl_llm.generation import compile_count
from jaxrl_llm.metrics import RunDir
from jaxrl_llm.model.loading import QUANTIZE_MODES
from jaxrl_llm.model.lora import LoraConfig, apply_lora
from jaxrl_llm.model.value_head import ActorCritic
from jaxrl_llm.packing import check_episodes, packed_scorer
from jaxrl_llm.sharding import MeshConfig, make_mesh, shard_model
from jaxrl_llm.train.ppo import (ADVANTAGES, PPOConfig, minibatches, ppo_loss,
                                 prepare_rollout)
from jaxrl_llm.train.sft import (SFTConfig, episode_batches, gold_action_accuracy,
                                 packed_choice_loss, packed_completion_loss)
from jaxrl_llm.train.step import NonFiniteGuard, OptimConfig, Trainer, make_optimizer

PRESETS = ("smoke", "cpu", "gpu")
# The fields that shape each stage's training (not memory knobs, evaluation or logging): a
# checkpoint keeps them, and resuming it under other values is refused, not silently mixed.
SFT_FIELDS = ("model_path", "quantize", "lora_rank", "lora_alpha", "lora_layers",
              "max_history", "prompt_style", "train_games", "sft_loss", "sft_negatives",
              "sft_noise", "sft_epochs", "sft_batch_size", "sft_learning_rate", "seed")
PPO_FIELDS = SFT_FIELDS + ("collect_mode", "temperature", "length_norm", "ppo_step_limit",
                           "ppo_epochs", "ppo_minibatch_size", "ppo_learning_rate", "kl_coef",
                           "kl_in", "ppo_games", "ppo_group", "ppo_advantage", "ppo_top_k")
SFT_LOSSES = ("choice", "completion")
CURVES = ("mean_score", "success_rate", "env_reward", "kl_ref", "entropy", "clip_fraction",
          "approx_kl", "explained_variance", "value_loss", "policy_loss", "valid_action_rate",
          "env_steps_per_s")


@dataclasses.dataclass(frozen=True)
class Config:
    """One run. Defaults are the `cpu` preset (the default SmolLM2-135M on a 2-core CPU)."""

    model_path: str | None = None  # None: the default SmolLM2-135M-Instruct GGUF
    quantize: str = "int8"  # "int8", "int8-all" (embedding too) or "" (float weights)
    lora_rank: int = 8  # LoRA rank r of every adapted linear layer
    lora_alpha: float = 32.0  # LoRA scale alpha (the update is alpha / r * B A)
    # Adapt only the last N decoder layers (0: all): the layers below run forward only in
    # training, with no backward pass (an SFT game of ~1.7k tokens: top 8 ~9 s, top 16 ~14 s,
    # all 30 ~22 s on 2 cores). The top 16 learn more from 96 games than the top 8 from 192.
    lora_layers: int = 16
    max_history: int | None = None  # steps of history in the prompt (None: all, packed)
    # The step's tail (`envs.textworld.step_tail`): "locate" names the recipe's ingredients
    # (and knife) not carried, where each was last seen, and the directions not done;
    # checklist (without where), compact, notebook, inventory, recipe.
    prompt_style: str = "locate"
    train_games: int = 96  # gold paths of train seeds 0..N-1 for SFT
    dev_games: int = 4  # dev seeds 0..K-1: gold-action accuracy after each SFT epoch
    eval_games: int = 32  # test seeds 0..M-1
    eval_step_limits: tuple[int, ...] = (16, 32)  # evaluation step limits (one play, cut)
    zero_shot_eval: bool = False  # also evaluate the base model (0% here: docs/textworld.md)
    agent_mode: str = "score"  # how the evaluated policy acts
    eval_sample: bool = False  # evaluate by sampling from the policy (else its argmax)
    collect_mode: str = "score"  # how PPO collects (and so which policy it trains)
    temperature: float = 1.0  # of the action softmax (score mode) or the sampler (generate)
    length_norm: bool = False  # score mode: per-token mean action log-probs
    # "completion": the gold action's NLL; "choice" adds the cross-entropy of the action-level
    # policy, the gold action against `sft_negatives` other valid actions sampled per step.
    sft_loss: str = "completion"
    sft_negatives: int = 4  # choice loss: other valid actions per step scored against the gold
    # Probability that an SFT game takes a random other action, from which the expert
    # recovers (DART): the policy learns the off-path states it will reach and the way back.
    sft_noise: float = 0.2
    sft_epochs: int = 1  # passes over the SFT games
    sft_batch_size: int = 1  # games (packed) or steps (sliding history) per optimizer step
    sft_micro_batch_size: int = 1  # sequences per forward/backward (a memory knob)
    sft_learning_rate: float = 2e-3  # AdamW peak learning rate (warmup, then linear decay)
    # SFT steps between resumable checkpoints (and one after each epoch's dev evaluation): a
    # killed SFT resumes from the last one, exactly. 0: only at epoch ends.
    sft_checkpoint_every: int = 8
    # Recompute activations in the backward pass: a third more compute, far less memory. The
    # attention activations of a packed game grow with the square of its tokens, and the
    # longest noisy SFT games (~2.5k tokens) or PPO games with every valid action as a
    # candidate (~5k) do not fit a 24 GB machine without it.
    sft_remat: bool = True  # recompute activations in SFT's backward pass
    ppo_remat: bool = True  # recompute activations in the PPO updates' backward pass
    ppo_iterations: int = 2  # collect + update rounds
    ppo_games: int = 4  # training games per PPO iteration, stepped in lockstep
    # Plays of each training game per iteration (`ppo_games / ppo_group` seeds): the group
    # whose other plays are a play's baseline with `--ppo-advantage rloo`.
    ppo_group: int = 1
    ppo_advantage: str = "gae"  # "gae" (value head) or "rloo" (the group's other plays)
    ppo_step_limit: int = 16  # step limit of the training games (notebook 000's)
    # The update scores each step's k likeliest valid actions (and the chosen one), pi
    # renormalised over them (0: all ~35, about half of a packed PPO game's tokens).
    ppo_top_k: int = 0
    ppo_epochs: int = 1  # passes over each iteration's games
    ppo_minibatch_size: int = 2  # packed games per PPO update
    ppo_learning_rate: float = 1e-5  # Adam learning rate of the PPO updates
    eval_every: int = 0  # PPO iterations between held-out evals for `best` (0: only at the end)
    kl_coef: float = 0.2  # weight of the KL to the frozen SFT policy
    kl_in: str = "reward"  # "reward" (k1 penalty per step) or "loss" (exact KL term)
    num_envs: int = 4  # evaluation games stepped in lockstep
    cache_len: int = 8192  # KV-cache slots per game: a whole 32-step game's history
    env_workers: int = 1  # threads talking to the game engines (pays with many games + cores)
    mesh: tuple[int, ...] = (-1, 1, 1)  # data, fsdp, tensor axis sizes (-1: the rest)
    seed: int = 0  # model init, SFT shuffles and the run's JAX key
    run_dir: str = "runs/textworld_ppo"  # outputs; rerun with the same one to resume
    tensorboard: bool = False  # also write TensorBoard event files to <run-dir>/tb

    def __post_init__(self):
        require_at_least_one(self, ("train_games", "eval_games", "num_envs", "lora_rank",
                                    "sft_epochs", "ppo_games", "ppo_group", "ppo_step_limit",
                                    "env_workers"), cli=True)
        for flag, value, allowed in (("--prompt-style", self.prompt_style, PROMPT_STYLES),
                                     ("--sft-loss", self.sft_loss, SFT_LOSSES),
                                     ("--agent-mode", self.agent_mode, MODES),
                                     ("--collect-mode", self.collect_mode, MODES),
                                     ("--ppo-advantage", self.ppo_advantage, ADVANTAGES)):
            if value not in allowed:
                raise ValueError(f"{flag} must be one of {', '.join(allowed)}, got {value!r}")
        quantize_modes = [m or "" for m in QUANTIZE_MODES]  # "" = float weights
        if self.quantize not in quantize_modes:
            raise ValueError(f"--quantize must be one of {quantize_modes}, got "
                             f"{self.quantize!r}")
        if self.collect_mode == "generate" and self.temperature != 1.0:
            raise ValueError("--collect-mode generate needs --temperature 1: the PPO update "
                             "recomputes untempered token log-probs of the sampled actions")
        if self.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {self.seed}")
        if self.lora_layers < 0:
            raise ValueError(f"--lora-layers must be >= 0 (0: every layer), got "
                             f"{self.lora_layers}")
        if not 0.0 <= self.sft_noise < 1.0:
            raise ValueError(f"--sft-noise must be in [0, 1), got {self.sft_noise}")
        if self.sft_negatives < 0 or self.sft_checkpoint_every < 0:
            raise ValueError(f"--sft-negatives and --sft-checkpoint-every must be >= 0, got "
                             f"{self.sft_negatives} and {self.sft_checkpoint_every}")
        if min(self.dev_games, self.ppo_iterations, self.ppo_top_k) < 0:
            raise ValueError(f"--dev-games, --ppo-iterations and --ppo-top-k must be >= 0, got "
                             f"{self.dev_games}, {self.ppo_iterations} and {self.ppo_top_k}")
        if not self.eval_step_limits or min(self.eval_step_limits) < 1:
            raise ValueError(f"--eval-step-limits must be one or more limits >= 1, got "
                             f"{self.eval_step_limits}")
        if len(self.mesh) != 3:
            raise ValueError(f"--mesh takes 3 sizes (data fsdp tensor), got {self.mesh}")
        MeshConfig(*self.mesh)  # validates the sizes
        if self.eval_games % self.num_envs and self.eval_games > self.num_envs:
            raise ValueError(f"--eval-games ({self.eval_games}) must be a multiple of "
                             f"--num-envs ({self.num_envs})")
        if self.ppo_games % self.ppo_group:
            raise ValueError(f"--ppo-games ({self.ppo_games}) must be a multiple of "
                             f"--ppo-group ({self.ppo_group})")
        if self.ppo_advantage == "rloo" and self.ppo_group < 2:
            raise ValueError("--ppo-advantage rloo needs --ppo-group >= 2: a play's baseline "
                             "is the other plays of its game")
        if self.eval_every < 0:
            raise ValueError(f"--eval-every must be >= 0 (0: only at the end), got "
                             f"{self.eval_every}")
        # The sub-configs, validated here: before the model loads, not when their stage starts.
        self.agent("eval"), self.agent("collect"), self.sft_config(), self.ppo_config()
        LoraConfig(rank=self.lora_rank, alpha=self.lora_alpha)
        OptimConfig(learning_rate=self.sft_learning_rate)

    def agent(self, use: str) -> AgentConfig:
        """How the policy acts: "eval" (greedy, `agent_mode`) or "collect" (sampled)."""
        return AgentConfig(mode=self.agent_mode if use == "eval" else self.collect_mode,
                           greedy=use == "eval" and not self.eval_sample, temperature=self.temperature,
                           length_norm=self.length_norm, prompt_style=self.prompt_style,
                           max_history=self.max_history, max_action_tokens=12,
                           cache_len=self.cache_len)

    def sft_config(self) -> SFTConfig:
        return SFTConfig(epochs=self.sft_epochs, batch_size=self.sft_batch_size,
                         micro_batch_size=self.sft_micro_batch_size, seed=self.seed,
                         remat=self.sft_remat)

    def ppo_config(self) -> PPOConfig:
        return PPOConfig(learning_rate=self.ppo_learning_rate, epochs=self.ppo_epochs,
                         kl_coef=self.kl_coef, kl_in=self.kl_in,
                         minibatch_size=self.ppo_minibatch_size,
                         micro_batch_size=self.sft_micro_batch_size,
                         policy="action" if self.collect_mode == "score" else "sequence",
                         temperature=self.temperature, length_norm=self.length_norm,
                         advantage=self.ppo_advantage, group_size=self.ppo_group,
                         top_k=self.ppo_top_k)

    @classmethod
    def preset(cls, name: str, **overrides) -> "Config":
        presets = {
            # Byte-level ids make a whole game ~5k tokens: the tiny model keeps 2 steps.
            "smoke": dict(model_path="tiny", quantize="int8", max_history=2, cache_len=4096,
                          train_games=2, lora_layers=0, dev_games=1, eval_games=2, num_envs=2,
                          ppo_games=2, eval_step_limits=(4,),
                          sft_batch_size=4, ppo_step_limit=4, zero_shot_eval=True,
                          run_dir="runs/smoke"),
            "cpu": {},
            "gpu": dict(train_games=400, lora_layers=0, sft_learning_rate=5e-4, dev_games=32,
                        eval_games=128, num_envs=32, ppo_games=32,
                        sft_epochs=2, sft_batch_size=16, sft_micro_batch_size=4,
                        ppo_iterations=50, ppo_epochs=2, ppo_minibatch_size=8, env_workers=16,
                        zero_shot_eval=True, run_dir="runs/textworld_ppo_gpu"),
        }
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        return cls(**{**presets[name], **overrides})

    def settings(self, fields: tuple[str, ...]) -> dict:
        return {field: getattr(self, field) for field in fields}


def load_policy(config: Config):
    """(model with LoRA adapters, tokenizer) for the run."""
    # The smoke preset's tiny model reads TextWorld prompts of up to ~4k bytes.
    model, tokenizer = load_base(config.model_path, config.quantize, config.seed,
                                 tiny_max_seq_len=4096)
    layers = model.config.num_layers
    if config.lora_layers > layers:
        raise ValueError(f"--lora-layers {config.lora_layers} is more than the model's {layers} "
                         "layers")
    apply_lora(model, LoraConfig.top_layers(config.lora_layers, layers, rank=config.lora_rank,
                                            alpha=config.lora_alpha), nnx.Rngs(config.seed))
    return model, tokenizer


def evaluate(model, tokenizer, config: Config, key, label: str, mesh,
             policy: dict | None = None) -> dict:
    """Play on test seeds 0..M-1 (greedy unless `eval_sample`), summarized at every step limit.

    With `policy` (what identifies the weights: `checkpoint.policy_identity`), finished games
    are kept in `<run_dir>/eval/` (`evaluation.eval_record_path`) and a rerun plays only the rest.
    """
    agent = config.agent("eval")
    # A sampled policy's draws depend on the games, not on how they are chunked.
    play_chunk = lambda games, seeds, on_step: play(
        model, tokenizer, games, seeds, "test", jax.random.fold_in(key, seeds[0]), agent,
        on_step=on_step, mesh=mesh)
    settings = policy and dict(policy=policy, agent=dataclasses.asdict(agent), seed=config.seed,
                               model_path=config.model_path, quantize=config.quantize)
    return evaluate_policy(play_chunk, config.eval_games, min(config.num_envs, config.eval_games),
                           config.eval_step_limits, workers=config.env_workers,
                           label=f"eval {label} {agent.mode}", settings=settings,
                           record_dir=os.path.join(config.run_dir, "eval") if policy else None)


def gold_episodes(tokenizer, config: Config, fold: str, num_games: int, candidates: bool,
                  negatives: int | None = None, noise: float = 0.0):
    """Expert paths (`data.expert_episodes`, `noise`) of seeds 0..N-1 of `fold` as packed
    episodes, each learned step's gold index (leaves: the gold action, every valid action, or
    the gold and `negatives` others) and each learned step's gold verb ("take", "cook", ...)."""
    rows = expert_episodes(GameConfig(), range(num_games), fold,
                           cache_dir=os.path.join(config.run_dir, "data"), noise=noise,
                           noise_seed=config.seed)
    rng = np.random.default_rng((config.seed, num_games))
    encoded = [encode_episode(tokenizer, row, config.prompt_style, config.max_history,
                              candidates, negatives, rng) for row in rows]
    episodes = [e for packed, _ in encoded for e in packed]
    # A sliding history makes one episode per step, each with its one gold index.
    verbs = [[a.split()[0] for a, learned in zip(row["actions"], row["trained"]) if learned]
             for row in rows]
    if config.max_history is not None:
        gold = [[g] for _, steps in encoded for g in steps]
        verbs = [[verb] for game in verbs for verb in game]
    else:
        gold = [steps for _, steps in encoded]
    return episodes, gold, verbs


def dev_accuracy(model, tokenizer, config: Config, dev) -> dict:
    """The early signal: how often the action-level policy's argmax is the gold action, overall
    and per gold verb (a policy that has not learned to cut and cook as the recipe says loses
    those games, however well it takes and moves)."""
    episodes, gold, verbs = dev
    return gold_action_accuracy(packed_scorer(model), episodes, gold, config.temperature,
                                config.length_norm, pad_id=tokenizer.eos_token_id, groups=verbs)


def sft(model, tokenizer, config: Config, run: RunDir, mesh) -> tuple[nnx.Module, float]:
    """LoRA SFT on the expert paths (noisy with `sft_noise`) of train seeds 0..N-1; returns
    the tuned model and its training seconds."""
    choice = config.sft_loss == "choice"
    episodes, gold, _ = gold_episodes(tokenizer, config, "train", config.train_games, choice,
                                      config.sft_negatives if choice else None, config.sft_noise)
    dev = (gold_episodes(tokenizer, config, "dev", config.dev_games, True)
           if config.dev_games else None)
    check_episodes(episodes + (dev[0] if dev else []), model.config.max_seq_len,
                   model.config.vocab_size)
    sft_config = config.sft_config()
    steps_per_epoch = -(-len(episodes) // config.sft_batch_size)
    optimizer = make_optimizer(OptimConfig(
        learning_rate=config.sft_learning_rate, warmup_steps=max(1, steps_per_epoch // 10),
        total_steps=steps_per_epoch * config.sft_epochs + 1))
    loss = (functools.partial(packed_choice_loss, temperature=config.temperature,
                              length_norm=config.length_norm, remat=sft_config.remat)
            if choice else functools.partial(packed_completion_loss, remat=sft_config.remat))
    trainer = Trainer(model, optimizer, loss, mesh=mesh)
    state = trainer.init()
    checkpoints, fp = checkpointer(config, "sft"), fingerprint(model)
    restored = checkpoints.restore(state, jax.random.key(0), fp)
    if restored:  # a resumed run: the warm start (and KL anchor) is the saved one
        print(f"loaded the SFT adapters from {checkpoints.directory}")
        return trainer.model(restored[0]), restored[2]["seconds"]
    # A killed SFT resumes from its last progress checkpoint: the batch order is a function of
    # (seed, epoch), so skipping the batches it had trained on replays the same run.
    progress, done, elapsed = checkpointer(config, "sft_progress"), 0, 0.0
    resumed = progress.restore(state, jax.random.key(0), fp)
    if resumed:
        state, _, record = resumed
        done, elapsed = record["batches"], record["seconds"]
        print(f"resumed SFT after step {done} ({progress.directory})")
    run.rewind(lambda r: r["stage"] in ("sft", "sft_dev") and r["step"] > done)
    start = time.time() - elapsed

    def save(state, batches):
        progress.save(state, jax.random.key(0), dict(fingerprint=fp, batches=batches,
                                                     settings=config.settings(SFT_FIELDS),
                                                     seconds=time.time() - start))

    tokens = sum(e.num_tokens for e in episodes)
    print(f"SFT ({config.sft_loss} loss) on {len(episodes)} sequences ({tokens} tokens, "
          f"{sum(len(e.targets) for e in episodes)} action tokens)", flush=True)
    bar = tqdm(total=steps_per_epoch * config.sft_epochs, initial=done, desc="SFT", unit="step")
    guard, every, batches = NonFiniteGuard(), config.sft_checkpoint_every, 0
    for epoch in range(config.sft_epochs):
        for batch in episode_batches(episodes, sft_config, epoch, pad_id=tokenizer.eos_token_id,
                                     gold=gold if choice else None):
            batches += 1
            if batches <= done:
                continue
            state, metrics = trainer.step(state, batch)
            metrics = {k: float(v) for k, v in metrics.items()}
            guard(metrics, f"SFT step {batches}")
            bar.update()
            accuracy = metrics["choice_accuracy" if choice else "token_accuracy"]
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{accuracy:.2f}")
            run.log(dict(stage="sft", epoch=epoch, step=batches, **metrics,
                     wall_time=time.time() - start))
            if every and batches % every == 0 and batches % steps_per_epoch:
                save(state, batches)
        if batches <= done:  # this epoch's dev evaluation ran before the checkpoint
            continue
        if dev:
            accuracy = dev_accuracy(trainer.model(state), tokenizer, config, dev)
            by_verb = ", ".join(f"{key.split('/')[1]} {accuracy[key]:.2f}"
                                for key in accuracy if key.startswith("accuracy/"))
            bar.write(f"epoch {epoch + 1}: dev gold-action accuracy "
                      f"{accuracy['action_accuracy']:.3f} over {accuracy['steps']} steps "
                      f"({by_verb})")
            run.log(dict(stage="sft_dev", epoch=epoch, step=batches, **accuracy,
                     wall_time=time.time() - start))
        save(state, batches)
    bar.close()
    seconds = time.time() - start
    checkpoints.save(state, jax.random.key(0), dict(fingerprint=fp, seconds=seconds,
                                                    settings=config.settings(SFT_FIELDS)))
    return trainer.model(state), seconds


def checkpointer(config: Config, stage: str = "") -> Checkpointer:
    """The run's checkpoints: PPO's in `checkpoints/`, SFT's (`stage="sft"`) below it."""
    return Checkpointer(os.path.join(config.run_dir, "checkpoints", stage))


def ppo(model, tokenizer, config: Config, key, run: RunDir, mesh) -> nnx.Module:
    """PPO iterations from the SFT policy; checkpoints `latest` each iteration (resumable)."""
    ppo_config = config.ppo_config()
    actor_critic = ActorCritic(model)
    trainer = Trainer(actor_critic, make_optimizer(OptimConfig(
        learning_rate=ppo_config.learning_rate, weight_decay=0.0)),
        functools.partial(ppo_loss, config=ppo_config, remat=config.ppo_remat), mesh=mesh)
    state = trainer.init()
    reference = packed_scorer(trainer.model(trainer.init()).lm)  # frozen warm start: KL anchor
    checkpoints = checkpointer(config)
    fp = fingerprint(actor_critic)
    restored = checkpoints.restore(state, key, fp)
    done = 0
    if restored:
        state, key, record = restored
        done = record["iteration"]
        print(f"resumed PPO from iteration {done} ({checkpoints.directory})")
    # Iterations past the checkpoint were logged by a run killed before saving: redone here.
    run.rewind(lambda r: r["stage"] in ("ppo", "ppo_eval") and r["iteration"] > done)
    agent = config.agent("collect")
    pad_id = tokenizer.eos_token_id
    bar = tqdm(total=config.ppo_iterations, initial=done, desc="PPO", unit="iter")
    guard = NonFiniteGuard()
    with TextWorldBatch(GameConfig(step_limit=config.ppo_step_limit), config.ppo_games,
                        workers=config.env_workers) as games:
        for iteration in range(done, config.ppo_iterations):
            start = time.time()
            # Game seeds, sampling and shuffles all come from the checkpointed key.
            key, seed_key, play_key, shuffle_key = jax.random.split(key, 4)
            policy = trainer.model(state)
            draws = jax.random.randint(seed_key, (config.ppo_games // config.ppo_group,), 0,
                                       100_000)
            seeds = np.repeat(np.asarray(draws), config.ppo_group).tolist()
            steps = tqdm(total=config.ppo_games * config.ppo_step_limit, unit="step", leave=False,
                         desc=f"collect {iteration + 1}")
            episodes, transitions = play(policy.lm, tokenizer, games, seeds, "train", play_key,
                                         agent, value_head=policy.value_head, mesh=mesh,
                                         on_step=lambda e: steps.update(config.ppo_games))
            steps.close()
            collect_seconds = time.time() - start
            rollout, stats = prepare_rollout(transitions, config.max_history is None, reference,
                                             ppo_config, model.config.max_seq_len, pad_id)
            updates = []
            for epoch, epoch_key in enumerate(jax.random.split(shuffle_key, ppo_config.epochs)):
                for batch in tqdm(minibatches(rollout, ppo_config, epoch_key, pad_id),
                                  leave=False, desc=f"update {iteration + 1} epoch {epoch + 1}",
                                  total=-(-len(rollout.episodes) // ppo_config.minibatch_size),
                                  unit="minibatch"):
                    state, metrics = trainer.step(state, batch)
                    updates.append({k: float(v) for k, v in metrics.items()})
                    guard(updates[-1], f"PPO iteration {iteration + 1}")
            record = dict(stage="ppo", iteration=iteration + 1, **stats,
                          **{k: float(np.mean([u[k] for u in updates])) for k in updates[0]},
                          success_rate=float(np.mean([e.success for e in episodes])),
                          mean_score=float(np.mean([e.score for e in episodes])),
                          env_steps_per_s=len(transitions) / collect_seconds,
                          iteration_seconds=time.time() - start)
            run.log(record)
            checkpoint_record = dict(fingerprint=fp, iteration=iteration + 1, metrics=record,
                                     settings=config.settings(PPO_FIELDS))
            checkpoints.save(state, key, checkpoint_record)
            if config.eval_every and (iteration + 1) % config.eval_every == 0:
                scores = evaluate(trainer.model(state).lm, tokenizer, config, key, "PPO", mesh)
                score = np.mean([r["mean_score"] for r in scores.values()])
                best = checkpoints.record("best")
                run.log(dict(stage="ppo_eval", iteration=iteration + 1, **scores))
                if best is None or score > best["eval_score"]:
                    checkpoints.save(state, key, dict(checkpoint_record, eval_score=score),
                                     slot="best")
            bar.update()
            bar.set_postfix(score=f"{record['mean_score']:.2f}", kl=f"{record['kl_ref']:.3f}")
    bar.close()
    return trainer.model(state).lm


def check_resumable(config: Config) -> None:
    """Refuse, before any model load, to resume checkpoints of `--run-dir` that were trained
    with other settings (e.g. another prompt style: the adapters would be evaluated and
    trained on prompts they never saw)."""
    for stage, fields in (("sft", SFT_FIELDS), ("sft_progress", SFT_FIELDS), ("", PPO_FIELDS)):
        directory = os.path.join(config.run_dir, "checkpoints", stage, "latest")
        record = checkpointer(config, stage).record() if os.path.isdir(directory) else None
        saved = (record or {}).get("settings", {})
        changed = [f"--{field.replace('_', '-')} {saved[field]} (now {value})"
                   for field, value in config.settings(fields).items()
                   if field in saved and saved[field] != value]
        if changed:
            raise ValueError(f"--run-dir {config.run_dir} holds {stage or 'PPO'} checkpoints "
                             f"trained with {', '.join(changed)}: rerun with those flags to "
                             "resume, or use a new --run-dir")


def main(config: Config) -> dict:
    check_resumable(config)
    run = RunDir(config.run_dir, config, stage="ppo", x="iteration", keys=CURVES,
                 title="TextWorld PPO", tensorboard=config.tensorboard)
    key = jax.random.key(config.seed)
    print(f"loading model ({config.model_path or 'default SmolLM2-135M-Instruct GGUF'}, "
          f"{config.quantize or 'float'} base, LoRA r={config.lora_rank} on "
          f"{f'the top {config.lora_layers}' if config.lora_layers else 'all'} layers)", flush=True)
    mesh = make_mesh(MeshConfig(*config.mesh))
    model, tokenizer = load_policy(config)
    shard_model(model, mesh)
    print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}, mesh "
          f"{dict(mesh.shape)}", flush=True)
    results, seconds = {}, {}

    def timed(stage: str, work):
        start = time.time()
        out = work()
        seconds[stage] = time.time() - start
        return out

    def evaluated(label: str, policy_name: str):
        results[policy_name] = timed(f"eval_{policy_name}", lambda: evaluate(
            model, tokenizer, config, key, label, mesh, policy=policy_identity(model)))

    if config.zero_shot_eval:
        evaluated("zero-shot", "zero_shot")
    model, sft_seconds = timed("sft", lambda: sft(model, tokenizer, config, run, mesh))
    evaluated("SFT", "sft")
    if config.ppo_iterations:  # with none, the PPO policy is the SFT policy, played already
        model = timed("ppo", lambda: ppo(model, tokenizer, config, key, run, mesh))
        evaluated("PPO", "ppo")
    # A resumed run loads its SFT checkpoint: its training time is the one saved with it.
    results["wall_time_s"] = {**seconds, "sft_training": sft_seconds}
    results["compiled_play_programs"] = compile_count()
    with open(os.path.join(config.run_dir, "eval.json"), "w") as f:
        json.dump(results, f, indent=2)
    run.close()
    print_summary(results, config)
    return results


def print_table(results: dict, step_limits) -> None:
    """One row per (policy, step limit): success with its 95% interval, score, steps, invalid
    rate, and the shares of games lost and of games out of steps with an ingredient missing."""
    print(f"\n{'policy':<20} {'limit':>5} {'success (95% CI)':>22} {'score':>6} {'steps':>6} "
          f"{'invalid':>8} {'lost':>5} {'missed':>6}")
    for policy, by_limit in results.items():
        for limit in step_limits:
            r = by_limit[f"limit_{limit}"]
            ci = f"{r['success_rate']:.2f} [{r['success_low']:.2f}, {r['success_high']:.2f}]"
            print(f"{policy:<20} {limit:>5} {ci:>22} {r['mean_score']:>6.2f} "
                  f"{r['mean_steps']:>6.1f} {r['invalid_rate']:>8.2f} {r['failure_rate']:>5.2f} "
                  f"{r['missed_ingredient_rate']:>6.2f}")


def print_summary(results: dict, config: Config) -> None:
    print_table({p: results[p] for p in ("zero_shot", "sft", "ppo") if p in results},
                config.eval_step_limits)
    stages = ", ".join(f"{stage} {s / 60:.1f}" for stage, s in results["wall_time_s"].items())
    print(f"wall time (min): {stages}; {results['compiled_play_programs']} play programs "
          f"compiled; run dir {config.run_dir}")


def parse_args(argv=None) -> Config:
    return parse_preset_config(Config, PRESETS, __doc__.split("\n")[0], argv,
                               types={"max_history": int})


def cli(argv=None) -> dict:
    """The command line: `main` of the parsed flags; Ctrl-C ends with how to resume."""
    config = parse_args(argv)
    try:
        return main(config)
    except KeyboardInterrupt:
        # Checkpoints and evaluation records are written whole (a line cut by the interrupt is
        # dropped when read), so the same command continues where this one stopped.
        raise SystemExit(f"\ninterrupted: rerun the same command (--run-dir {config.run_dir}) "
                         "to resume from the last checkpoint and evaluation records") from None


if __name__ == "__main__":
    cli()
