"""Device meshes and partition rules: data parallel, FSDP and tensor parallel through GSPMD.

    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    shard_model(model, mesh)                        # params placed by `param_spec`
    tokens, mask = shard_batch(mesh, (tokens, mask))
    out = generate(model, tokens, mask, key, sampling, mesh=mesh)
    trainer = Trainer(model, optimizer, loss_fn, mesh=mesh)   # state + batches sharded

The mesh has three named axes. `data` and `fsdp` both split the batch; `fsdp` also splits every
weight matrix along its model dimension (gathered by XLA when used); `tensor` splits heads and
the MLP hidden dimension (Megatron column/row layout). XLA inserts the collectives: there is no
hand-written communication. One device is the mesh (1, 1, 1) and takes the same path.

A dimension that an axis does not divide (e.g. SmolLM2's 3 KV heads over tensor=2) is left
unsplit on that axis rather than rejected: sharding changes where numbers live, never what they
are. Batches are the exception: a batch the data-parallel size does not divide is an error.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch is split over both; fsdp also splits weights

# Megatron layout: column-parallel layers split their output features over `tensor`, row-parallel
# ones their input features, so the pair attention (q/k/v -> o) and MLP (gate/up -> down) needs
# one reduction each. The other matrix dimension goes to `fsdp`.
_COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head")
_ROW = ("o_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Axis sizes of the device mesh; -1 on one axis means "all remaining devices"."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        sizes = dataclasses.astuple(self)
        if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
            raise ValueError(f"MeshConfig axis sizes must be >= 1 (at most one -1 for 'the "
                             f"rest'), got data={self.data} fsdp={self.fsdp} tensor={self.tensor}")

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        """`(data, fsdp, tensor)` for `num_devices` devices; raises if they do not match."""
        sizes = dataclasses.astuple(self)
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes and num_devices % known == 0:
            sizes = tuple(num_devices // known if s == -1 else s for s in sizes)
        if math.prod(sizes) != num_devices:
            raise ValueError(f"mesh data x fsdp x tensor = {' x '.join(map(str, sizes))} does not "
                             f"match the {num_devices} devices: choose sizes whose product is "
                             f"{num_devices} (or -1 on one axis)")
        return sizes


def make_mesh(config: MeshConfig = MeshConfig(), devices=None) -> Mesh:
    """A `Mesh` with axes `AXES` over `devices` (default: all devices of all hosts)."""
    devices = jax.devices() if devices is None else list(devices)
    shape = config.shape(len(devices))
    return Mesh(np.asarray(devices).reshape(shape), AXES)


def initialize_distributed(enabled: bool) -> tuple[int, int]:
    """Multi-host start-up (one process per host, before any other JAX call); returns
    `(process_index, process_count)`. Coordinator address and ids come from the environment
    (TPU VMs and SLURM/Open MPI are detected by `jax.distributed.initialize`)."""
    if enabled:
        jax.distributed.initialize()
    return jax.process_index(), jax.process_count()


def host_shard(items, process_index: int | None = None, process_count: int | None = None):
    """This host's contiguous share of `items` (e.g. game seeds): hosts step their own games."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if len(items) % count:
        raise ValueError(f"{len(items)} items cannot be split evenly over {count} hosts: use a "
                         f"multiple of {count}")
    share = len(items) // count
    return items[index * share:(index + 1) * share]


def _fit(spec: tuple, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Drop the axes of `spec` that do not divide their dimension."""
    def size(axes):
        return math.prod(mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,)))
    return P(*(axes if axes is not None and dim % size(axes) == 0 else None
               for axes, dim in zip(spec, shape)))


def param_spec(path: str, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Partition spec of the parameter at dotted `path` (as in `nnx.state(model)`).

    Kernels `[in, out]` (float `kernel` or int8 `q`) and LoRA factors follow their layer's
    column/row role; embeddings split vocab over `tensor` and features over `fsdp`; norms,
    scales of row-parallel layers, the value head and RNG state are replicated.
    """
    names = path.split(".")
    leaf = names[-1]
    role = next((("column" if n in _COLUMN else "row") for n in reversed(names)
                 if n in _COLUMN + _ROW), None)
    in_axis, out_axis = {"column": ("fsdp", "tensor"), "row": ("tensor", "fsdp"),
                         None: (None, None)}[role]
    if "embed_tokens" in names and leaf in ("embedding", "q"):
        spec = ("tensor", "fsdp")
    elif "embed_tokens" in names and leaf == "scale":
        spec = ("tensor",)
    elif role and leaf in ("kernel", "q"):
        spec = (in_axis, out_axis)
    elif role == "column" and leaf in ("scale", "bias"):
        spec = (out_axis,)
    elif leaf == "lora_a":
        spec = (in_axis, None)
    elif leaf == "lora_b":
        spec = (None, out_axis)
    else:
        spec = ()
    return _fit(spec, shape, mesh)


def _dotted(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", ""))) for k in path
                    if not isinstance(k, jax.tree_util.GetAttrKey))


def state_shardings(state, mesh: Mesh):
    """A tree like `state` (an `nnx.State` or pure tree) of `NamedSharding`s by `param_spec`."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, param_spec(_dotted(path), np.shape(x), mesh)), state)


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Place every variable of `model` on `mesh` by the partition rules (in place)."""
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, state_shardings(state, mesh)))
    return model


def opt_state_shardings(optimizer: optax.GradientTransformation, opt_state, params_shardings,
                        mesh: Mesh):
    """Optimizer moments shard like their parameters; scalars (counts) are replicated."""
    replicated = NamedSharding(mesh, P())
    return optax.tree_map_params(
        optimizer, lambda _, sharding: sharding, opt_state, params_shardings,
        transform_non_params=lambda _: replicated)


def batch_spec(ndim: int, batch_axis: int = 0) -> P:
    """Split dimension `batch_axis` over the data-parallel axes, replicate the rest."""
    return P(*(BATCH_AXES if d == batch_axis else None for d in range(ndim)))


def _check_divisible(mesh: Mesh, rows: int) -> None:
    parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    if rows % parallel:
        raise ValueError(f"batch of {rows} rows is not divisible by the data-parallel size "
                         f"{parallel} (mesh data x fsdp): pad the batch or change the mesh")


def batch_shardings(mesh: Mesh, tree, batch_axis: int = 0):
    """`NamedSharding`s splitting dimension `batch_axis` of every leaf of `tree` (arrays or
    `jax.ShapeDtypeStruct`s, global shapes) over the data-parallel axes."""
    def sharding(x):
        _check_divisible(mesh, x.shape[batch_axis])
        return NamedSharding(mesh, batch_spec(len(x.shape), batch_axis))
    return jax.tree.map(sharding, tree)


def shard_batch(mesh: Mesh, tree, batch_axis: int = 0):
    """Host arrays -> global arrays split over `data` x `fsdp` along `batch_axis`.

    Each process passes its own rows (`jax.make_array_from_process_local_data`): on one host
    that is the whole batch, on many hosts the global batch is their concatenation.
    """
    def put(x):
        x = np.asarray(x)
        _check_divisible(mesh, x.shape[batch_axis] * jax.process_count())
        return jax.make_array_from_process_local_data(
            NamedSharding(mesh, batch_spec(x.ndim, batch_axis)), x)

    return jax.tree.map(put, tree)


def place_like(reference: jax.Array, *arrays) -> tuple[jax.Array, ...]:
    """Host batch arrays placed like `reference` (e.g. a decode state's lengths): split over
    its mesh if it has one, else left for jit to place, as plain `jnp.asarray`s."""
    if isinstance(reference.sharding, NamedSharding):
        return tuple(shard_batch(reference.sharding.mesh, arrays))
    return tuple(jnp.asarray(a) for a in arrays)
