"""Orbax checkpoints of everything a run changes: adapters (+ value head), optimizer state, step,
PRNG key, and a JSON record of the run (config, model fingerprint, metrics).

Two slots: `latest` (resume after a crash or Ctrl-C) and `best` (by a metric, for evaluation).
Each keeps its last two checkpoints, and each checkpoint's record holds a sha256 of its arrays:
a restore verifies it, and a damaged or partial checkpoint is named in one warning line and
the previous one is used instead. The frozen base is never written: it is reloaded from the
model file, and the fingerprint makes restoring adapters onto another model a clear error
instead of silent garbage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from jaxrl_llm.model.lora import TRAINABLE
from jaxrl_llm.train.step import TrainState

logger = logging.getLogger(__name__)
KEEP = 2  # checkpoints kept per slot: the newest, and one to fall back to


def fingerprint(model: nnx.Module) -> str:
    """A short description of the model's parameter shapes (what adapters depend on)."""
    config = getattr(model, "config", None)
    shapes = jax.tree.map(lambda x: list(x.shape), nnx.state(model, nnx.LoRAParam).to_pure_dict())
    return json.dumps({"config": repr(config), "lora": shapes}, sort_keys=True)


def _digest(tree) -> str:
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        leaf = np.asarray(leaf)
        digest.update(f"{jax.tree_util.keystr(path)} {leaf.dtype} {leaf.shape}".encode())
        digest.update(np.ascontiguousarray(leaf).tobytes())
    return digest.hexdigest()


def policy_identity(model: nnx.Module) -> dict:
    """What a policy is: its fingerprint and a sha256 of its adapter values.

    Evaluation records are named by it, so a record follows the weights themselves: a
    checkpoint retrained to the same values (same data, seed and program) resumes the record,
    and any other weights start a record of their own.
    """
    return dict(fingerprint=fingerprint(model),
                adapters=_digest(nnx.state(model, nnx.LoRAParam).to_pure_dict()))


def _to_tree(state: TrainState, key: jax.Array) -> dict:
    return dict(trainable=state.trainable.to_pure_dict(), opt_state=state.opt_state,
                rng=state.rng.to_pure_dict(), step=state.step, key=jax.random.key_data(key))


class Checkpointer:
    """`save(state, key, record, slot)`, `record(slot)`, `restore(template, key, fingerprint)`."""

    def __init__(self, directory: str):
        directory = os.path.abspath(directory)
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as error:
            raise OSError(f"cannot create checkpoint directory {directory}: {error}") from error
        self.directory = directory
        options = ocp.CheckpointManagerOptions(max_to_keep=KEEP, create=True)
        self._managers = {slot: ocp.CheckpointManager(os.path.join(directory, slot),
                                                      options=options)
                          for slot in ("latest", "best")}

    def save(self, state: TrainState, key: jax.Array, record: dict, slot: str = "latest") -> None:
        """Write `state`, `key` and the JSON `record` (config, fingerprint, metrics) to `slot`."""
        manager = self._managers[slot]
        tree = _to_tree(state, key)
        try:
            manager.save(int(state.step), args=ocp.args.Composite(
                state=ocp.args.StandardSave(tree),
                record=ocp.args.JsonSave(dict(record, digest=_digest(tree)))), force=True)
            manager.wait_until_finished()
        except OSError as error:
            raise OSError(f"could not write a checkpoint to {manager.directory} ({error}); the "
                          "previous checkpoints are kept: free disk space or use another "
                          "--run-dir, then rerun to resume") from error

    def _records(self, slot: str):
        """(step, record) of each checkpoint in `slot` whose record reads, newest first."""
        manager = self._managers[slot]
        for step in sorted(manager.all_steps(), reverse=True):
            try:
                yield step, manager.restore(step, args=ocp.args.Composite(
                    record=ocp.args.JsonRestore()))["record"]
            except Exception as error:  # a partial or damaged checkpoint: try the previous one
                logger.warning("checkpoint %s/%d is unreadable (%s); trying the previous one",
                               manager.directory, step, type(error).__name__)

    def record(self, slot: str = "latest") -> dict | None:
        """The JSON record of the newest readable checkpoint in `slot`, or None."""
        return next((record for _, record in self._records(slot)), None)

    def load_adapters(self, model: nnx.Module, slot: str = "latest") -> dict:
        """Write the adapters (and value head) of the newest intact checkpoint of `slot` into
        `model`, for evaluation or export: no optimizer, trainer or data needed.

        Returns the checkpoint's record; raises ValueError if there is none, or if it was
        written for another model.
        """
        trainable = nnx.state(model, TRAINABLE)
        restored = self._restore(dict(trainable=trainable.to_pure_dict()), fingerprint(model),
                                 slot, adapters_only=True)
        if restored is None:
            raise ValueError(f"no checkpoint in {self.directory}/{slot}: train first (python -m "
                             "experiments.textworld_ppo writes checkpoints/sft)")
        tree, record = restored
        nnx.replace_by_pure_dict(trainable, tree["trainable"])
        nnx.update(model, trainable)
        return record

    def restore(self, template: TrainState, key: jax.Array, fingerprint_: str,
                slot: str = "latest") -> tuple[TrainState, jax.Array, dict] | None:
        """Restore the newest intact checkpoint of `slot` into the structure of `template`;
        None if the slot is empty.

        A checkpoint whose arrays do not read or do not match their digest is named in a
        warning and the previous one is tried. Raises ValueError if the checkpoint was written
        for another model, or if no checkpoint in the slot is intact.
        """
        restored = self._restore(_to_tree(template, key), fingerprint_, slot)
        if restored is None:
            return None
        tree, record = restored
        trainable = template.trainable
        nnx.replace_by_pure_dict(trainable, tree["trainable"])
        rng = template.rng
        nnx.replace_by_pure_dict(rng, tree["rng"])
        state = TrainState(trainable, tree["opt_state"], rng, tree["step"])
        return state, jax.random.wrap_key_data(np.asarray(tree["key"])), record

    def _restore(self, template, fingerprint_: str, slot: str, adapters_only: bool = False):
        """`(tree, record)` of the newest intact checkpoint of `slot`, or None if it is empty.
        `adapters_only`: `template` is `{"trainable": ...}` and only the adapters are read (the
        digest, which covers the whole state, is not checked)."""
        manager, damaged = self._managers[slot], []
        for step, record in self._records(slot):
            if record.get("fingerprint") != fingerprint_:
                raise ValueError(f"checkpoint in {self.directory}/{slot} belongs to another "
                                 "model or LoRA config; use a new --run-dir or the matching "
                                 "model")
            try:
                if adapters_only:
                    tree = manager.restore(step, args=ocp.args.Composite(
                        state=ocp.args.PyTreeRestore(template, partial_restore=True)))["state"]
                    intact = True
                else:
                    tree = manager.restore(step, args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(template)))["state"]
                    intact = record.get("digest") in (None, _digest(tree))
            except Exception:
                intact = False
            if intact:
                return tree, record
            damaged.append(step)
            logger.warning("checkpoint %s/%d is damaged (its arrays do not match their "
                           "digest); trying the previous one", manager.directory, step)
        if not damaged:
            return None
        raise ValueError(f"no intact checkpoint in {manager.directory} (damaged: steps "
                         f"{damaged}): delete that directory to start this stage afresh")
