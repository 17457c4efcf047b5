"""Checkpoints: resuming gives exactly the losses of a run that never stopped."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrl_llm.checkpoint import Checkpointer, fingerprint, policy_identity
from jaxrl_llm.model import ModelConfig, Transformer
from jaxrl_llm.model.lora import LoraConfig, apply_lora
from jaxrl_llm.train.step import OptimConfig, Trainer, make_optimizer
from tests.test_lora import TOKENS, next_token_loss

BATCH = {"tokens": jnp.asarray(TOKENS)[:, None], "mask": jnp.ones((2, 1, 24), bool)}


def make_trainer(rank=4):
    model = Transformer(ModelConfig.tiny(), rngs=nnx.Rngs(0))
    apply_lora(model, LoraConfig(rank=rank), nnx.Rngs(1))
    return Trainer(model, make_optimizer(OptimConfig(learning_rate=1e-2)), next_token_loss), model


def run(trainer, state, steps):
    losses = []
    for _ in range(steps):
        state, metrics = trainer.step(state, BATCH)
        losses.append(float(metrics["loss"]))
    return state, losses


def test_resume_is_exact(tmp_path):
    trainer, model = make_trainer()
    _, straight = run(trainer, trainer.init(), 6)

    trainer, model = make_trainer()
    state, first = run(trainer, trainer.init(), 3)
    Checkpointer(str(tmp_path)).save(state, jax.random.key(7),
                                     {"fingerprint": fingerprint(model), "step": 3})
    del state  # a new process: fresh trainer, template state, restore

    trainer, model = make_trainer()
    restored = Checkpointer(str(tmp_path)).restore(trainer.init(), jax.random.key(0),
                                                   fingerprint(model))
    state, key, record = restored
    assert int(state.step) == 3 and record["step"] == 3
    np.testing.assert_array_equal(jax.random.key_data(key), jax.random.key_data(jax.random.key(7)))
    _, rest = run(trainer, state, 3)
    np.testing.assert_allclose(first + rest, straight, rtol=1e-6)


def test_empty_and_foreign_checkpoints(tmp_path):
    trainer, model = make_trainer()
    checkpointer = Checkpointer(str(tmp_path))
    assert checkpointer.restore(trainer.init(), jax.random.key(0), fingerprint(model)) is None
    checkpointer.save(trainer.init(), jax.random.key(0), {"fingerprint": fingerprint(model)})
    other_trainer, other = make_trainer(rank=8)
    with pytest.raises(ValueError, match="belongs to another model"):
        checkpointer.restore(other_trainer.init(), jax.random.key(0), fingerprint(other))


def test_policy_identity_follows_the_adapter_values():
    _, model = make_trainer()
    _, same = make_trainer()
    assert policy_identity(model) == policy_identity(same)
    state = nnx.state(same, nnx.LoRAParam)
    values = state.to_pure_dict()
    first = jax.tree_util.tree_flatten_with_path(values)[0][0][0]
    nudged = jax.tree_util.tree_map_with_path(
        lambda path, x: x.at[(0,) * x.ndim].add(1e-6) if path == first else x, values)
    nnx.replace_by_pure_dict(state, nudged)
    nnx.update(same, state)
    assert policy_identity(same)["fingerprint"] == policy_identity(model)["fingerprint"]
    assert policy_identity(same)["adapters"] != policy_identity(model)["adapters"]
