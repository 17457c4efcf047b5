"""RLOO against REINFORCE and GRPO on the same budget (notebook 004), default SmolLM2 model.

    python -m experiments.text_rloo            # three arms, ~12 min on 2 CPU cores
    python -m experiments.text_rloo --help

k samples per prompt, LoRA over the int8 base, the reward a frozen sentence encoder's cosine
similarity to a target sentence (the reward-model setting of notebook 004, offline), the KL to
the initial policy in the reward. Arms: RLOO (leave-one-out baseline, Ahmadian et al. 2024),
REINFORCE (mean baseline including the sample itself) and GRPO (group-normalised advantages,
clipped surrogate, KL in the loss); same prompts, samples and iterations.
"""

import dataclasses

from experiments import text_rl

DEFAULTS = dataclasses.replace(text_rl.Config(), algorithms=("rloo", "reinforce", "grpo"),
                               kl_coefs=(0.1,), target_text="Thank you, that sounds wonderful!",
                               run_dir="runs/text_rloo")

if __name__ == "__main__":
    text_rl.main(text_rl.parse_args(DEFAULTS, __doc__.split("\n")[0]))
