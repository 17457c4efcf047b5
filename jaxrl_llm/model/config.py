"""Model configuration: one frozen dataclass for every Llama-family decoder we load."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-family decoder (Llama, SmolLM2, Qwen2).

    Attributes:
        vocab_size: number of token embeddings.
        d_model: width of the residual stream.
        num_layers: number of decoder blocks.
        num_heads: query heads; must divide `d_model` unless `head_dim` is given.
        num_kv_heads: key/value heads (grouped-query attention); must divide `num_heads`.
        ffn_dim: hidden width of the SwiGLU MLP.
        head_dim: per-head width; 0 means `d_model // num_heads`.
        rope_theta: base of the rotary position embedding frequencies.
        rms_eps: epsilon of RMSNorm.
        tie_embeddings: the LM head reuses the token embedding matrix.
        qkv_bias: Q/K/V projections carry a bias (Qwen2).
        max_seq_len: longest sequence (prompt + response) the model is used with.
        param_dtype: storage dtype of float parameters, "float32" or "bfloat16".
        dtype: compute dtype of activations, "float32" or "bfloat16".
    """

    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    ffn_dim: int
    head_dim: int = 0
    rope_theta: float = 10_000.0
    rms_eps: float = 1e-5
    tie_embeddings: bool = True
    qkv_bias: bool = False
    max_seq_len: int = 2048
    param_dtype: str = "float32"
    dtype: str = "float32"

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads",
                                  "ffn_dim", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.head_dim < 0:
            raise ValueError(f"ModelConfig.head_dim must be >= 0 (0 = d_model // num_heads), "
                                              f"got {self.head_dim}")
        if self.head_dim == 0 and self.d_model % self.num_heads:
            raise ValueError(f"ModelConfig.num_heads={self.num_heads} must divide "
                                              f"d_model={self.d_model} (or set head_dim explicitly)")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"ModelConfig.num_kv_heads={self.num_kv_heads} must divide "
                                              f"num_heads={self.num_heads}")
        if self.head_dim_ % 2:
            raise ValueError(f"head dim must be even for RoPE, got {self.head_dim_}")
        if self.rope_theta <= 0 or self.rms_eps <= 0:
            raise ValueError("ModelConfig.rope_theta and rms_eps must be > 0, got "
                                              f"{self.rope_theta} and {self.rms_eps}")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"ModelConfig.{name} must be one of {sorted(_DTYPES)}, "
                                                  f"got {getattr(self, name)!r}")

    @property
    def head_dim_(self) -> int:
        """The per-head width actually used."""
        return self.head_dim or self.d_model // self.num_heads

    @property
    def jnp_param_dtype(self):
        return _DTYPES[self.param_dtype]

    @property
    def jnp_dtype(self):
        return _DTYPES[self.dtype]

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def smollm2_135m(cls, **overrides) -> "ModelConfig":
        """SmolLM2-135M(-Instruct): 30 layers, d=576, 9 heads, 3 KV heads, tied embeddings."""
        base = dict(vocab_size=49152, d_model=576, num_layers=30, num_heads=9, num_kv_heads=3,
                                ffn_dim=1536, rope_theta=100_000.0, rms_eps=1e-5, tie_embeddings=True,
                                max_seq_len=8192)
        return cls(**{**base, **overrides})

    @classmethod
    def tiny(cls, **overrides) -> "ModelConfig":
        """A 2-layer random model for fast tests (GQA with 4 query / 2 KV heads)."""
        base = dict(vocab_size=256, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                ffn_dim=128, rope_theta=10_000.0, max_seq_len=512)
        return cls(**{**base, **overrides})
