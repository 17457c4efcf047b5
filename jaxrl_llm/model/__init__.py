"""Llama-family decoders in Flax NNX: config, modules, loading."""

from jaxrl_llm.model.config import ModelConfig
from jaxrl_llm.model.llama import (BranchMask, KVCache, Transformer, causal_mask,
                                   positions_from_mask)
from jaxrl_llm.model.loading import default_model_path, load_model

__all__ = ["BranchMask", "KVCache", "ModelConfig", "Transformer", "causal_mask",
           "default_model_path", "load_model", "positions_from_mask"]
