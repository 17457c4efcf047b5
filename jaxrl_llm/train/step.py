"""One donated optimizer step over the trainable parameters (LoRA + value head).

The model is split once into `(graphdef, trainable, rng, frozen)`: gradients and optimizer state
exist only for `trainable` (the `lora.TRAINABLE` filter), so the frozen (int8) base costs no
optimizer memory. A step takes a list of micro-batches (pytrees with leaves `[b, ...]`), each
run by one jitted program per shape that adds its gradients of the *summed* loss into a donated
accumulator; a last jitted program divides by the total count and updates, so the update is the
true token mean of the whole batch however it is split. Micro-batches of one step may have
different widths (`micro_batches` cuts each prompt to its own length bucket), so a short
example never pays for the longest one of its batch.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxrl_llm.model.lora import TRAINABLE
from jaxrl_llm.padding import bucket_length
from jaxrl_llm.sharding import (MeshConfig, make_mesh, opt_state_shardings, shard_batch,
                                state_shardings)

# XLA:CPU's default scheduler runs the recomputed forward of every `jax.checkpoint` block early,
# next to the original forward, so remat frees nothing (a 1,040-token SmolLM2-135M gradient needs
# 3.5 GB of temporaries with or without it); the memory-optimized scheduler leaves the
# recomputation in the backward pass, where it belongs (0.6 GB with remat).
_CPU_COMPILER_OPTIONS = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}

# loss_fn(model, micro_batch) -> (loss_sum, count, metric_sums): the loss to minimise summed over
# the micro-batch's tokens (or sequences), how many there were, and sums of metrics to report:
# a value is reported as sum / count over the whole batch (include the loss itself to see it),
# a `(sum, count)` pair as its own sum / its own count (e.g. a token mean beside a loss whose
# count is sequences).
LossFn = Callable[[nnx.Module, Any], tuple[jax.Array, jax.Array, dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with global-norm clipping and linear warmup/decay.

    Attributes:
      learning_rate: peak learning rate.
      weight_decay: decoupled weight decay (AdamW).
      max_grad_norm: clip the global gradient norm (0 = off).
      warmup_steps: linear warmup from 0 to the peak.
      total_steps: if > 0, linear decay to 0 at this step (notebook 000's linear schedule).
    """

    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    total_steps: int = 0

    def __post_init__(self):
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ValueError("weight_decay and max_grad_norm must be >= 0, got "
                             f"{self.weight_decay} and {self.max_grad_norm}")
        if self.warmup_steps < 0 or self.total_steps < 0:
            raise ValueError("warmup_steps and total_steps must be >= 0")
        if self.total_steps and self.warmup_steps >= self.total_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be < total_steps "
                             f"({self.total_steps})")


def make_optimizer(config: OptimConfig) -> optax.GradientTransformation:
    if config.total_steps:
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, config.learning_rate, max(config.warmup_steps, 1)),
             optax.linear_schedule(config.learning_rate, 0.0,
                                   config.total_steps - config.warmup_steps)],
            [config.warmup_steps])
    elif config.warmup_steps:
        schedule = optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps)
    else:
        schedule = config.learning_rate
    chain = [optax.clip_by_global_norm(config.max_grad_norm)] if config.max_grad_norm else []
    return optax.chain(*chain, optax.adamw(schedule, weight_decay=config.weight_decay))


def micro_batches(batch: dict[str, np.ndarray], size: int) -> list[dict[str, np.ndarray]]:
    """Host arrays `[N, ...]` -> `N / size` micro-batches for `Trainer.step`, in row order.

    Each micro-batch's left-padded `prompt` (and `prompt_mask`) keeps only the columns of the
    length bucket of its own longest prompt: the columns cut are padding in every row of it.
    """
    n = len(batch["prompt"])
    if size < 1 or n % size:
        raise ValueError(f"{n} rows do not split into micro-batches of {size}: use a size >= 1 "
                         "that divides the row count")
    micros = []
    for start in range(0, n, size):
        micro = {key: value[start:start + size] for key, value in batch.items()}
        width = bucket_length(max(int(micro["prompt_mask"].sum(axis=1).max()), 1))
        micro["prompt"], micro["prompt_mask"] = (micro["prompt"][:, -width:],
                                                 micro["prompt_mask"][:, -width:])
        micros.append(micro)
    return micros


class TrainState(NamedTuple):
    """Everything a step changes: adapters (+ value head), optimizer state, dropout RNG."""

    trainable: nnx.State
    opt_state: optax.OptState
    rng: nnx.State
    step: jax.Array


class Trainer:
    """Holds the static parts (graphdef, frozen base, optimizer, loss); the state is explicit.

    Usage:
      trainer = Trainer(model, make_optimizer(cfg), loss_fn)
      state = trainer.init()
      state, metrics = trainer.step(state, micro_batches)   # state is donated
      model = trainer.model(state)                           # for sampling / eval

    `trainable` is the NNX filter of what trains (default `lora.TRAINABLE`: adapters + value
    head; `nnx.Param` trains every float weight of a small model, e.g. one built from scratch).

    With a `mesh` (`jaxrl_llm.sharding`), the frozen base, adapters and optimizer moments are
    placed by the partition rules and each micro-batch is split over the data-parallel axes;
    without one, the mesh is the single default device: the same program either way.
    """

    def __init__(self, model: nnx.Module, optimizer: optax.GradientTransformation,
                 loss_fn: LossFn, mesh: Mesh | None = None, trainable=TRAINABLE):
        self.graphdef, trainable, rng, frozen = nnx.split(model, trainable, nnx.RngState, ...)
        if not jax.tree.leaves(trainable):
            raise ValueError("the model has no trainable parameters: attach LoRA adapters "
                             "(model.lora.apply_lora) or a value head first")
        self.optimizer = optimizer
        self.mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1]) if mesh is None else mesh
        replicated = NamedSharding(self.mesh, P())
        trainable_shardings = state_shardings(trainable, self.mesh)
        self.shardings = TrainState(
            trainable_shardings,
            opt_state_shardings(optimizer, jax.eval_shape(optimizer.init, trainable),
                                trainable_shardings, self.mesh),
            jax.tree.map(lambda _: replicated, rng), replicated)
        self._trainable, self._rng = jax.device_put(
            (trainable, rng), (self.shardings.trainable, self.shardings.rng))
        self.frozen = jax.device_put(frozen, state_shardings(frozen, self.mesh))
        self._replicated = replicated
        self._micro_grads = functools.partial(_micro_grads, self.graphdef, loss_fn)
        on_cpu = self.mesh.devices.flat[0].platform == "cpu"
        self._accumulate = jax.jit(
            functools.partial(_accumulate, self._micro_grads), donate_argnums=0,
            out_shardings=((self.shardings.trainable, replicated, replicated), replicated),
            compiler_options=_CPU_COMPILER_OPTIONS if on_cpu else None)
        self._update = jax.jit(functools.partial(_update, optimizer), donate_argnums=0,
                               out_shardings=(self.shardings, replicated))
        self._zeros = None

    def init(self) -> TrainState:
        """A fresh state from the model's current adapters.

        Each call returns its own buffers: `step` donates its state, and a model built from one
        `init()` (e.g. a frozen KL reference) must not lose its arrays to another's update.
        """
        trainable, rng = jax.tree.map(jnp.copy, (self._trainable, self._rng))
        opt_state = jax.jit(self.optimizer.init,
                            out_shardings=self.shardings.opt_state)(trainable)
        return TrainState(trainable, opt_state, rng,
                          jax.device_put(jnp.zeros((), jnp.int32), self.shardings.step))

    def step(self, state: TrainState, batch) -> tuple[TrainState, dict[str, jax.Array]]:
        """One optimizer update from `batch` (state is donated); returns the new state and metrics.

        Args:
          batch: a list of micro-batches (host pytrees, leaves `[b, ...]`, b divisible by the
            mesh's data-parallel size; shapes may differ between micro-batches), or one pytree
            of micro-batches stacked along a leading axis `[M, b, ...]`.
        """
        if not isinstance(batch, (list, tuple)):
            batch = [jax.tree.map(lambda x, i=i: x[i], batch)
                     for i in range(len(jax.tree.leaves(batch)[0]))]
        if not batch:
            raise ValueError("a train step needs at least one micro-batch")
        micros = [shard_batch(self.mesh, micro) for micro in batch]
        if self._zeros is None:  # the accumulator's structure: traced once, from any micro-batch
            shapes = jax.eval_shape(self._micro_grads, state.trainable, state.rng, self.frozen,
                                    micros[0])
            self._zeros = jax.jit(lambda: jax.tree.map(
                lambda s: jnp.zeros(s.shape, jnp.float32), shapes[:3]),
                out_shardings=(self.shardings.trainable, self._replicated, self._replicated))
        accumulated, rng = self._zeros(), state.rng
        for micro in micros:
            accumulated, rng = self._accumulate(accumulated, state.trainable, rng, self.frozen,
                                                micro)
        return self._update(state, rng, accumulated)

    def model(self, state: TrainState) -> nnx.Module:
        """The full model with `state`'s adapters (shares the frozen base's arrays)."""
        return nnx.merge(self.graphdef, state.trainable, state.rng, self.frozen)


def _micro_grads(graphdef, loss_fn, trainable, rng, frozen, micro):
    """Gradients of one micro-batch's summed loss: `(grads, count, metric_sums, rng)`."""
    def micro_loss(trainable, rng):
        model = nnx.merge(graphdef, trainable, rng, frozen)
        loss_sum, count, metric_sums = loss_fn(model, micro)
        return loss_sum, (count, metric_sums, nnx.state(model, nnx.RngState))

    grads, (count, metric_sums, rng) = jax.grad(micro_loss, has_aux=True)(trainable, rng)
    return grads, jnp.asarray(count, jnp.float32), metric_sums, rng


def _accumulate(micro_grads, accumulated, trainable, rng, frozen, micro):
    grads, count, metric_sums, rng = micro_grads(trainable, rng, frozen, micro)
    return jax.tree.map(jnp.add, accumulated, (grads, count, metric_sums)), rng


def _update(optimizer, state: TrainState, rng, accumulated):
    grads, count, metric_sums = accumulated
    count = jnp.maximum(count, 1.0)  # an all-padding batch gives zero grads, not NaN
    grads = jax.tree.map(lambda g: g / count, grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    # A non-finite loss or gradient would poison the adapters and Adam's moments for good:
    # that update is skipped (the step still counts) and reported.
    finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x))
                                  for x in jax.tree.leaves((grads, metric_sums))]))
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    trainable, opt_state = keep(trainable, state.trainable), keep(opt_state, state.opt_state)
    metrics = {name: value[0] / jnp.maximum(value[1], 1e-8) if isinstance(value, tuple)
               else value / count for name, value in metric_sums.items()}
    metrics.update(grad_norm=optax.tree.norm(grads), tokens=count,
                   skipped=1.0 - finite.astype(jnp.float32))
    return TrainState(trainable, opt_state, rng, state.step + 1), metrics


class NonFiniteGuard:
    """Stops a run after `limit` updates in a row were skipped for a non-finite loss or
    gradient (`Trainer.step`'s `skipped` metric): one is noise, several in a row a broken run."""

    def __init__(self, limit: int = 3):
        self.limit, self.streak = limit, 0

    def __call__(self, metrics: dict, where: str) -> None:
        if not float(metrics["skipped"]):
            self.streak = 0
            return
        self.streak += 1
        print(f"{where}: non-finite loss or gradient, update skipped ({self.streak} in a row)",
              flush=True)
        if self.streak >= self.limit:
            raise RuntimeError(f"{where}: {self.streak} updates in a row had a non-finite loss "
                               "or gradient; lower the learning rate or check the rewards "
                               "(the last checkpoint is intact: rerun to resume from it)")
