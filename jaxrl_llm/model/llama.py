"""A Llama-family decoder in Flax NNX (Llama, SmolLM2, Qwen2).

Token embedding -> N x [RMSNorm -> grouped-query attention with RoPE -> RMSNorm -> SwiGLU] ->
RMSNorm -> LM head (tied or untied). Module and attribute names follow Hugging Face's
(`model.layers[i].self_attn.q_proj`, ...) so one name table serves loading and PEFT export.

The forward is written once for two uses:
  * training / scoring: no cache, `attn_mask = causal_mask(token_mask)`;
  * prefill and decode: a preallocated `KVCache` in which a token's slot is its position, so row b
    writes its chunk at slots `[positions[b, 0], positions[b, 0] + T)` and rows of different
    lengths leave no holes; `attn_mask [B, T, S]` says which slots each new token may see (built
    by `jaxrl_llm.generation`).
Positions are explicit so that left padding never shifts RoPE.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrl_llm.model.config import ModelConfig

_INIT_STD = 0.02
# Query block of `attention` for long chunks (prefill, training).
_QUERY_CHUNK = 256


def _init(rngs: nnx.Rngs, shape, dtype) -> jax.Array:
    # Draw in float32 so that a bfloat16 model is the rounded float32 model of the same seed.
    return (_INIT_STD * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


def _lastdim(v: jax.Array, ndim: int) -> jax.Array:
    """A `[D]` vector shaped `[1, ..., D]` to broadcast explicitly against a rank-`ndim` array."""
    return v.reshape((1,) * (ndim - 1) + v.shape)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias), kernel `[in, out]` stored in `param_dtype`, computed in x.dtype."""

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = False,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.in_features, self.out_features = in_features, out_features
        self.kernel = nnx.Param(
            _init(rngs, (in_features, out_features), param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x @ self.kernel[...].astype(x.dtype)
        return y if self.bias is None else y + _lastdim(self.bias[...].astype(x.dtype), x.ndim)


class Embed(nnx.Module):
    """Token embedding `[V, D]`; `attend` is the tied LM head (logits = h @ E^T)."""

    def __init__(self, vocab_size: int, d_model: int, *, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.embedding = nnx.Param(
            _init(rngs, (vocab_size, d_model), param_dtype))

    def __call__(self, tokens: jax.Array, dtype) -> jax.Array:
        return jnp.take(self.embedding[...], tokens, axis=0).astype(dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        return x @ self.embedding[...].astype(x.dtype).T


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        # Normalise in float32 (as HF does) then cast back: bf16 variance is too coarse.
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * _lastdim(self.weight[...].astype(jnp.float32), x.ndim)).astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding, Hugging Face ("rotate half") layout.

    Args:
      x: `[B, T, H, D]` queries or keys.
      positions: `[B, T]` integer positions.
      theta: frequency base.
    Returns:
      `[B, T, H, D]`, same dtype as x.
    """
    half = x.shape[-1] // 2
    inv_freq = 1.0 / theta ** (jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions.astype(jnp.float32)[:, :, None, None] * inv_freq[None, None, None]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


@flax.struct.dataclass
class KVCache:
    """Preallocated keys/values of every layer: `keys[l], values[l]: [B, KVH, S, Dh]`.

    Slot s of row b holds the token at position s of that row; which slots are filled is
    bookkeeping of the caller (`jaxrl_llm.generation.DecodeState.lengths`). Heads lead the slots
    so that attention reads the cache as it lies: a decode step then moves no cache bytes
    besides the one slot it writes (a `[B, S, KVH, Dh]` layout cost a transpose of the whole
    cache per layer and step).
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]

    @classmethod
    def zeros(cls, config: ModelConfig, batch_size: int, max_len: int) -> "KVCache":
        shape = (batch_size, config.num_kv_heads, max_len, config.head_dim_)
        # Distinct buffers per layer and for keys/values: the cache is donated to jit.
        zeros = lambda: tuple(jnp.zeros(shape, config.jnp_dtype) for _ in range(config.num_layers))
        return cls(keys=zeros(), values=zeros())

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]


def _write_rows(cache: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """cache `[B, KVH, S, Dh]` with `new [B, KVH, T, Dh]` written at slots
    `[start[b], start[b] + T)`."""
    write = lambda c, n, i: jax.lax.dynamic_update_slice_in_dim(c, n, i, axis=1)
    return jax.vmap(write)(cache, new.astype(cache.dtype), start)


@flax.struct.dataclass
class BranchMask:
    """Attention of a packed sequence, built block by block from per-token ids (no `[T, T]` array).

    A packed row (`jaxrl_llm.packing`) is a trunk (the history, causal) with branches hung on
    it: token i sees key j <= i iff j is trunk, or j lies in i's branch and is either in the
    branch's shared part (leaf -1) or in i's own leaf. So a branch sees the history before it,
    the trunk after it never sees the branch, and the leaves of a branch (e.g. candidate
    actions after one question) never see each other.

    Attributes:
      branch: `[B, T]` int32, -1 on trunk tokens, else the branch id.
      leaf: `[B, T]` int32, -1 on a branch's shared part (and the trunk), else the leaf id.
    """

    branch: jax.Array
    leaf: jax.Array

    def block(self, start: int, end: int, keys: int) -> jax.Array:
        """`[B, end - start, keys]` bool mask of queries start..end-1 over keys 0..keys-1."""
        q_branch, q_leaf = self.branch[:, start:end, None], self.leaf[:, start:end, None]
        k_branch, k_leaf = self.branch[:, None, :keys], self.leaf[:, None, :keys]
        causal = (jnp.arange(start, end)[:, None] >= jnp.arange(keys)[None, :])[None]
        same = (k_branch == q_branch) & ((k_leaf < 0) | (k_leaf == q_leaf))
        return causal & ((k_branch < 0) | same)


def _mask_block(attn_mask, start: int, end: int, keys: int) -> jax.Array:
    if isinstance(attn_mask, BranchMask):
        return attn_mask.block(start, end, keys)
    return attn_mask[:, start:end, :keys]


def attention(q: jax.Array, k: jax.Array, v: jax.Array, attn_mask) -> jax.Array:
    """Causal grouped-query softmax attention, long query blocks in chunks.

    Args:
      q: `[B, T, H, Dh]` queries; k, v: `[B, KVH, S, Dh]` (the cache layout), KVH divides H.
      attn_mask: `[B, T, S]` bool, True where query t may attend to key s, or a `BranchMask`
        (no cache: S = T) whose blocks are built as they are needed. Causal contract:
        query t never sees a key beyond slot `S - T + t` (the T queries are the newest tokens;
        true without a cache, and with one whose read width covers every row's history + T).
    Returns:
      `[B, T, H, Dh]` in q's dtype (scores and softmax in float32).
    """
    t, s = q.shape[1], k.shape[2]
    if t <= _QUERY_CHUNK:
        return _attention(q, k, v, _mask_block(attn_mask, 0, t, s))
    # Query block i reads only the keys its queries can see: a long causal prefill skips most of
    # the masked upper triangle (~3/8 of the score work at T = S = 4 blocks), in smaller blocks.
    blocks = []
    for start in range(0, t, _QUERY_CHUNK):
        end = min(start + _QUERY_CHUNK, t)
        keys = s - t + end
        blocks.append(_attention(q[:, start:end], k[:, :, :keys], v[:, :, :keys],
                                 _mask_block(attn_mask, start, end, keys)))
    return jnp.concatenate(blocks, axis=1)


def _attention(q: jax.Array, k: jax.Array, v: jax.Array, attn_mask: jax.Array) -> jax.Array:
    """`attention` over every key given: q `[B, T, H, Dh]`, k/v `[B, KVH, S, Dh]`, mask `[B, T, S]`."""
    b, t, h, hd = q.shape
    kvh, groups = k.shape[1], h // k.shape[1]
    # Heads sharing a KV head are stacked along the query axis: [B, KVH, G*T, Dh]. With batch
    # and head dims leading, XLA's CPU dot kernels run ~30% faster than a 5-d einsum.
    q = q.reshape(b, t, kvh, groups, hd).transpose(0, 2, 3, 1, 4).reshape(b, kvh, groups * t, hd)
    v = v.astype(q.dtype)
    scores = jnp.einsum("bkqd,bksd->bkqs", q, k.astype(q.dtype),
                        preferred_element_type=jnp.float32) / jnp.sqrt(hd).astype(jnp.float32)
    scores = scores.reshape(b, kvh, groups, t, -1)
    scores = jnp.where(attn_mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype).reshape(b, kvh, groups * t, -1)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, v)  # [B, KVH, G*T, Dh]
    return out.reshape(b, kvh, groups, t, hd).transpose(0, 3, 1, 2, 4).reshape(b, t, h, hd)


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        d, h, kvh, hd = config.d_model, config.num_heads, config.num_kv_heads, config.head_dim_
        pd = config.jnp_param_dtype
        self.q_proj = Linear(d, h * hd, use_bias=config.qkv_bias, param_dtype=pd, rngs=rngs)
        self.k_proj = Linear(d, kvh * hd, use_bias=config.qkv_bias, param_dtype=pd, rngs=rngs)
        self.v_proj = Linear(d, kvh * hd, use_bias=config.qkv_bias, param_dtype=pd, rngs=rngs)
        self.o_proj = Linear(h * hd, d, param_dtype=pd, rngs=rngs)

    def __call__(self, x, positions, attn_mask, kv=None):
        """x `[B, T, D]`, attn_mask `[B, T, S]`; kv = (keys, values) `[B, KVH, S, Dh]` or None."""
        cfg = self.config
        b, t, _ = x.shape
        kvh, hd = cfg.num_kv_heads, cfg.head_dim_
        q = rope(self.q_proj(x).reshape(b, t, cfg.num_heads, hd), positions, cfg.rope_theta)
        k = rope(self.k_proj(x).reshape(b, t, kvh, hd), positions, cfg.rope_theta)
        k, v = k.transpose(0, 2, 1, 3), self.v_proj(x).reshape(b, t, kvh, hd).transpose(0, 2, 1, 3)
        if kv is not None:
            k, v = _write_rows(kv[0], k, positions[:, 0]), _write_rows(kv[1], v, positions[:, 0])
        # Callers may restrict attention to the filled cache prefix.
        width = (attn_mask.branch.shape[1] if isinstance(attn_mask, BranchMask)
                 else attn_mask.shape[-1])
        out = attention(q, k[:, :, :width], v[:, :, :width], attn_mask)
        return self.o_proj(out.reshape(b, t, cfg.num_heads * hd)), (k, v)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, f, pd = config.d_model, config.ffn_dim, config.jnp_param_dtype
        self.gate_proj = Linear(d, f, param_dtype=pd, rngs=rngs)
        self.up_proj = Linear(d, f, param_dtype=pd, rngs=rngs)
        self.down_proj = Linear(f, d, param_dtype=pd, rngs=rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        pd = config.jnp_param_dtype
        self.input_layernorm = RMSNorm(config.d_model, config.rms_eps, param_dtype=pd)
        self.self_attn = Attention(config, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.d_model, config.rms_eps, param_dtype=pd)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x, positions, attn_mask, kv=None):
        attn_out, kv = self.self_attn(self.input_layernorm(x), positions, attn_mask, kv)
        x = x + attn_out
        return x + self.mlp(self.post_attention_layernorm(x)), kv


def _run_block(block: Block, x, positions, attn_mask, kv):
    return block(x, positions, attn_mask, kv)


def _run_block_remat(block: Block, x, positions, attn_mask, kv):
    """`_run_block` whose activations are recomputed in the backward pass (jax.checkpoint).

    The block is split into pure state so that the checkpointed function has no side effects;
    its RNG state (LoRA dropout) is carried out and written back.
    """
    graphdef, state = nnx.split(block)

    @jax.checkpoint
    def run(state, x, positions, attn_mask, kv):
        block = nnx.merge(graphdef, state)
        return block(x, positions, attn_mask, kv), nnx.state(block, nnx.RngState)

    out, rng_state = run(state, x, positions, attn_mask, kv)
    nnx.update(block, rng_state)
    return out


class Transformer(nnx.Module):
    """The decoder. `__call__` returns `(logits [B, T, V] float32, hidden [B, T, D], cache)`."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        pd = config.jnp_param_dtype
        self.embed_tokens = Embed(config.vocab_size, config.d_model, param_dtype=pd, rngs=rngs)
        self.layers = nnx.List([Block(config, rngs=rngs) for _ in range(config.num_layers)])
        self.norm = RMSNorm(config.d_model, config.rms_eps, param_dtype=pd)
        self.lm_head = (None if config.tie_embeddings else
                        Linear(config.d_model, config.vocab_size, param_dtype=pd, rngs=rngs))

    def hidden_states(self, tokens: jax.Array, positions: jax.Array, attn_mask: jax.Array,
                      cache: KVCache | None = None, *, remat: bool = False
                      ) -> tuple[jax.Array, KVCache | None]:
        """Final (normed) hidden states `[B, T, D]` and the updated cache.

        Args:
          tokens: `[B, T]` int token ids.
          positions: `[B, T]` int RoPE positions of the tokens.
          attn_mask: `[B, T, S]` bool, True where token t may attend to key s, or a `BranchMask`
            (packed sequences, no cache); S = T without a cache; with one, S <= cache.max_len and only the first S slots are read (so a
            prefill into an emptier cache need not touch its empty tail).
          cache: optional `KVCache`; row b's new keys/values are written at slots
            `[positions[b, 0], positions[b, 0] + T)` (positions of a chunk must be contiguous,
            and the caller checks that they fit: XLA clamps out-of-range writes).
          remat: recompute each block's activations in the backward pass (`jax.checkpoint`), trading
            compute for memory when training on long prompts.
        """
        if not isinstance(tokens, jax.core.Tracer):  # concrete input: check before any work
            check_tokens(tokens, self.config.vocab_size)
        x = self.embed_tokens(tokens, self.config.jnp_dtype)
        run = _run_block_remat if remat else _run_block
        new_keys, new_values = [], []
        for i, layer in enumerate(self.layers):
            kv = None if cache is None else (cache.keys[i], cache.values[i])
            x, (k, v) = run(layer, x, positions, attn_mask, kv)
            new_keys.append(k)
            new_values.append(v)
        if cache is not None:
            cache = KVCache(keys=tuple(new_keys), values=tuple(new_values))
        return self.norm(x), cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """`[..., D]` hidden states -> `[..., V]` float32 logits."""
        head = self.embed_tokens.attend if self.lm_head is None else self.lm_head
        return head(hidden).astype(jnp.float32)

    def __call__(self, tokens, positions, attn_mask, cache=None):
        hidden, cache = self.hidden_states(tokens, positions, attn_mask, cache)
        return self.logits(hidden), hidden, cache


def get_submodule(module: nnx.Module, dotted: str):
    """`get_submodule(model, "layers.3.self_attn.q_proj")`: attribute / list-index walk."""
    for part in dotted.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module


def check_tokens(tokens, vocab_size: int) -> None:
    """Raise if concrete `tokens` fall outside `[0, vocab_size)` (jnp.take would clamp silently)."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(f"token ids must be in [0, {vocab_size}), got min {tokens.min()} max "
                         f"{tokens.max()}: out of the vocabulary of this model")


def causal_mask(token_mask: jax.Array) -> jax.Array:
    """`[B, T]` validity mask -> `[B, T, T]` attention mask (causal, padded keys hidden).

    Padded query rows keep their own diagonal so no softmax row is empty.
    """
    t = token_mask.shape[1]
    causal = jnp.tril(jnp.ones((t, t), bool))
    keys = token_mask.astype(bool)[:, None, :] | jnp.eye(t, dtype=bool)[None]
    return causal[None] & keys


def positions_from_mask(token_mask: jax.Array) -> jax.Array:
    """`[B, T]` validity mask -> `[B, T]` positions counting real tokens only (left padding ok)."""
    return jnp.maximum(jnp.cumsum(token_mask.astype(jnp.int32), axis=1) - 1, 0)
