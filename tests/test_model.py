"""The decoder computes the same function as transformers' Llama/Qwen2 (torch, float32, CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from jaxrl_llm.model import ModelConfig, Transformer, causal_mask, load_model, positions_from_mask
from jaxrl_llm.model import llama
from jaxrl_llm.model.loading import save_hf_dir

TEXTWORLD_PROMPT = (
    "# TASK: You are hungry! Let's cook a delicious meal. Check the cookbook in the kitchen for "
    "the recipe. Once done, enjoy your meal!\nChoose exactly one valid action.\n# STEP 0 \nObs: "
    "You are in the kitchen. In one part of the room you see a stove. There is also an oven. You "
    "also see a fridge that is closed. In another part of the room you see a counter that has a "
    "red apple, and a cookbook on it. In one part of the room you see a dining table, that has "
    "nothing on it. There is also a cutlery drawer that is closed. You also see a trash can that "
    "is closed. In another part of the room you see a dishwasher that is closed. \nTo the North "
    "you see a closed sliding patio door. To the South you see a closed frosted-glass door. "
    "\nAction: look around\n# STEP 1 \nObs: You are in the kitchen. In one part of the room you "
    "see a stove. There is also an oven. You also see a fridge that is closed. In another part of "
    "the room you see a counter that has a red apple, and a cookbook on it.\nAction: take "
    "cookbook\n# STEP 2 \nObs: You take the cookbook.\nValid actions: look around, inventory, "
    "read cookbook, open fridge, open cutlery drawer, take red apple, move north\nAction: ")


def forward(model, tokens, mask=None):
    tokens = jnp.asarray(tokens)
    mask = jnp.ones(tokens.shape, bool) if mask is None else jnp.asarray(mask, bool)
    logits, hidden, _ = model(tokens, positions_from_mask(mask), causal_mask(mask))
    return np.asarray(logits), np.asarray(hidden)


def torch_logits(hf_model, tokens, mask=None):
    with torch.no_grad():
        out = hf_model(input_ids=torch.as_tensor(np.asarray(tokens)),
                       attention_mask=None if mask is None else torch.as_tensor(np.asarray(mask)))
    return out.logits.float().numpy()


def rel_max_err(ours, ref):
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


@pytest.mark.parametrize("model_type,overrides", [
    ("llama", dict(tie_embeddings=True)),
    ("llama", dict(tie_embeddings=False)),
    ("qwen2", dict(tie_embeddings=False, qkv_bias=True)),
])
def test_tiny_safetensors_parity(tmp_path, model_type, overrides):
    config = ModelConfig.tiny(**overrides)
    model = Transformer(config, rngs=nnx.Rngs(0))
    if config.qkv_bias:  # non-zero biases so that a mis-mapped bias would show
        for layer in model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias[...] = 0.1 * jax.random.normal(jax.random.key(1), proj.bias.shape)
    save_hf_dir(str(tmp_path), config, model, model_type=model_type)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), dtype=torch.float32).eval()
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 40))
    ref = torch_logits(hf_model, tokens)

    loaded = load_weights_only(tmp_path)
    np.testing.assert_allclose(forward(model, tokens)[0], ref, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(forward(loaded, tokens)[0], ref, atol=1e-5, rtol=1e-4)


def load_weights_only(path):
    """The directory has no tokenizer files: load config + weights through the same code path."""
    from jaxrl_llm.model.loading import _read_hf_dir, build_model

    config, weights = _read_hf_dir(str(path), dict(param_dtype="float32", dtype="float32"))
    return build_model(config, weights)


@pytest.mark.parametrize("quantize", ["int8", "int8-all"])
def test_quantize_on_load_equals_quantizing_the_loaded_model(tmp_path, quantize):
    """`build_model(..., quantize=)` quantizes each layer as it is filled (a lean load): the
    result must be the float model quantized afterwards, bit for bit (biases included)."""
    from jaxrl_llm.model.loading import _read_hf_dir, build_model
    from jaxrl_llm.model.quant import quantize_model

    config = ModelConfig.tiny(qkv_bias=True, tie_embeddings=False)
    model = Transformer(config, rngs=nnx.Rngs(0))
    save_hf_dir(str(tmp_path), config, model, model_type="qwen2")
    _, weights = _read_hf_dir(str(tmp_path), dict(param_dtype="float32", dtype="float32"))
    lean = build_model(config, weights, quantize=quantize)
    after = quantize_model(build_model(config, weights), embeddings=quantize == "int8-all")
    assert nnx.graphdef(lean) == nnx.graphdef(after)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(lean), nnx.state(after))
    with pytest.raises(ValueError, match="quantize must be one of"):
        build_model(config, weights, quantize="int4")


def test_left_padding_matches_unpadded_rows():
    config = ModelConfig.tiny()
    model = Transformer(config, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    lengths = [12, 7, 3]
    width = max(lengths)
    tokens = np.zeros((len(lengths), width), np.int32)
    mask = np.zeros((len(lengths), width), bool)
    for row, n in enumerate(lengths):
        tokens[row, width - n:] = rng.integers(0, config.vocab_size, n)
        mask[row, width - n:] = True
    padded, _ = forward(model, tokens, mask)
    for row, n in enumerate(lengths):
        alone, _ = forward(model, tokens[row:row + 1, width - n:])
        np.testing.assert_allclose(padded[row, width - n:], alone[0], atol=1e-5, rtol=1e-5)


def test_query_chunked_attention_equals_one_block():
    """Long query blocks are split (`llama._QUERY_CHUNK`) and read only the keys they can see."""
    rng = np.random.default_rng(0)
    t, s, history = 600, 704, np.array([100, 37])  # rows already hold 100 and 37 tokens
    q = jnp.asarray(rng.normal(size=(2, t, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, 2, s, 8)), jnp.float32) for _ in range(2))
    mask = jnp.asarray(np.arange(s)[None, None] <= history[:, None, None] + np.arange(t)[None, :, None])
    assert t > llama._QUERY_CHUNK
    np.testing.assert_allclose(np.asarray(llama.attention(q, k, v, mask)),
                               np.asarray(llama._attention(q, k, v, mask)), atol=1e-6)


def test_bfloat16_params_close_to_float32():
    config = ModelConfig.tiny()
    model32 = Transformer(config, rngs=nnx.Rngs(0))
    model16 = Transformer(config.replace(param_dtype="bfloat16", dtype="bfloat16"),
                          rngs=nnx.Rngs(0))
    assert model16.layers[0].mlp.up_proj.kernel.dtype == jnp.bfloat16
    tokens = np.arange(20)[None] % config.vocab_size
    l32, _ = forward(model32, tokens)
    l16, _ = forward(model16, tokens)
    assert l16.dtype == np.float32
    assert rel_max_err(l16, l32) < 5e-2


@pytest.mark.parametrize("overrides,message", [
    (dict(num_heads=5), "must divide d_model"),
    (dict(num_kv_heads=3), "must divide num_heads"),
    (dict(num_layers=0), "num_layers must be >= 1"),
    (dict(param_dtype="float16"), "param_dtype must be one of"),
])
def test_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.tiny(**overrides)


def test_tokens_out_of_vocab_error():
    config = ModelConfig.tiny()
    model = Transformer(config, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="out of the vocabulary"):
        forward(model, np.array([[1, config.vocab_size]]))


def test_missing_path_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "nope.gguf"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(str(tmp_path))


def test_unsupported_gguf_architecture(tmp_path):
    import gguf

    path = str(tmp_path / "gpt2.gguf")
    writer = gguf.GGUFWriter(path, "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="'gpt2' is not supported; supported: llama"):
        load_model(path)


# ---------------------------------------------------------------- the real default model

def real_prompts(tokenizer):
    story = ("The quick brown fox jumps over the lazy dog while the farmer counts his sheep "
             "and the river keeps flowing to the sea. ")
    code = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fib"
    prompts = [TEXTWORLD_PROMPT, story * 22, code * 12,
               tokenizer.apply_chat_template([{"role": "user", "content": story * 38}],
                                             tokenize=False, add_generation_prompt=True)]
    return [tokenizer(p, return_tensors="np").input_ids for p in prompts]


@pytest.mark.real_model
def test_real_model_logit_parity(smollm2, smollm2_torch):
    config, model, tokenizer = smollm2
    assert (config.num_layers, config.d_model, config.num_heads, config.num_kv_heads) == (
        30, 576, 9, 3)
    lengths = []
    for tokens in real_prompts(tokenizer):
        lengths.append(tokens.shape[1])
        ours, _ = forward(model, tokens)
        ref = torch_logits(smollm2_torch, tokens)
        assert rel_max_err(ours, ref) <= 1e-3
        np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))
    assert min(lengths) >= 200 and max(lengths) <= 1000 and max(lengths) >= 700, lengths
