"""token_logprobs / entropy_from_logits against float64 numpy references and hand cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm.logprobs import entropy_from_logits, token_logprobs

# Most checks run jitted: one compile per shape instead of one per primitive (eager), several
# times faster on CPU; jit == eager is tested on its own.
jit_entropy = jax.jit(entropy_from_logits)
jit_logprobs = jax.jit(token_logprobs)


def log_softmax64(logits):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def entropy64(logits):
    logp = log_softmax64(logits)
    p = np.exp(logp)
    return -np.sum(np.where(p > 0, p * logp, 0.0), -1)


def random_logits(seed, shape=(3, 5, 11), scale=3.0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=shape) * scale).astype(np.float32), rng


def test_token_logprobs_equal_numpy_log_softmax():
    logits, rng = random_logits(0)
    targets = rng.integers(0, 11, (3, 5))
    ref = np.take_along_axis(log_softmax64(logits), targets[..., None], -1)[..., 0]
    out = jit_logprobs(jnp.asarray(logits), jnp.asarray(targets))
    assert out.shape == (3, 5) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)
    # Candidate scoring shape: [B, C, L, V] logits, [B, C, L] targets.
    candidates = jit_logprobs(logits.reshape(3, 5, 1, 11), targets.reshape(3, 5, 1))
    np.testing.assert_allclose(np.asarray(candidates)[..., 0], ref, atol=1e-5)


def test_token_logprobs_are_a_distribution_over_the_vocabulary():
    logits, _ = random_logits(1, (2, 3, 7))
    every_target = np.broadcast_to(np.arange(7), (2, 3, 7)).transpose(2, 0, 1)  # [V, B, T]
    logps = np.stack([np.asarray(jit_logprobs(logits, t)) for t in every_target])
    np.testing.assert_allclose(np.exp(logps).sum(0), 1.0, atol=1e-5)


@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
def test_temperature_divides_the_logits(temperature):
    logits, rng = random_logits(2)
    targets = rng.integers(0, 11, (3, 5))
    ref = np.take_along_axis(log_softmax64(logits / temperature), targets[..., None], -1)[..., 0]
    out = token_logprobs(logits, targets, temperature=temperature)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)
    traced = jit_logprobs(logits, targets, jnp.float32(temperature))
    np.testing.assert_allclose(np.asarray(traced), ref, atol=1e-5)


def test_bf16_logits_give_float32_logprobs_of_the_bf16_values():
    logits, rng = random_logits(3)
    targets = rng.integers(0, 11, (3, 5))
    bf16 = jnp.asarray(logits, jnp.bfloat16)
    out = jit_logprobs(bf16, targets)
    assert out.dtype == jnp.float32
    ref = np.take_along_axis(log_softmax64(np.asarray(bf16.astype(jnp.float32))),
                             targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)


def test_large_logits_and_masked_vocabulary_stay_finite():
    logits, rng = random_logits(4)
    targets = rng.integers(0, 5, (3, 5))
    shifted = jit_logprobs(logits + 1e4, targets)  # softmax is shift invariant
    np.testing.assert_allclose(np.asarray(shifted), np.asarray(jit_logprobs(logits, targets)),
                               atol=2e-3)  # float32 spacing at 1e4 is ~1e-3
    masked = logits.copy()
    masked[..., 5:] = -np.inf  # top-k style filtering: only the first 5 tokens are allowed
    out = np.asarray(jit_logprobs(masked, targets))
    ref = np.take_along_axis(log_softmax64(logits[..., :5]), targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(out, ref, atol=1e-5)
    assert np.all(np.isneginf(np.asarray(jit_logprobs(masked, np.full((3, 5), 7)))))


def test_token_logprobs_gradient_is_onehot_minus_softmax():
    logits, rng = random_logits(5, (2, 3, 6))
    targets = rng.integers(0, 6, (2, 3))
    grad = jax.jit(jax.grad(lambda z: jnp.sum(token_logprobs(z, targets, temperature=2.0))))(
        logits)
    ref = (np.eye(6)[targets] - np.exp(log_softmax64(logits / 2.0))) / 2.0
    np.testing.assert_allclose(np.asarray(grad), ref, atol=1e-5)


def test_token_logprobs_jit_equals_eager_and_checks_arguments():
    logits, rng = random_logits(6)
    targets = rng.integers(0, 11, (3, 5))
    np.testing.assert_allclose(np.asarray(jit_logprobs(logits, targets)),
                               np.asarray(token_logprobs(logits, targets)), atol=1e-6)
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        token_logprobs(logits, targets, temperature=0)
    with pytest.raises(AssertionError):
        token_logprobs(logits, targets[:, :4])  # target and logit positions must line up


def test_entropy_equals_numpy_reference_any_leading_dims():
    for shape in [(9,), (4, 9), (2, 3, 9), (2, 2, 3, 9)]:
        logits, _ = random_logits(7, shape)
        out = jit_entropy(jnp.asarray(logits, jnp.bfloat16))
        assert out.shape == shape[:-1] and out.dtype == jnp.float32
        bf16_values = np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32))
        np.testing.assert_allclose(np.asarray(out), entropy64(bf16_values), atol=1e-5)


def test_entropy_hand_cases_large_vocabulary():
    vocab = 32_000
    uniform = jit_entropy(jnp.zeros((2, vocab)))
    np.testing.assert_allclose(np.asarray(uniform), np.log(vocab), rtol=1e-6)
    one_hot = np.full((1, vocab), -np.inf, np.float32)
    one_hot[0, 123] = 5.0
    assert float(jit_entropy(one_hot)[0]) == 0.0
    two = np.full((1, vocab), -np.inf, np.float32)
    two[0, :2] = 1e4  # two equal, huge logits: exactly log 2
    np.testing.assert_allclose(float(jit_entropy(two)[0]), np.log(2.0), rtol=1e-6)


def test_entropy_with_masked_logits_has_finite_exact_gradient():
    logits, _ = random_logits(8, (3, 8))
    masked = logits.copy()
    masked[:, 4:] = -np.inf
    np.testing.assert_allclose(np.asarray(entropy_from_logits(masked)),
                               entropy64(logits[:, :4]), atol=1e-5)
    grad = np.asarray(jax.jit(jax.grad(lambda z: jnp.sum(entropy_from_logits(z))))(masked))
    assert np.all(np.isfinite(grad)) and np.all(grad[:, 4:] == 0)
    # dH/dz_i = -p_i (log p_i + H): the analytic gradient on the unmasked tokens.
    logp = log_softmax64(logits[:, :4])
    ref = -np.exp(logp) * (logp + entropy64(logits[:, :4])[:, None])
    np.testing.assert_allclose(grad[:, :4], ref, atol=1e-5)
    np.testing.assert_allclose(np.asarray(jit_entropy(masked)),
                               np.asarray(entropy_from_logits(masked)), atol=1e-6)


def test_chunked_head_equals_the_whole_head_in_value_and_gradient():
    from flax import nnx

    from jaxrl_llm.logprobs import head_logprobs
    from jaxrl_llm.model import ModelConfig, Transformer

    model = Transformer(ModelConfig.tiny(vocab_size=64), rngs=nnx.Rngs(0))
    hidden = jax.random.normal(jax.random.key(1), (2, 11, model.config.d_model))
    targets = jax.random.randint(jax.random.key(2), (2, 11), 0, 64)

    def whole(hidden):
        logits = model.logits(hidden)
        return token_logprobs(logits, targets), entropy_from_logits(logits)

    chunked = lambda hidden: head_logprobs(model, hidden, targets, chunk=4)  # 11 = 4 + 4 + 3
    for got, want in zip(chunked(hidden), whole(hidden)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    loss = lambda f: lambda h: jnp.sum(f(h)[0] * jnp.arange(11)[None]) + jnp.sum(f(h)[1])
    np.testing.assert_allclose(jax.grad(loss(chunked))(hidden), jax.grad(loss(whole))(hidden),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="chunk"):
        head_logprobs(model, hidden, targets, chunk=0)
