"""LoRA (Hu et al. 2021) over any frozen linear layer, float or int8.

`y = base(x) + (alpha / r) * dropout(x) @ A @ B`, A `[in, r]` random, B `[r, out]` zero, so a fresh
adapter leaves the model's function unchanged. A and B are `nnx.LoRAParam`: `TRAINABLE` (LoRA and
value head) is the one filter used for the optimizer (`wrt=`), the gradient and the checkpoint.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrl_llm.model.llama import Linear, Transformer, get_submodule
from jaxrl_llm.model.quant import Int8Linear
from jaxrl_llm.model.value_head import ValueParam

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TRAINABLE = nnx.Any(nnx.LoRAParam, ValueParam)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Which layers get adapters and how big they are (defaults: notebook 000's r=4, alpha=32).

    Attributes:
      rank: r, the adapter's inner width.
      alpha: scaling numerator; the update is multiplied by alpha / rank.
      dropout: dropout rate on the adapter's input (0 for RL: PPO ratios need a deterministic
        policy).
      targets: attribute names of the linear layers to adapt (default: all of attention + MLP).
      layers: indices of the decoder layers to adapt (PEFT's `layers_to_transform`), None for
        all. Adapting only the top layers makes training cheaper: the layers below them run
        forward only, with no backward pass (`top_layers`).
    """

    rank: int = 4
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ALL_LINEAR
    layers: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoraConfig.rank must be >= 1, got {self.rank}")
        if not self.alpha > 0:
            raise ValueError(f"LoraConfig.alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout}")
        object.__setattr__(self, "targets", tuple(self.targets))
        if unknown := sorted(set(self.targets) - set(ALL_LINEAR)):
            raise ValueError(f"unknown LoRA target module(s) {unknown}; choose from "
                             f"{', '.join(ALL_LINEAR)}")
        if not self.targets:
            raise ValueError("LoraConfig.targets is empty: name at least one module")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(sorted(set(self.layers))))
            if not self.layers or self.layers[0] < 0:
                raise ValueError(f"LoraConfig.layers must be None (all) or layer indices >= 0, "
                                 f"got {self.layers}")

    @classmethod
    def top_layers(cls, count: int, num_layers: int, **kwargs) -> "LoraConfig":
        """Adapters on the last `count` of `num_layers` decoder layers (0: all of them)."""
        if not 0 <= count <= num_layers:
            raise ValueError(f"the number of adapted top layers must be in [0, {num_layers}] "
                             f"(0: all), got {count}")
        return cls(layers=tuple(range(num_layers - count, num_layers)) if count else None,
                   **kwargs)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nnx.Module):
    """A frozen `base` linear layer plus a trainable low-rank update."""

    def __init__(self, base: Linear | Int8Linear, config: LoraConfig, *, rngs: nnx.Rngs):
        self.base = base
        self.scaling = config.scaling
        fan_in, fan_out = base.in_features, base.out_features
        # A ~ Kaiming-uniform as in PEFT; B = 0 so the adapted model starts equal to the base.
        bound = 1.0 / math.sqrt(fan_in)
        self.lora_a = nnx.LoRAParam(
            jax.random.uniform(rngs.params(), (fan_in, config.rank), jnp.float32, -bound, bound))
        self.lora_b = nnx.LoRAParam(jnp.zeros((config.rank, fan_out), jnp.float32))
        self.dropout = nnx.Dropout(config.dropout, rngs=rngs) if config.dropout else None

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x if self.dropout is None else self.dropout(x)
        # The adapter runs on `[tokens, in]`: with the leading dims kept, the gradients of A and
        # B contract over two axes (batch, time) and XLA's CPU dots then transpose the whole
        # output gradient of every adapted layer (~18% of a train step's time).
        h = h.reshape(-1, h.shape[-1])
        update = (h @ self.lora_a[...].astype(x.dtype)) @ self.lora_b[...].astype(x.dtype)
        return self.base(x) + self.scaling * update.reshape(*x.shape[:-1], -1)

    def delta_kernel(self) -> jax.Array:
        """`[in, out]` float32 `scaling * A @ B`."""
        return self.scaling * (self.lora_a[...] @ self.lora_b[...])


def apply_lora(model: Transformer, config: LoraConfig, rngs: nnx.Rngs) -> Transformer:
    """Wrap every targeted linear layer of `model` (of `config.layers`) in a `LoRALinear`, in
    place; returns it."""
    if config.layers is not None and config.layers[-1] >= len(model.layers):
        raise ValueError(f"LoraConfig.layers {config.layers} names layers past the model's "
                         f"last, {len(model.layers) - 1}")
    # Paths inside decoder layer i start with ("layers", i).
    adapted = None if config.layers is None else {("layers", i) for i in config.layers}
    count = 0
    for path, module in list(nnx.iter_modules(model)):
        if adapted is not None and tuple(path[:2]) not in adapted:
            continue
        for name in config.targets:
            child = getattr(module, name, None)
            if isinstance(child, (Linear, Int8Linear)):
                setattr(module, name, LoRALinear(child, config, rngs=rngs))
                count += 1
    if count == 0:
        raise ValueError(f"no linear layer named {config.targets} found in the model")
    return model


def lora_layers(model: nnx.Module) -> dict[str, LoRALinear]:
    """Dotted module path (e.g. `layers.3.self_attn.q_proj`) -> its `LoRALinear`."""
    return {".".join(map(str, path)): module for path, module in nnx.iter_modules(model)
            if isinstance(module, LoRALinear)}


def merge_lora(model: Transformer) -> Transformer:
    """Fold every adapter into a float kernel (in place): `W = base + scaling * A @ B`.

    Adapted int8 bases are dequantized; layers without adapters are left as they are
    (`quant.dequantize_model` makes the whole model float, as `export.save_merged` does).
    """
    dtype = model.config.jnp_param_dtype
    for path, layer in lora_layers(model).items():
        parent_path, name = path.rsplit(".", 1)
        base = layer.base.to_linear(dtype) if isinstance(layer.base, Int8Linear) else layer.base
        merged = Linear(base.in_features, base.out_features, use_bias=base.bias is not None,
                        param_dtype=dtype, rngs=nnx.Rngs(0))
        merged.kernel[...] = (base.kernel[...].astype(jnp.float32)
                              + layer.delta_kernel()).astype(dtype)
        if base.bias is not None:
            merged.bias[...] = base.bias[...]
        setattr(get_submodule(model, parent_path), name, merged)
    return model
