"""PPO with a sentiment reward over generated text (notebook 002's trlX pattern), SmolLM2.

    python -m experiments.sentiment_ppo                # ~9 min on 2 CPU cores
    python -m experiments.sentiment_ppo --init-kl-coef 0.05 --top-k 0
    python -m experiments.sentiment_ppo --help

The policy continues the opening of a movie review; the reward is the positivity of the
continuation (VADER's compound score, an offline lexicon scorer standing in for notebook 002's
emotion classifier). PPO with a value head, the per-token KL to the initial policy in the reward,
GAE over response tokens, clipped policy and value losses, epochs over the stored rollouts.
Flags carry trlX's names (num_rollouts, ppo_epochs, init_kl_coef, cliprange, cliprange_value,
vf_coef, top_k); with top_k > 0 the old log-probs are those of the unfiltered policy, as in
trlX (`train.prompt_rl.PromptRLConfig`).
"""

from __future__ import annotations

import dataclasses

from experiments import text_rl
from experiments.common import config_overrides, config_parser
from jaxrl_llm.checks import require_at_least_one


@dataclasses.dataclass(frozen=True)
class TRLXConfig:
    """trlX's PPO config surface (notebook 002); defaults sized for a 2-core CPU."""

    num_rollouts: int = 32  # responses per iteration (notebook: 128)
    ppo_epochs: int = 4
    init_kl_coef: float = 0.001
    target: float | None = None  # adaptive KL target per response (None: fixed, as notebook)
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 1.0
    top_k: int = 10
    max_new_tokens: int = 20  # notebook: 32
    batch_size: int = 16  # responses per optimizer step
    learning_rate: float = 1e-4  # notebook: 3e-5 on every Flan-T5 weight; here LoRA
    iterations: int = 12
    eval_prompts: int = 16
    seed: int = 0
    run_dir: str = "runs/sentiment_ppo"

    def __post_init__(self):
        # Checked here so that errors name these flags, not the driver's.
        require_at_least_one(self, ("num_rollouts", "ppo_epochs", "batch_size", "max_new_tokens",
                                    "iterations", "eval_prompts"), cli=True)
        self.to_config()  # the driver's checks too, before any work

    def to_config(self) -> text_rl.Config:
        return text_rl.Config(
            task="sentiment", algorithms=("ppo",), kl_coefs=(self.init_kl_coef,),
            kl_target=self.target, num_samples=1, prompts_per_iteration=self.num_rollouts,
            epochs=self.ppo_epochs, clip_eps=self.cliprange, value_clip=self.cliprange_value,
            vf_coef=self.vf_coef, top_k=self.top_k, max_new_tokens=self.max_new_tokens,
            minibatch_size=self.batch_size, micro_batch_size=self.batch_size,
            learning_rate=self.learning_rate, iterations=self.iterations,
            eval_prompts=self.eval_prompts, seed=self.seed, run_dir=self.run_dir)


def parse_args(argv=None) -> TRLXConfig:
    parser = config_parser(TRLXConfig(), __doc__.split("\n")[0], types={"target": float})
    return dataclasses.replace(TRLXConfig(), **config_overrides(parser.parse_args(argv)))


if __name__ == "__main__":
    text_rl.main(parse_args().to_config())
