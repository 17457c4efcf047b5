"""Orbax checkpoints of everything a run changes: adapters (+ value head), optimizer state, step,
PRNG key, and a JSON record of the run (config, model fingerprint, metrics).

Two slots: `latest` (resume after a crash or Ctrl-C) and `best` (by a metric, for evaluation).
The frozen base is never written: it is reloaded from the model file, and the fingerprint makes
restoring adapters onto another model a clear error instead of silent garbage.
"""

from __future__ import annotations

import hashlib
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from jaxrl_llm.train.step import TrainState


def fingerprint(model: nnx.Module) -> str:
    """A short description of the model's parameter shapes (what adapters depend on)."""
    config = getattr(model, "config", None)
    shapes = jax.tree.map(lambda x: list(x.shape), nnx.state(model, nnx.LoRAParam).to_pure_dict())
    return json.dumps({"config": repr(config), "lora": shapes}, sort_keys=True)


def policy_identity(model: nnx.Module) -> dict:
    """What a policy is: its fingerprint and a sha256 of its adapter values.

    Evaluation records are named by it, so a record follows the weights themselves: a
    checkpoint retrained to the same values (same data, seed and program) resumes the record,
    and any other weights start a record of their own.
    """
    adapters = nnx.state(model, nnx.LoRAParam).to_pure_dict()
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(adapters)[0]:
        leaf = np.asarray(leaf)
        digest.update(f"{jax.tree_util.keystr(path)} {leaf.dtype} {leaf.shape}".encode())
        digest.update(np.ascontiguousarray(leaf).tobytes())
    return dict(fingerprint=fingerprint(model), adapters=digest.hexdigest())


def _to_tree(state: TrainState, key: jax.Array) -> dict:
    return dict(trainable=state.trainable.to_pure_dict(), opt_state=state.opt_state,
                rng=state.rng.to_pure_dict(), step=state.step, key=jax.random.key_data(key))


class Checkpointer:
    """`save(step, state, key, record)`, `save_best(...)`, `restore(template, key) -> ...`."""

    def __init__(self, directory: str):
        directory = os.path.abspath(directory)
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as error:
            raise OSError(f"cannot create checkpoint directory {directory}: {error}") from error
        self.directory = directory
        options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True)
        self._managers = {slot: ocp.CheckpointManager(os.path.join(directory, slot),
                                                      options=options)
                          for slot in ("latest", "best")}

    def save(self, state: TrainState, key: jax.Array, record: dict, slot: str = "latest") -> None:
        """Write `state`, `key` and the JSON `record` (config, fingerprint, metrics) to `slot`."""
        manager = self._managers[slot]
        manager.save(int(state.step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(_to_tree(state, key)),
            record=ocp.args.JsonSave(record)), force=True)
        manager.wait_until_finished()

    def record(self, slot: str = "latest") -> dict | None:
        """The JSON record of the newest checkpoint in `slot`, or None if there is none."""
        manager = self._managers[slot]
        step = manager.latest_step()
        if step is None:
            return None
        return manager.restore(step, args=ocp.args.Composite(
            record=ocp.args.JsonRestore()))["record"]

    def restore(self, template: TrainState, key: jax.Array, fingerprint_: str,
                slot: str = "latest") -> tuple[TrainState, jax.Array, dict] | None:
        """Restore into the structure of `template`; None if the slot is empty.

        Raises ValueError if the checkpoint was written for another model.
        """
        record = self.record(slot)
        if record is None:
            return None
        if record.get("fingerprint") != fingerprint_:
            raise ValueError(f"checkpoint in {self.directory}/{slot} belongs to another model or "
                             "LoRA config; use a new --run-dir or the matching model")
        manager = self._managers[slot]
        tree = manager.restore(manager.latest_step(), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_to_tree(template, key))))["state"]
        trainable = template.trainable
        nnx.replace_by_pure_dict(trainable, tree["trainable"])
        rng = template.rng
        nnx.replace_by_pure_dict(rng, tree["rng"])
        state = TrainState(trainable, tree["opt_state"], rng, tree["step"])
        return state, jax.random.wrap_key_data(np.asarray(tree["key"])), record
