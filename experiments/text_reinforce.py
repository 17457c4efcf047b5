"""REINFORCE on the default SmolLM2 model (notebook 003), with and without the KL term.

    python -m experiments.text_reinforce                      # two arms, ~8 min on 2 CPU cores
    python -m experiments.text_reinforce --task keywords      # notebook 003's keyword reward
    python -m experiments.text_reinforce --help

k samples per prompt, the mean of the prompt's k rewards as baseline (notebook 003), LoRA over
the int8 base; the default reward is the MiniLM embedding similarity of the response to
"Hi there!" (notebook 003's collapsing run). Two arms share prompts, reward and budget:
kl_coef 0 (the notebook, which collapses into garbage) and kl_coef > 0 (the KL to the initial
policy subtracted from each response's reward). The table reports the reward, the KL to the reference and two fluency
proxies (the reference's log-prob per token of the samples; distinct tokens per response).
"""

from experiments import text_rl

DEFAULTS = text_rl.Config()

if __name__ == "__main__":
    text_rl.main(text_rl.parse_args(DEFAULTS, __doc__.split("\n")[0]))
