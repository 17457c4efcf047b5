"""Prompt-level RL on the default SmolLM2 model (notebooks 002-004): what their entry points share.

A run trains one or more *arms* (an algorithm and a KL coefficient) from the same int8 base with
fresh LoRA adapters, on the same prompts, reward and budget, and prints one table:

    reward, KL to the reference, and a fluency proxy (the reference model's log-prob per token
    of the samples, and the fraction of distinct tokens) on held-out prompts, before and after.

Entry points: `experiments.text_reinforce` (003), `experiments.text_rloo` (004),
`experiments.sentiment_ppo` (002). Outputs go to `--run-dir`: one sub-directory per arm
(config.json, metrics.jsonl, curves.png), results.json with the table, and comparison.png (every
arm's curves in one figure).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time

import datasets
import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from experiments.common import arm_dir, arm_grid, config_overrides, config_parser, load_base

from jaxrl_llm import rewards
from jaxrl_llm.checks import require_at_least_one
from jaxrl_llm.metrics import RunDir, plot_curves, read_jsonl
from jaxrl_llm.model.bert import SentenceEncoder
from jaxrl_llm.model.lora import LoraConfig, apply_lora
from jaxrl_llm.sampling import SamplingConfig
from jaxrl_llm.train import prompt_rl
from jaxrl_llm.train.step import OptimConfig, make_optimizer

TASKS = ("keywords", "length", "similarity", "sentiment")
CURVES = ("reward_mean", "kl_ref", "ref_logprob", "entropy", "response_length", "clip_fraction",
          "approx_kl", "value_loss", "explained_variance")
# Notebook 003's keyword set: colours, instruments, activities.
KEYWORDS = frozenset("""red blue green yellow orange purple pink cyan magenta turquoise violin
piano guitar drums flute trumpet saxophone cello clarinet harp running swimming cycling painting
dancing singing writing climbing skiing cooking black white beige brown gray banjo accordion
trombone oboe mandolin jogging hiking knitting gardening surfing karate yoga chess fishing
skating""".split())
# Short chat openers in the style of notebook 003's OpenAssistant prompts (< 32 characters).
CHAT_PROMPTS = (
    "Tell me a joke!", "How are you today?", "What is your favorite hobby?", "Hi there, how",
    "Write a short poem.", "What should I cook tonight?", "Describe your weekend.",
    "What do you like to do?", "Give me a fun fact.", "What music do you enjoy?",
    "Tell me about your day.", "What is the best sport?", "Recommend a good book.",
    "What colour is the sky?", "Plan a birthday party.", "How do I relax?",
    "What makes you happy?", "Suggest a new hobby.", "Where should I travel?",
    "Describe a perfect morning.", "What is art?", "Tell me a story.", "Any plans for today?",
    "What is your dream job?", "How do I stay fit?", "Name something beautiful.",
    "What did you learn today?", "Describe your home.", "What is fun in winter?",
    "Help me pick a gift.", "What games do you play?", "Why is exercise good?",
    "Describe a summer day.", "What is a good snack?", "How do I make friends?",
    "Tell me something new.", "What do artists do?", "Describe your best friend.",
    "What is the weather like?", "How do I learn faster?", "What sounds nice?",
    "Describe a city you love.", "What is on your mind?", "Say something kind.",
    "What should I draw?", "Describe your favorite food.", "How was school?",
    "What is a great gift?",
)
# Openings of reviews for the positivity task (the IMDB prompts of trlX's sentiment example).
REVIEW_PROMPTS = (
    "This movie was", "I watched this film and", "The acting in this movie", "The plot of",
    "I went to see this film", "Honestly, the director", "The ending of the movie",
    "This was the worst", "My friends and I saw", "The soundtrack", "I expected more from",
    "The first half of the film", "Compared to the book,", "The special effects were",
    "The main character", "I would not recommend", "This sequel is", "The dialogue",
    "After two hours I", "The cinematography", "My kids thought the movie", "This film is",
    "The cast", "I fell asleep during", "The story follows", "Critics said this movie",
    "What a film!", "The villain", "I have seen better", "The script", "This comedy",
    "The final scene", "Watching this at home,", "The trailer made it look", "The pacing",
    "This documentary", "The horror film", "It took me a while to", "The romance in this film",
    "This movie made me", "The costumes", "Halfway through, I", "As a fan of the genre,",
    "The performances", "The premise", "For a low budget film,", "The music", "This remake",
)


@dataclasses.dataclass(frozen=True)
class Config:
    """One comparison. Defaults: notebook 003 on a 2-core CPU (tens of minutes)."""

    model_path: str | None = None  # None: the default SmolLM2-135M-Instruct GGUF; "tiny": random
    quantize: str = "int8"
    lora_rank: int = 8
    lora_alpha: float = 32.0
    task: str = "similarity"  # the reward, one of TASKS
    target_length: int = 40  # characters, task "length"
    target_text: str = "Hi there!"  # task "similarity" (notebook 003's sample sentence)
    algorithms: tuple[str, ...] = ("reinforce",)  # one arm per (algorithm, kl_coef)
    kl_coefs: tuple[float, ...] = (0.0, 0.1)  # initial coefficients
    kl_target: float | None = None  # adaptive KL: target per response in nats (None: fixed)
    iterations: int = 16
    prompts_per_iteration: int = 8
    num_samples: int = 4  # responses per prompt (k)
    max_new_tokens: int = 20  # notebook 003 samples 20 tokens
    top_k: int = 0  # 0: sample from the policy itself (see `prompt_rl.PromptRLConfig`)
    epochs: int = 1
    minibatch_size: int = 32
    micro_batch_size: int = 16
    clip_eps: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.1
    learning_rate: float = 2e-4
    eval_prompts: int = 16  # held-out prompts, scored before and after
    seed: int = 0
    run_dir: str = "runs/text_reinforce"
    tensorboard: bool = False  # also write TensorBoard event files to <run-dir>/tb

    def __post_init__(self):
        require_at_least_one(self, ("iterations", "prompts_per_iteration", "eval_prompts",
                                    "lora_rank"), cli=True)
        if self.task not in TASKS:
            raise ValueError(f"--task must be one of {', '.join(TASKS)}, got {self.task!r}")
        for arm in self.arms():  # their errors too, before loading anything
            self.rl_config(*arm)
        self.lora_config(), self.optim_config()
        if self.eval_prompts + self.prompts_per_iteration > len(self.prompts()):
            raise ValueError(f"--eval-prompts + --prompts-per-iteration must be <= "
                             f"{len(self.prompts())} (the task's prompts)")

    def arms(self) -> list[tuple[str, float]]:
        return arm_grid(self.algorithms, self.kl_coefs)

    def prompts(self) -> tuple[str, ...]:
        return REVIEW_PROMPTS if self.task == "sentiment" else CHAT_PROMPTS

    def lora_config(self) -> LoraConfig:
        return LoraConfig(rank=self.lora_rank, alpha=self.lora_alpha)

    def optim_config(self) -> OptimConfig:
        return OptimConfig(learning_rate=self.learning_rate, weight_decay=0.0)

    def rl_config(self, algorithm: str, kl_coef: float, eos_ids=(), pad_id=0):
        return prompt_rl.PromptRLConfig(
            algorithm=algorithm, num_samples=self.num_samples, epochs=self.epochs,
            sampling=SamplingConfig(max_new_tokens=self.max_new_tokens, top_k=self.top_k,
                                    eos_ids=eos_ids, pad_id=pad_id),
            minibatch_size=self.minibatch_size, micro_batch_size=self.micro_batch_size,
            clip_eps=self.clip_eps, value_clip=self.value_clip, vf_coef=self.vf_coef,
            kl_coef=kl_coef, kl_target=self.kl_target)


def arm_name(algorithm: str, kl_coef: float) -> str:
    return f"{algorithm} kl={kl_coef:g}"


def prompt_splits(config: Config) -> datasets.DatasetDict:
    """The task's prompts as a `datasets.DatasetDict`, split into train and held-out test."""
    data = datasets.Dataset.from_dict({"prompt": list(config.prompts())})
    return data.train_test_split(test_size=config.eval_prompts, seed=config.seed)


def text_reward(config: Config) -> rewards.TextReward:
    if config.task == "keywords":
        return functools.partial(rewards.keyword_hits, words=KEYWORDS)
    if config.task == "length":
        return functools.partial(rewards.length_penalty, target=config.target_length)
    if config.task == "sentiment":
        return rewards.sentiment
    return rewards.embedding_similarity(SentenceEncoder.minilm(), config.target_text)


def distinct_tokens(arrays: dict[str, np.ndarray]) -> float:
    """Mean fraction of distinct tokens per response: 1 for varied text, low for "iiiii"."""
    fractions = [len(set(r[m].tolist())) / max(m.sum(), 1)
                 for r, m in zip(arrays["response"], arrays["response_mask"])]
    return float(np.mean(fractions))


def evaluate(policy, reference, prompts, reward_fn, key, rl_config, tokenizer) -> dict:
    """Reward, KL to the reference and fluency of fresh samples on held-out prompts."""
    arrays, stats = prompt_rl.collect(policy, reference, prompts, reward_fn, key, 0.0, rl_config)
    first = slice(None, 4 * rl_config.num_samples, rl_config.num_samples)  # of 4 prompts
    samples = tokenizer.batch_decode([r[m] for r, m in zip(arrays["response"][first],
                                                           arrays["response_mask"][first])],
                                     skip_special_tokens=True)
    return dict(reward=stats["reward_mean"], kl_ref=stats["kl_ref"],
                ref_logprob=stats["ref_logprob"], distinct_tokens=distinct_tokens(arrays),
                length=stats["response_length"], samples=samples)


def train_arm(base, tokenizer, splits, reward_fn, algorithm: str, kl_coef: float,
              config: Config, run_dir: str) -> dict:
    """Fresh LoRA adapters on a copy of `base`, trained by one algorithm; before/after eval."""
    model = apply_lora(nnx.clone(base), config.lora_config(), nnx.Rngs(config.seed))
    eos = tokenizer.eos_token_id
    rl_config = config.rl_config(algorithm, kl_coef, eos_ids=(eos,), pad_id=eos)
    trainer = prompt_rl.make_trainer(model, rl_config, make_optimizer(config.optim_config()))
    state = trainer.init()
    reference = trainer.model(trainer.init())  # the frozen initial policy: the KL anchor
    encode = lambda texts: [tokenizer.encode(t) for t in texts]
    train_prompts, eval_prompts = encode(splits["train"]["prompt"]), encode(
        splits["test"]["prompt"])
    key = jax.random.key(config.seed)
    eval_key, key = jax.random.split(key)
    result = dict(algorithm=algorithm, kl_coef=kl_coef,
                  before=evaluate(reference, reference, eval_prompts, reward_fn, eval_key,
                                  rl_config, tokenizer))
    run = RunDir(run_dir, config, stage="rl", x="iteration", keys=CURVES,
                 title=f"{config.task}: {algorithm}, kl_coef {kl_coef}",
                 tensorboard=config.tensorboard)
    rng = np.random.default_rng(config.seed)
    start = time.time()
    bar = tqdm(range(config.iterations), desc=arm_name(algorithm, kl_coef), unit="iter")
    for it in bar:
        key, step_key = jax.random.split(key)
        prompts = [train_prompts[i] for i in rng.choice(len(train_prompts),
                                                        config.prompts_per_iteration,
                                                        replace=False)]
        tick = time.time()
        state, kl_coef, record = prompt_rl.iteration(trainer, state, reference, prompts,
                                                     reward_fn, step_key, kl_coef, rl_config)
        run.log(dict(stage="rl", iteration=it + 1, **record,
                     iteration_seconds=time.time() - tick))
        bar.set_postfix(reward=f"{record['reward_mean']:.2f}", kl=f"{record['kl_ref']:.2f}")
    result["train_seconds"] = time.time() - start
    result["after"] = evaluate(trainer.model(state), reference, eval_prompts, reward_fn,
                               eval_key, rl_config, tokenizer)
    run.close()
    return result


def main(config: Config) -> list[dict]:
    os.makedirs(config.run_dir, exist_ok=True)
    splits = prompt_splits(config)
    reward = text_reward(config)
    reward(["probe"])  # a missing scorer package fails here, before the model loads
    base, tokenizer = load_base(config.model_path, config.quantize, config.seed)
    reward_fn = rewards.text_reward_fn(tokenizer, reward, skip_ids=(tokenizer.eos_token_id,))
    results, curves = [], {}
    for algorithm, kl_coef in config.arms():
        run_dir = os.path.join(config.run_dir, arm_dir(algorithm, kl_coef))
        results.append(train_arm(base, tokenizer, splits, reward_fn, algorithm, kl_coef, config,
                                 run_dir))
        with open(os.path.join(config.run_dir, "results.json"), "w") as f:
            json.dump(dict(config=dataclasses.asdict(config), arms=results), f, indent=2)
        metrics = os.path.join(run_dir, "metrics.jsonl")
        curves[arm_name(algorithm, kl_coef)] = read_jsonl(metrics)
        plot_curves(curves, os.path.join(config.run_dir, "comparison.png"), stage="rl",
                    x="iteration", keys=CURVES, title=f"{config.task}: training curves")
    print_table(results, config)
    return results


def print_table(results: list[dict], config: Config) -> None:
    print(f"\n{config.task}: {config.iterations} iterations x {config.prompts_per_iteration} "
          f"prompts x {config.num_samples} samples; {config.eval_prompts} held-out prompts "
          f"x {config.num_samples} samples")
    print(f"{'arm':<18} {'reward':>16} {'KL to ref':>10} {'ref logp/tok':>16} "
          f"{'distinct tok':>14} {'tokens':>14} {'train s':>8}")
    for r in results:
        b, a = r["before"], r["after"]
        print(f"{arm_name(r['algorithm'], r['kl_coef']):<18} "
              f"{b['reward']:>7.3f} -> {a['reward']:<6.3f} {a['kl_ref']:>10.3f} "
              f"{b['ref_logprob']:>7.2f} -> {a['ref_logprob']:<6.2f} "
              f"{b['distinct_tokens']:>5.2f} -> {a['distinct_tokens']:<5.2f} "
              f"{b['length']:>5.1f} -> {a['length']:<5.1f} {r['train_seconds']:>8.0f}")
    for r in results:
        print(f"\n{arm_name(r['algorithm'], r['kl_coef'])} samples after training:")
        for s in r["after"]["samples"]:
            print("  " + repr(s))


def parse_args(defaults: Config, description: str, argv=None) -> Config:
    parser = config_parser(defaults, description, types={"kl_target": float})
    return dataclasses.replace(defaults, **config_overrides(parser.parse_args(argv)))
