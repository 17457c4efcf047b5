"""jaxrl_llm: reinforcement learning on language models in JAX."""
