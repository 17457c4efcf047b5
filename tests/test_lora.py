"""Int8 quantization, LoRA adapters, merge, and the jitted train step (only adapters move)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrl_llm.logprobs import token_logprobs
from jaxrl_llm.model import ModelConfig, Transformer, causal_mask, positions_from_mask
from jaxrl_llm.model.lora import LoraConfig, LoRALinear, apply_lora, lora_layers, merge_lora
from jaxrl_llm.model.quant import (Int8Linear, QuantizedWeight, parameter_bytes, quantize_int8,
                                   quantize_model)
from jaxrl_llm.train.step import OptimConfig, Trainer, make_optimizer


def logits_of(model, tokens):
    tokens = jnp.asarray(tokens)
    mask = jnp.ones(tokens.shape, bool)
    return np.asarray(model(tokens, positions_from_mask(mask), causal_mask(mask))[0])


def tiny(seed=0, **overrides):
    return Transformer(ModelConfig.tiny(**overrides), rngs=nnx.Rngs(seed))


def next_token_loss(model, batch):
    """Summed next-token NLL over masked positions: (loss_sum, count, metric sums)."""
    tokens, mask = batch["tokens"], batch["mask"]
    logits = model(tokens, positions_from_mask(mask), causal_mask(mask))[0]
    logp = token_logprobs(logits[:, :-1], tokens[:, 1:])
    target_mask = mask[:, 1:].astype(jnp.float32)
    loss_sum = -jnp.sum(logp * target_mask)
    # A row mean beside the token mean: a (sum, count) pair is divided by its own count.
    row_logp = (-jnp.sum(logp * target_mask), jnp.float32(len(tokens)))
    return loss_sum, jnp.sum(target_mask), {"loss": loss_sum, "row_nll": row_logp}


TOKENS = np.random.default_rng(0).integers(0, 256, (2, 24)).astype(np.int32)


def test_quantize_int8_error_bound_and_linear():
    kernel = jax.random.normal(jax.random.key(0), (64, 32)) * jnp.linspace(0.1, 3, 32)[None]
    q, scale = quantize_int8(kernel)
    assert q.dtype == jnp.int8 and scale.shape == (32,)
    err = np.abs(np.asarray(q, np.float32) * np.asarray(scale)[None] - np.asarray(kernel))
    assert np.all(err <= np.asarray(scale)[None] / 2 + 1e-7)
    x = jax.random.normal(jax.random.key(1), (3, 64))
    layer = Int8Linear(q, scale)
    ref = np.asarray(x) @ (np.asarray(q, np.float32) * np.asarray(scale)[None])
    np.testing.assert_allclose(np.asarray(layer(x)), ref, rtol=1e-5, atol=1e-5)


def test_quantized_model_close_to_float_and_smaller():
    model = tiny()
    ref = logits_of(model, TOKENS)
    float_bytes = parameter_bytes(model)
    quantize_model(model, embeddings=True)
    assert isinstance(model.layers[0].self_attn.q_proj, Int8Linear)
    # int8 everywhere except the norms and scales: about a quarter of float32.
    assert parameter_bytes(model) < 0.3 * float_bytes
    np.testing.assert_allclose(logits_of(model, TOKENS), ref, atol=0.05 * np.abs(ref).max())


@pytest.mark.parametrize("quantized", [False, True])
def test_fresh_lora_is_identity_and_merge_is_exact(quantized):
    model = tiny()
    if quantized:
        quantize_model(model)
    base = logits_of(model, TOKENS)
    apply_lora(model, LoraConfig(rank=4, alpha=32), nnx.Rngs(1))
    assert len(lora_layers(model)) == 7 * model.config.num_layers
    np.testing.assert_array_equal(logits_of(model, TOKENS), base)
    for layer in lora_layers(model).values():  # make the adapters matter
        layer.lora_b[...] = 0.05 * jax.random.normal(jax.random.key(2), layer.lora_b.shape)
    adapted = logits_of(model, TOKENS)
    assert np.abs(adapted - base).max() > 1e-2
    merge_lora(model)
    assert not lora_layers(model)
    np.testing.assert_allclose(logits_of(model, TOKENS), adapted, atol=2e-5, rtol=1e-4)


def test_lora_scaling_matches_manual():
    model = tiny()
    base = model.layers[0].mlp.up_proj
    base_kernel = np.asarray(base.kernel[...])
    layer = LoRALinear(base, LoraConfig(rank=2, alpha=6.0), rngs=nnx.Rngs(0))
    layer.lora_b[...] = jax.random.normal(jax.random.key(3), layer.lora_b.shape)
    x = np.random.default_rng(1).normal(size=(5, 64)).astype(np.float32)
    a, b = np.asarray(layer.lora_a[...]), np.asarray(layer.lora_b[...])
    manual = x @ base_kernel + (6.0 / 2) * (x @ a) @ b
    np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x))), manual, rtol=1e-5, atol=1e-5)


def test_only_adapters_train_and_loss_decreases():
    model = tiny()
    quantize_model(model)
    apply_lora(model, LoraConfig(rank=8, alpha=16), nnx.Rngs(1))
    frozen_before = jax.tree.map(np.asarray, nnx.state(model, QuantizedWeight))
    trainer = Trainer(model, make_optimizer(OptimConfig(learning_rate=1e-2, weight_decay=0.0)),
                      next_token_loss)
    state = trainer.init()
    lora_before = jax.tree.map(np.asarray, state.trainable)
    # Two micro-batches of one sequence each: [M=2, b=1, T].
    batch = {"tokens": jnp.asarray(TOKENS)[:, None], "mask": jnp.ones((2, 1, 24), bool)}
    losses = []
    for _ in range(30):
        state, metrics = trainer.step(state, batch)
        losses.append(float(metrics["loss"]))
    # The tiny tied-embedding model cannot be confident (frozen norms, std-0.02 embeddings), so
    # its loss floor is ~4.3 nats: a clear monotone drop is the signal.
    assert losses[-1] < 0.85 * losses[0] and all(np.diff(losses) < 0)
    trained = trainer.model(state)
    frozen_after = jax.tree.map(np.asarray, nnx.state(trained, QuantizedWeight))
    jax.tree.map(np.testing.assert_array_equal, frozen_before, frozen_after)
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), lora_before,
                           jax.tree.map(np.asarray, state.trainable))
    assert all(jax.tree.leaves(changed))
    # The optimizer state holds only adapter-shaped moments: nothing for the base.
    n_trainable = sum(x.size for x in jax.tree.leaves(state.trainable))
    n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert n_opt == 2 * n_trainable


def test_micro_batches_give_the_token_mean():
    """One batch of 2 rows and 2 micro-batches of 1 row produce the same update."""
    def run(batch):
        model = tiny()
        apply_lora(model, LoraConfig(), nnx.Rngs(1))
        trainer = Trainer(model, make_optimizer(OptimConfig(learning_rate=1e-3)), next_token_loss)
        state, metrics = trainer.step(trainer.init(), batch)
        return jax.tree.map(np.asarray, state.trainable), metrics

    mask = np.ones((2, 24), bool)
    mask[1, :10] = False  # rows of different lengths: a mean of means would differ
    whole, m1 = run({"tokens": jnp.asarray(TOKENS)[None], "mask": jnp.asarray(mask)[None]})
    split, m2 = run({"tokens": jnp.asarray(TOKENS)[:, None], "mask": jnp.asarray(mask)[:, None]})
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), whole, split)
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-5)
    # Per-row NLL summed over the two rows / 2 rows == token mean x tokens / 2.
    tokens = mask[:, 1:].sum()
    np.testing.assert_allclose(float(m2["row_nll"]), float(m1["loss"]) * tokens / 2, rtol=1e-5)
    np.testing.assert_allclose(float(m1["row_nll"]), float(m2["row_nll"]), rtol=1e-5)


def test_remat_gives_the_same_gradients():
    model = tiny()
    apply_lora(model, LoraConfig(), nnx.Rngs(1))
    graphdef, trainable, rest = nnx.split(model, nnx.LoRAParam, ...)
    tokens = jnp.asarray(TOKENS)
    mask = jnp.ones(tokens.shape, bool)

    def loss(trainable, remat):
        m = nnx.merge(graphdef, trainable, rest)
        hidden, _ = m.hidden_states(tokens, positions_from_mask(mask), causal_mask(mask),
                                    remat=remat)
        return -jnp.sum(token_logprobs(m.logits(hidden)[:, :-1], tokens[:, 1:]))

    g1 = jax.jit(jax.grad(loss), static_argnums=1)(trainable, False)
    g2 = jax.jit(jax.grad(loss), static_argnums=1)(trainable, True)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g1, g2)


def test_remat_shrinks_the_train_step_temporaries():
    """The Trainer's gradient program with remat needs far fewer temporary bytes: on CPU, XLA's
    default scheduler ran the recomputation with the forward, which saved nothing."""
    from jaxrl_llm.train.sft import completion_loss
    from jaxrl_llm.train.step import shard_batch

    model = apply_lora(tiny(num_layers=6, ffn_dim=256), LoraConfig(), nnx.Rngs(1))
    micro = {"prompt": np.ones((1, 384), np.int32), "prompt_mask": np.ones((1, 384), bool),
             "completion": np.ones((1, 8), np.int32), "completion_mask": np.ones((1, 8), bool)}
    temp = {}
    for remat in (False, True):
        trainer = Trainer(model, make_optimizer(OptimConfig()),
                          lambda m, b, remat=remat: completion_loss(m, b, remat=remat))
        state, micro = trainer.init(), shard_batch(trainer.mesh, micro)
        shapes = jax.eval_shape(trainer._micro_grads, state.trainable, state.rng, trainer.frozen,
                                micro)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes[:3])
        compiled = trainer._accumulate.lower(zeros, state.trainable, state.rng, trainer.frozen,
                                             micro).compile()
        temp[remat] = compiled.memory_analysis().temp_size_in_bytes
    assert temp[True] < 0.6 * temp[False], temp


def test_top_layers_adapt_only_those_layers_and_only_they_train():
    model = apply_lora(tiny(num_layers=4), LoraConfig.top_layers(2, 4), nnx.Rngs(1))
    assert {path.split(".")[1] for path in lora_layers(model)} == {"2", "3"}
    assert len(lora_layers(model)) == 2 * len(LoraConfig().targets)
    trainer = Trainer(model, make_optimizer(OptimConfig(learning_rate=1e-2)), next_token_loss)
    state = trainer.init()
    before = jax.tree.map(np.asarray, state.trainable)
    batch = {"tokens": jnp.asarray(TOKENS)[:, None], "mask": jnp.ones((2, 1, 24), bool)}
    state, _ = trainer.step(state, batch)
    # Every adapter of the top layers moved (B starts at zero: a gradient reached it).
    moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), before,
                         jax.tree.map(np.asarray, state.trainable))
    assert all(jax.tree.leaves(moved))
    assert LoraConfig.top_layers(0, 4).layers is None


def test_bad_lora_layers():
    for layers in ((), (-1, 2)):
        with pytest.raises(ValueError, match=r"layers must be None \(all\) or layer indices"):
            LoraConfig(layers=layers)
    with pytest.raises(ValueError, match=r"top layers must be in \[0, 4\]"):
        LoraConfig.top_layers(5, 4)
    with pytest.raises(ValueError, match="past the model's last, 3"):
        apply_lora(tiny(num_layers=4), LoraConfig(layers=(1, 4)), nnx.Rngs(1))


@pytest.mark.parametrize("kwargs,message", [
    (dict(rank=0), "rank must be >= 1"),
    (dict(alpha=0.0), "alpha must be > 0"),
    (dict(targets=("q_proj", "qkv")), r"unknown LoRA target module\(s\) \['qkv'\]"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
])
def test_bad_lora_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(**kwargs)


def test_trainer_without_adapters_errors():
    with pytest.raises(ValueError, match="no trainable parameters"):
        Trainer(tiny(), make_optimizer(OptimConfig()), next_token_loss)


@pytest.mark.real_model
@pytest.mark.parametrize("embeddings", [False, True])
def test_real_model_int8_quality(smollm2, embeddings):
    """KL(float || int8) of next-token distributions on a TextWorld prompt.

    Measured: mean 0.0029 nats/token (linear layers) and 0.0042 (embedding too), greedy agreement
    98.9% / 98.0% over 352 positions. The bound, 0.01 nats, leaves ~3x headroom for platform
    differences; a real bug (e.g. the scale on the wrong axis) costs whole nats.
    """
    from tests.test_model import TEXTWORLD_PROMPT

    _, model, tokenizer = smollm2
    tokens = tokenizer(TEXTWORLD_PROMPT, return_tensors="np").input_ids
    quantized = quantize_model(nnx.clone(model), embeddings=embeddings)
    logp_float = jax.nn.log_softmax(logits_of(model, tokens)[0])
    logp_int8 = jax.nn.log_softmax(logits_of(quantized, tokens)[0])
    kl = np.sum(np.exp(logp_float) * (logp_float - logp_int8), axis=-1)
    assert float(kl.mean()) < 0.01
    assert np.mean(logp_float.argmax(-1) == logp_int8.argmax(-1)) > 0.95


def test_init_states_do_not_share_donated_buffers():
    model = tiny()
    apply_lora(model, LoraConfig(), nnx.Rngs(1))
    trainer = Trainer(model, make_optimizer(OptimConfig()), next_token_loss)
    reference = trainer.model(trainer.init())
    state = trainer.init()
    batch = {"tokens": jnp.asarray(TOKENS)[:, None], "mask": jnp.ones((2, 1, 24), bool)}
    trainer.step(state, batch)  # donates `state`
    logits_of(reference, TOKENS)  # the reference still owns live arrays
