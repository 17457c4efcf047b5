"""Checkpoints: resuming gives exactly the losses of a run that never stopped."""

import logging
import os

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


def _flip_bytes(directory):
    """Damage every array file below `directory` (as a bad disk or a cut copy would)."""
    hit = 0
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            if "record" in root or name.endswith((".json", "_METADATA")) or \
                    os.path.getsize(path) < 64:
                continue
            with open(path, "r+b") as f:
                data = bytearray(f.read())
                for i in range(16, len(data), 97):
                    data[i] ^= 0xFF
                f.seek(0)
                f.write(data)
            hit += 1
    assert hit


def _saved(tmp_path, steps):
    trainer, model = make_trainer()
    checkpointer = Checkpointer(str(tmp_path))
    state = trainer.init()
    for _ in range(steps):
        state, _ = run(trainer, state, 1)
        checkpointer.save(state, jax.random.key(int(state.step)),
                          {"fingerprint": fingerprint(model), "step": int(state.step)})
    return trainer, model, checkpointer


def test_two_checkpoints_are_kept_and_a_damaged_one_falls_back(tmp_path, caplog):
    trainer, model, checkpointer = _saved(tmp_path, 3)
    assert sorted(os.listdir(tmp_path / "latest")) == ["2", "3"]
    _flip_bytes(tmp_path / "latest" / "3")
    with caplog.at_level(logging.WARNING):
        state, key, record = checkpointer.restore(trainer.init(), jax.random.key(0),
                                                  fingerprint(model))
    assert record["step"] == 2 and int(state.step) == 2
    np.testing.assert_array_equal(jax.random.key_data(key), jax.random.key_data(jax.random.key(2)))
    assert any("latest/3 is" in r.getMessage() for r in caplog.records)
    _flip_bytes(tmp_path / "latest" / "2")
    with pytest.raises(ValueError, match="no intact checkpoint in .*latest .*delete"):
        checkpointer.restore(trainer.init(), jax.random.key(0), fingerprint(model))


def test_an_unwritable_checkpoint_keeps_the_previous_ones(tmp_path, monkeypatch):
    trainer, model, checkpointer = _saved(tmp_path, 1)
    manager = checkpointer._managers["latest"]

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(manager, "save", disk_full)
    state, _ = run(trainer, trainer.init(), 2)
    with pytest.raises(OSError, match="previous checkpoints are kept.*rerun to resume"):
        checkpointer.save(state, jax.random.key(0), {"fingerprint": fingerprint(model)})
    monkeypatch.undo()
    _, _, record = checkpointer.restore(trainer.init(), jax.random.key(0), fingerprint(model))
    assert record["step"] == 1


def test_a_non_finite_update_is_skipped_and_a_streak_stops_the_run():
    from jaxrl_llm.train.step import NonFiniteGuard

    def scaled_loss(model, batch):
        loss, count, metrics = next_token_loss(model, batch)
        return loss * batch["scale"][0], count, metrics

    model = Transformer(ModelConfig.tiny(), rngs=nnx.Rngs(0))
    apply_lora(model, LoraConfig(rank=4), nnx.Rngs(1))
    trainer = Trainer(model, make_optimizer(OptimConfig(learning_rate=1e-2)), scaled_loss)
    state = trainer.init()
    good = dict(BATCH, scale=jnp.ones((2, 1)))  # [micro-batch, row]
    state, metrics = trainer.step(state, good)  # a real update first: Adam moments are nonzero
    before = jax.tree.map(np.asarray, (state.trainable, state.opt_state))
    poisoned = dict(BATCH, scale=jnp.full((2, 1), jnp.nan))  # e.g. a NaN reward
    state, metrics = trainer.step(state, poisoned)
    assert float(metrics["skipped"]) == 1.0
    jax.tree.map(np.testing.assert_array_equal, before,
                 jax.tree.map(np.asarray, (state.trainable, state.opt_state)))
    guard = NonFiniteGuard(limit=3)
    guard({"skipped": 1.0}, "PPO iteration 1")
    guard({"skipped": 0.0}, "PPO iteration 1")  # a good update ends the streak
    guard({"skipped": 1.0}, "PPO iteration 2")
    guard({"skipped": 1.0}, "PPO iteration 2")
    with pytest.raises(RuntimeError, match="3 updates in a row had a non-finite loss"):
        guard({"skipped": 1.0}, "PPO iteration 2")
    state, metrics = trainer.step(state, good)
    assert float(metrics["skipped"]) == 0.0 and np.isfinite(float(metrics["loss"]))


def test_load_adapters_needs_no_trainer(tmp_path):
    trainer, model, checkpointer = _saved(tmp_path, 2)
    trained = policy_identity(trainer.model(checkpointer.restore(
        trainer.init(), jax.random.key(0), fingerprint(model))[0]))
    fresh = Transformer(ModelConfig.tiny(), rngs=nnx.Rngs(0))
    apply_lora(fresh, LoraConfig(rank=4), nnx.Rngs(1))
    assert policy_identity(fresh) != trained
    record = Checkpointer(str(tmp_path)).load_adapters(fresh)
    assert record["step"] == 2 and policy_identity(fresh) == trained
    with pytest.raises(ValueError, match="no checkpoint in .*best"):
        Checkpointer(str(tmp_path)).load_adapters(fresh, slot="best")
    other = Transformer(ModelConfig.tiny(), rngs=nnx.Rngs(0))
    apply_lora(other, LoraConfig(rank=8), nnx.Rngs(1))
    with pytest.raises(ValueError, match="belongs to another model"):
        Checkpointer(str(tmp_path)).load_adapters(other)
