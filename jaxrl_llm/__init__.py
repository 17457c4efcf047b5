"""jaxrl_llm: reinforcement learning on language models in JAX / Flax NNX.

The public API is these modules, imported by path (`from jaxrl_llm import losses`):

  losses       the RL math as pure jittable functions: masked reductions, GAE, clipped PPO
               policy / value losses, KL estimators, REINFORCE, RLOO and GRPO advantages
  logprobs     token log-probs and entropies in float32; `score_responses`, `head_logprobs`
  scoring      the action-level policy pi(a | s) over candidate actions; its entropy and KL
  generation   batched sampling with a KV cache; multi-turn `DecodeState` / `extend` /
               `generate_from` / `score_continuations`
  sampling     `SamplingConfig` and the sampling rule
  padding      length buckets and padding (the few static shapes of every program)
  packing      a multi-step episode as one packed sequence; `packed_forward`
  model        Llama-family decoders (`load_model`), int8 weight-only base, LoRA, value head
  train        `step.Trainer` (one donated optimizer step), `sft`, `ppo` (step level),
               `prompt_rl` (PPO, REINFORCE, RLOO, GRPO, Dr. GRPO on prompts)
  reward_model a learned reward: trunk + scalar head, Bradley-Terry training on pairs
  agent, evaluation, envs.textworld, data   the TextWorld agent, its games and expert data
  checkpoint, metrics, sharding, export     runs: checkpoints, logs, meshes, PEFT export

Nothing is imported here: `import jaxrl_llm` stays cheap, and each module pulls in only what
it needs.
"""

__version__ = "0.1.0"
__all__ = ["agent", "checkpoint", "data", "envs", "evaluation", "export", "generation",
           "logprobs", "losses", "metrics", "model", "packing", "padding", "reward_model",
           "rewards", "sampling", "scoring", "sharding", "text", "train"]
