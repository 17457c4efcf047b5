"""RLHF from scratch on arithmetic series (notebook 001, corrected): SFT -> reward model -> PPO.

    python -m experiments.arithmetic_rlhf                 # `cpu` preset, ~15 min on 2 cores
    python -m experiments.arithmetic_rlhf --preset smoke  # seconds
    python -m experiments.arithmetic_rlhf --help

Stages (paper order, Ouyang et al. 2022):
  1. SFT: a small decoder of our Llama class, trained from scratch (every weight) to answer
     "generate an arithmetic series with n terms starting with value s and common difference d"
     with "s s+d ... <EOS>" (terms above `max_value` are left out, as in the notebook);
  2. reward model (`jaxrl_llm.reward_model`): a copy of the SFT model, read as the mean
     log-prob of the response (`--rm-kind likelihood`) or through a scalar head (`value`),
     trained with the Bradley-Terry loss on (correct, wrong) continuations, the wrong ones
     sampled from the SFT policy or synthetic corruptions; held-out accuracy;
  3. RL (`train.prompt_rl`: PPO by default) against the learned reward, KL to the frozen SFT
     model, logging the program's verdict on the same samples beside the reward it optimises;
     one arm per (algorithm, KL coefficient) of `--algorithms` x `--kl-coefs`, each from the
     same SFT policy and reward model, on the same prompts; by default RL trains only the gain
     of the final norm (`--rl-trainable`, see `RL_TRAINABLE`);
  4. the exact-correctness rate of continuations (checked by a program, not by the reward
     model) on held-out problems, greedy and sampled, before and after RL, with 95% intervals.
The task itself (problems, tokenizer, checker, corruptions) is `experiments.arithmetic_task`.
Outputs go to `--run-dir`: config.json, metrics.jsonl (SFT and reward model), curves.png (the
reward model's training), results.json,
and per arm `<algorithm>_kl<coef>/` (metrics.jsonl, curves.png); with several arms also
comparison.png and overoptimisation.png (proxy and true reward against the KL to SFT).
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

from experiments.arithmetic_task import (EOS_ID, MAX_NEW_TOKENS, PAD_ID, TEMPLATES, Task,
                                        WordTokenizer, answer_ids, corrupt, credit,
                                        exact_reward_fn, prompt_ids, sample_problems)
from experiments.common import arm_dir, arm_grid, parse_preset_config

from jaxrl_llm import reward_model as rm
from jaxrl_llm.checks import require_at_least_one
from jaxrl_llm.evaluation import wilson_interval
from jaxrl_llm.generation import generate
from jaxrl_llm.metrics import RunDir, plot_curves, read_jsonl
from jaxrl_llm.model import ModelConfig, Transformer
from jaxrl_llm.model.value_head import ValueParam
from jaxrl_llm.padding import bucket_length, pad_left
from jaxrl_llm.sampling import SamplingConfig
from jaxrl_llm.train import prompt_rl
from jaxrl_llm.train.sft import SFTConfig, batches, completion_loss
from jaxrl_llm.train.step import OptimConfig, Trainer, make_optimizer

PRESETS = ("smoke", "cpu")
# What RL trains. The policy gradient of this from-scratch model, estimated from two independent
# batches of 2,048 samples, agrees in direction only on the final norm's gain (cosine 0.99; 0.005
# over all weights): sharpening the output distribution is the one thing a few thousand rewards
# can teach it, and Adam moves every other weight by about its learning rate in noise.
RL_TRAINABLE = dict(final_norm=nnx.Any(nnx.All(nnx.Param, nnx.PathContains("norm")), ValueParam),
                    all=nnx.Param)
# The proxy reward, the program's verdict on the same samples and on held-out problems.
OVEROPTIMISATION = ("reward_mean", "true_reward_mean", "heldout_exact_greedy",
                    "heldout_exact_sampled")
CURVES = ("reward_mean", "true_reward_mean", "heldout_exact_sampled", "kl_ref", "entropy",
          "response_length", "clip_fraction", "approx_kl", "value_loss", "explained_variance")


@dataclasses.dataclass(frozen=True)
class Config:
    """One run. Defaults are the `cpu` preset (about 15 minutes on 2 CPU cores)."""

    max_value: int = 100  # largest term (and number token); the notebook's m
    max_difference: int = 9  # common differences 1..this
    min_terms: int = 5  # fewest terms asked for
    max_terms: int = 14  # most terms asked for
    d_model: int = 64  # width of the decoder trained from scratch
    num_layers: int = 2  # its depth
    sft_examples: int = 76_800  # fresh problems, one SFT pass
    sft_batch_size: int = 64  # problems per SFT step
    sft_learning_rate: float = 3e-3  # AdamW peak (warmup, then linear decay)
    rm_pairs: int = 25_600  # (correct, wrong) training pairs of the reward model
    # Share of reward-model pairs whose wrong answer is a sample of the SFT policy (the mistakes
    # PPO will make), the rest synthetic corruptions; held-out pairs are mixed the same way.
    rm_policy_fraction: float = 0.5
    # Share of the reward model's *training* pairs made of two SFT samples of one prompt, ranked
    # by the program's partial credit (`arithmetic_task.credit`: leading terms right): most
    # policy samples are wrong, and RL needs them ranked among themselves, not only below the
    # right answer. Held-out pairs stay (right, wrong), the accuracy reported.
    rm_ranked_fraction: float = 0.0
    # How the reward is read (`reward_model.SCORES`): "likelihood", the mean token log-prob
    # under the SFT model fine-tuned on the pairs, or "value", a scalar head on its features.
    rm_kind: str = "likelihood"
    rm_epochs: int = 2  # passes over the reward-model pairs
    rm_batch_size: int = 64  # pairs per reward-model step
    rm_learning_rate: float = 1e-3  # AdamW peak of the reward model
    heldout_problems: int = 256  # never trained on: RM held-out pairs and the evaluation
    reward: str = "model"  # "model": the learned reward model (RLHF); "exact": the checker
    algorithms: tuple[str, ...] = ("ppo",)  # of train.prompt_rl.ALGORITHMS, one arm each
    rl_iterations: int = 100  # collect + update rounds
    rl_prompts: int = 32  # prompts per iteration
    num_samples: int = 8  # responses per prompt
    rl_epochs: int = 4  # the notebook's PPO iterations per batch
    rl_minibatch_size: int = 64  # responses per RL update
    rl_trainable: str = "final_norm"  # of RL_TRAINABLE: "all" trains every weight
    rl_learning_rate: float = 1e-2  # Adam step size of the RL updates (1e-4 or less for "all")
    # Weights of the KL to the frozen SFT policy (notebook: 0.01), one arm each.
    kl_coefs: tuple[float, ...] = (0.3,)
    eval_every: int = 10  # RL iterations between held-out evaluations
    seed: int = 0  # problems, weights, sampling
    run_dir: str = "runs/arithmetic_rlhf"  # outputs
    tensorboard: bool = False  # also write TensorBoard event files to <run-dir>/tb

    def __post_init__(self):
        require_at_least_one(self, ("d_model", "num_layers", "sft_examples", "sft_batch_size",
                                    "rm_pairs", "rm_epochs", "rm_batch_size", "heldout_problems",
                                    "rl_prompts", "rl_epochs", "rl_minibatch_size", "eval_every"),
                             cli=True)
        self.task  # its errors, before any training
        if self.reward not in ("model", "exact"):
            raise ValueError(f"--reward must be 'model' or 'exact', got {self.reward!r}")
        if self.rl_trainable not in RL_TRAINABLE:
            raise ValueError(f"--rl-trainable must be one of {', '.join(RL_TRAINABLE)}, got "
                             f"{self.rl_trainable!r}")
        if self.rm_kind not in rm.SCORES:
            raise ValueError(f"--rm-kind must be one of {', '.join(rm.SCORES)}, got "
                             f"{self.rm_kind!r}")
        for flag, share in (("--rm-policy-fraction", self.rm_policy_fraction),
                            ("--rm-ranked-fraction", self.rm_ranked_fraction)):
            if not 0.0 <= share <= 1.0:
                raise ValueError(f"{flag} must be in [0, 1], got {share}")
        rates = (self.sft_learning_rate, self.rm_learning_rate, self.rl_learning_rate)
        if min(rates) <= 0:
            raise ValueError(f"--sft-learning-rate, --rm-learning-rate and --rl-learning-rate "
                             f"must be > 0, got {', '.join(map(str, rates))}")
        for arm in self.arms():  # their errors, before any training
            self.rl_config(*arm)

    def arms(self) -> list[tuple[str, float]]:
        return arm_grid(self.algorithms, self.kl_coefs)

    @property
    def task(self) -> Task:
        return Task(self.max_value, self.max_difference, self.min_terms, self.max_terms)

    def rl_config(self, algorithm: str, kl_coef: float) -> prompt_rl.PromptRLConfig:
        return prompt_rl.PromptRLConfig(
            algorithm=algorithm, num_samples=self.num_samples, epochs=self.rl_epochs,
            sampling=SamplingConfig(max_new_tokens=MAX_NEW_TOKENS, eos_ids=(EOS_ID,),
                                    pad_id=PAD_ID),
            minibatch_size=self.rl_minibatch_size, micro_batch_size=self.rl_minibatch_size,
            kl_coef=kl_coef)

    @classmethod
    def preset(cls, name: str, **overrides) -> "Config":
        presets = {
            "smoke": dict(d_model=32, num_layers=1, sft_examples=256, sft_batch_size=32,
                          rm_pairs=128, rm_epochs=1, rm_batch_size=32, heldout_problems=32,
                          rl_iterations=2, rl_prompts=4, rl_epochs=1, rl_minibatch_size=16,
                          eval_every=1, run_dir="runs/arithmetic_smoke"),
            "cpu": {},
        }
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        return cls(**{**presets[name], **overrides})


def build_model(tokenizer: WordTokenizer, config: Config) -> Transformer:
    model_config = ModelConfig(vocab_size=len(tokenizer.vocab), d_model=config.d_model,
                               num_layers=config.num_layers, num_heads=4, num_kv_heads=4,
                               ffn_dim=3 * config.d_model, max_seq_len=128)
    return Transformer(model_config, rngs=nnx.Rngs(config.seed))


def sft(model, tokenizer, problems, config: Config, rng, log) -> Transformer:
    """Every weight trained on (prompt -> series + EOS), one pass over fresh problems."""
    prompts = [prompt_ids(tokenizer, p, int(rng.integers(len(TEMPLATES)))) for p in problems]
    answers = [answer_ids(tokenizer, p, config.max_value) for p in problems]
    sft_config = SFTConfig(epochs=1, batch_size=config.sft_batch_size,
                           micro_batch_size=config.sft_batch_size,
                           completion_len=MAX_NEW_TOKENS,
                           remat=False, seed=config.seed)
    steps = -(-len(problems) // config.sft_batch_size)
    trainer = Trainer(model, make_optimizer(OptimConfig(
        learning_rate=config.sft_learning_rate, warmup_steps=max(1, steps // 20),
        total_steps=steps + 1)), completion_loss, trainable=nnx.Param)
    state = trainer.init()
    bar = tqdm(batches(prompts, answers, sft_config, epoch=0, pad_id=tokenizer.pad_id),
               total=steps, desc="SFT", unit="step")
    for batch in bar:
        state, metrics = trainer.step(state, batch)
        metrics = {k: float(v) for k, v in metrics.items()}
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['token_accuracy']:.2f}")
        log(dict(stage="sft", step=int(state.step), **metrics))
    return trainer.model(state)


def continuations(lm, tokenizer, prompts, key, greedy: bool) -> list[list[int]]:
    """The policy's continuation (up to and including EOS) of each prompt."""
    tokens, mask = pad_left(prompts, pad_id=tokenizer.pad_id)
    out = generate(lm, tokens, mask, key, SamplingConfig(
        max_new_tokens=MAX_NEW_TOKENS, greedy=greedy, eos_ids=(EOS_ID,), pad_id=PAD_ID))
    return [row[m].tolist() for row, m in zip(np.asarray(out.tokens), np.asarray(out.mask))]


def preference_pairs(policy, tokenizer, problems, config: Config, rng, key, width: int,
                     ranked: float = 0.0) -> dict[str, np.ndarray]:
    """`reward_model.pair_batch` of one pair per problem.

    Mostly (correct, wrong): the wrong answer is a sample of `policy` for a
    `rm_policy_fraction` share of the problems (where that sample is wrong, as the program
    checks), else a synthetic corruption. For a `ranked` share, two samples of `policy` ranked
    by the program's partial credit (`credit`) where they differ (else the pair above).
    """
    prompts = [prompt_ids(tokenizer, p, int(rng.integers(len(TEMPLATES)))) for p in problems]
    answers = [answer_ids(tokenizer, p, config.max_value) for p in problems]
    sampled = rng.random(len(problems)) < config.rm_policy_fraction
    wrong = [corrupt(a, tokenizer, rng, config.max_value) for a in answers]
    chosen = list(answers)
    pair_up = rng.random(len(problems)) < ranked if ranked else np.zeros(len(problems), bool)
    chunk = 1024  # whole chunks are sampled: one compiled shape, whichever rows are used
    for start in range(0, len(problems) if (sampled | pair_up).any() else 0, chunk):
        rows = slice(start, start + chunk)
        samples = continuations(policy, tokenizer, prompts[rows],
                                jax.random.fold_in(key, start), greedy=False)
        for i, sample in enumerate(samples, start):
            if sampled[i] and sample != answers[i]:
                wrong[i] = sample
        if not pair_up[rows].any():
            continue
        others = continuations(policy, tokenizer, prompts[rows],
                               jax.random.fold_in(jax.random.fold_in(key, start), 1),
                               greedy=False)
        for i in np.flatnonzero(pair_up[rows]) + start:
            pair = samples[i - start], others[i - start]
            scores = [credit(s, answers[i]) for s in pair]
            if scores[0] != scores[1]:
                chosen[i], wrong[i] = pair if scores[0] > scores[1] else pair[::-1]
    return rm.pair_batch(prompts, chosen, wrong, width, tokenizer.pad_id)


def train_reward_model(sft_model, tokenizer, train, heldout, config: Config, rng, key, log,
                       width: int) -> tuple[nnx.Module, float, float]:
    """A copy of the SFT model read as `rm_kind`, every weight trained on preference pairs;
    returns it and its accuracy on pairs of held-out problems, after and before training."""
    train_key, heldout_key = jax.random.split(key)
    reward_model = rm.reward_model_for(sft_model, config.rm_kind)
    heldout_pairs = preference_pairs(sft_model, tokenizer, heldout, config, rng, heldout_key,
                                     width)
    untrained = rm.pair_accuracy(reward_model, heldout_pairs, config.rm_kind)
    arrays = preference_pairs(sft_model, tokenizer, train, config, rng, train_key, width,
                              config.rm_ranked_fraction)
    size = config.rm_batch_size
    per_epoch = len(train) // size
    trainer = Trainer(reward_model, make_optimizer(OptimConfig(
        learning_rate=config.rm_learning_rate, total_steps=per_epoch * config.rm_epochs + 1)),
        functools.partial(rm.preference_loss, kind=config.rm_kind), trainable=nnx.Param)
    state = trainer.init()
    bar = tqdm(total=per_epoch * config.rm_epochs, desc="reward model", unit="step")
    for epoch in range(config.rm_epochs):
        order = rng.permutation(len(train))
        for step in range(per_epoch):
            rows = order[step * size:(step + 1) * size]
            state, metrics = trainer.step(state, {k: v[rows][None] for k, v in arrays.items()})
            metrics = {k: float(v) for k, v in metrics.items()}
            bar.update()
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['accuracy']:.2f}")
            log(dict(stage="rm", epoch=epoch, step=int(state.step), **metrics))
    bar.close()
    reward_model = trainer.model(state)
    return reward_model, rm.pair_accuracy(reward_model, heldout_pairs, config.rm_kind), untrained


def with_interval(successes: int, n: int) -> dict:
    low, high = wilson_interval(successes, n)
    return dict(rate=successes / n, low=low, high=high)


def evaluate(lm, tokenizer, problems, config: Config, key) -> dict:
    """Exact-correctness rate (with its 95% Wilson interval) on held-out problems (template
    i % 3), greedy and sampled."""
    prompts = [prompt_ids(tokenizer, p, i % len(TEMPLATES)) for i, p in enumerate(problems)]
    answers = [answer_ids(tokenizer, p, config.max_value) for p in problems]
    results = {}
    for name, greedy in (("greedy", True), ("sampled", False)):
        responses = continuations(lm, tokenizer, prompts, key, greedy)
        correct = sum(r == a for r, a in zip(responses, answers))
        results[f"exact_{name}"] = with_interval(correct, len(problems))
    return results


def rlhf(policy, tokenizer, reward_fn, true_reward_fn, train_problems, heldout, config: Config,
         algorithm: str, kl_coef: float, key, rng, log):
    """RL iterations of `algorithm` from (a copy of) the SFT policy, KL to it; returns the
    tuned LM.

    Each iteration logs the optimised (proxy) reward and the program's verdict on the same
    samples (`true_reward_mean`): where they part is where the proxy is over-optimised.
    """
    rl_config = config.rl_config(algorithm, kl_coef)
    trainer = prompt_rl.make_trainer(nnx.clone(policy), rl_config, make_optimizer(OptimConfig(
        learning_rate=config.rl_learning_rate, weight_decay=0.0)),
        trainable=RL_TRAINABLE[config.rl_trainable])
    state = trainer.init()
    reference = trainer.model(trainer.init())  # the frozen SFT policy: the KL anchor
    truth = []

    def rewarded(prompts, responses):
        truth.append(float(np.mean(true_reward_fn(prompts, responses))))
        return reward_fn(prompts, responses)

    bar = tqdm(range(config.rl_iterations), desc=arm_dir(algorithm, kl_coef), unit="iter")
    for it in bar:
        start = time.time()
        key, step_key, eval_key = jax.random.split(key, 3)
        problems = [train_problems[i] for i in rng.integers(len(train_problems),
                                                            size=config.rl_prompts)]
        prompts = [prompt_ids(tokenizer, p, int(rng.integers(len(TEMPLATES)))) for p in problems]
        state, kl_coef, record = prompt_rl.iteration(trainer, state, reference, prompts,
                                                     rewarded, step_key, kl_coef, rl_config)
        record["true_reward_mean"] = truth.pop()
        if (it + 1) % config.eval_every == 0 or it + 1 == config.rl_iterations:
            scores = evaluate(prompt_rl.policy_lm(trainer.model(state)), tokenizer, heldout,
                              config, eval_key)
            record.update({f"heldout_{k}": v["rate"] for k, v in scores.items()})
        log(dict(stage="rl", iteration=it + 1, **record, iteration_seconds=time.time() - start))
        bar.set_postfix(reward=f"{record['reward_mean']:.2f}",
                        true=f"{record['true_reward_mean']:.2f}", kl=f"{record['kl_ref']:.3f}")
    return prompt_rl.policy_lm(trainer.model(state))


def main(config: Config) -> dict:
    run = RunDir(config.run_dir, config, stage="rm", x="step", keys=("loss", "accuracy"),
                 title="Arithmetic RLHF: reward model", tensorboard=config.tensorboard)
    log = run.log

    rng = np.random.default_rng(config.seed)
    rm_key, eval_key, rl_key = jax.random.split(jax.random.key(config.seed), 3)
    tokenizer = WordTokenizer(config.max_value)
    heldout = sample_problems(rng, config.heldout_problems, config.task)
    seen = frozenset(heldout)
    # RM-wide sequences: the longest prompt + the whole generation budget, one compiled width.
    width = bucket_length(max(len(t.split()) for t in TEMPLATES) + MAX_NEW_TOKENS)
    results, start = {}, time.time()
    policy = sft(build_model(tokenizer, config), tokenizer,
                 sample_problems(rng, config.sft_examples, config.task, seen), config, rng, log)
    results["sft_seconds"] = time.time() - start
    results["sft"] = evaluate(policy, tokenizer, heldout, config, eval_key)
    start = time.time()
    reward_model, accuracy, untrained = train_reward_model(
        policy, tokenizer, sample_problems(rng, config.rm_pairs, config.task, seen), heldout,
        config, rng, rm_key, log, width)
    results.update(reward_model_accuracy=accuracy, reward_model_accuracy_untrained=untrained,
                   rm_seconds=time.time() - start)
    run.close()
    train_problems = sample_problems(rng, 4096, config.task, seen)
    answers = {tuple(prompt_ids(tokenizer, p, t)): answer_ids(tokenizer, p, config.max_value)
               for p in train_problems for t in range(len(TEMPLATES))}
    exact = exact_reward_fn(answers)
    reward_fn = (rm.reward_fn(reward_model, width, PAD_ID, config.rm_kind)
                 if config.reward == "model" else exact)
    as_list = lambda r: [r["rate"], r["low"], r["high"]]
    for name in ("greedy", "sampled"):
        results[f"{name}_exact_before"] = as_list(results["sft"][f"exact_{name}"])
    results["arms"], curves, arms = {}, {}, config.arms()
    for algorithm, kl_coef in arms:
        name = arm_dir(algorithm, kl_coef)
        arm_run = RunDir(os.path.join(config.run_dir, name), config, stage="rl", x="iteration",
                         keys=CURVES, title=f"Arithmetic RLHF ({name})",
                         tensorboard=config.tensorboard)
        start = time.time()
        # Every arm sees the same prompts and keys: they differ by their settings alone.
        tuned = rlhf(policy, tokenizer, reward_fn, exact, train_problems, heldout, config,
                     algorithm, kl_coef, rl_key, np.random.default_rng((config.seed, 1)),
                     arm_run.log)
        arm = dict(algorithm=algorithm, kl_coef=kl_coef, rl_seconds=time.time() - start,
                   rl=evaluate(tuned, tokenizer, heldout, config, eval_key))
        for metric in ("greedy", "sampled"):
            arm[f"{metric}_exact_after"] = as_list(arm["rl"][f"exact_{metric}"])
        arm_run.close()
        results["arms"][name] = arm
        curves[name] = read_jsonl(arm_run.metrics_path)
        if len(arms) > 1:
            plot_curves(curves, os.path.join(config.run_dir, "comparison.png"), stage="rl",
                        x="iteration", keys=CURVES, title="Arithmetic RLHF: arms")
            plot_curves(curves, os.path.join(config.run_dir, "overoptimisation.png"),
                        stage="rl", x="kl_ref", keys=OVEROPTIMISATION,
                        title="proxy (reward model) and true (program) reward vs KL to SFT")
        first = next(iter(results["arms"].values()))
        results.update(rl=first["rl"], rl_seconds=first["rl_seconds"],
                       greedy_exact_after=first["greedy_exact_after"],
                       sampled_exact_after=first["sampled_exact_after"])
        with open(os.path.join(config.run_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
    print_summary(results, config)
    return results


def print_summary(results: dict, config: Config) -> None:
    print(f"\nreward model ({config.rm_kind}) held-out pair accuracy: "
          f"{results['reward_model_accuracy']:.3f} (before its training: "
          f"{results['reward_model_accuracy_untrained']:.3f})")
    print(f"{'policy':<16} {'exact, greedy (95% CI)':>24} {'exact, sampled (95% CI)':>25}   "
          f"({config.heldout_problems} held-out problems)")
    cell = lambda r: f"{r['rate']:.3f} [{r['low']:.3f}, {r['high']:.3f}]"
    rows = [("sft", results["sft"])] + [(n, a["rl"]) for n, a in results["arms"].items()]
    for name, r in rows:
        print(f"{name:<16} {cell(r['exact_greedy']):>24} {cell(r['exact_sampled']):>25}")
    arms = ", ".join(f"{n} {a['rl_seconds']:.0f} s" for n, a in results["arms"].items())
    print(f"SFT {results['sft_seconds']:.0f} s, reward model {results['rm_seconds']:.0f} s, "
          f"{arms}; run dir {config.run_dir}")


def parse_args(argv=None) -> Config:
    return parse_preset_config(Config, PRESETS, __doc__.split("\n")[0], argv)


if __name__ == "__main__":
    main(parse_args())
